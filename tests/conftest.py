"""Shared fixtures: a tiny draft/target GGUF pair written to a real disk directory."""
import os
import signal
from pathlib import Path

import pytest

# A run started in the background by a shell without job control inherits SIGINT ignored (bash ignores it for
# asynchronous commands), and Python then never raises KeyboardInterrupt: every Ctrl-C test, and the children they
# start, would fail. The tests need Ctrl-C as a terminal delivers it; set before edgecad installs its own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from edgecad import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def session_cost_cache(tmp_path_factory):
    """Engines learn device costs into a cache file: tests never use the user's. This one is for engines and
    servers that module- and session-scoped fixtures start (before any test's own, below)."""
    d = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EDGECAD_CACHE")
    os.environ["EDGECAD_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("EDGECAD_CACHE", None)
    else:
        os.environ["EDGECAD_CACHE"] = old


@pytest.fixture(autouse=True)
def private_cost_cache(session_cost_cache, tmp_path_factory, monkeypatch):
    """Each test's own cost cache: a configuration never depends on what an earlier test learned (on the order
    tests run in). Child processes inherit it."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("EDGECAD_CACHE", str(d))
    return d




@pytest.fixture(scope="session")
def tiny_pair(tiny_dir):
    """(draft, target) paths of the tiny models: same vocabulary, random weights, real llama.cpp."""
    return tiny.write_pair(tiny_dir)


@pytest.fixture(scope="session")
def tiny_target(tiny_pair) -> Path:
    return tiny_pair[1]


@pytest.fixture(scope="session")
def tiny_draft(tiny_pair) -> Path:
    return tiny_pair[0]


@pytest.fixture(scope="session")
def other_vocab_model(tiny_dir) -> Path:
    """A tiny model whose vocabulary has the same size but one different token text."""
    tokens, _ = tiny.vocabulary()
    tokens[-1] = "<|end|>"
    return tiny.write_model(tiny_dir / "other-vocab.gguf", tiny.TinySpec(n_layer=1), vocab_tokens=tokens)


@pytest.fixture
def empty_models_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setenv("EDGECAD_MODELS", str(d))
    return d


@pytest.fixture
def new_user(tmp_path, monkeypatch) -> Path:
    """A user of their own (returned: their home) with no EDGECAD_MODELS nor XDG_* directories set, working in
    their home: outside any checkout, so the registry looks only in this user's directories."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("EDGECAD_MODELS", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(home)
    return home


def _is_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    for line in open("/proc/mounts"):
        dev, mnt, fs = line.split()[:3]
        if str(path).startswith(mnt) and len(mnt) > len(best):
            best, fstype = mnt, fs
    return fstype in ("tmpfs", "ramfs")


@pytest.fixture(scope="session")
def disk_dir(tmp_path_factory) -> Path:
    """A directory on a real disk (page cache that eviction can drop), not tmpfs."""
    d = tmp_path_factory.mktemp("disk")
    if _is_tmpfs(d):
        d = Path(__file__).resolve().parent.parent / ".pytest-disk"
        d.mkdir(exist_ok=True)
    assert not _is_tmpfs(d), f"no real-disk directory for paging tests (tried {d})"
    return d


@pytest.fixture(scope="session")
def tiny_dir(disk_dir) -> Path:
    """Where the tiny models live: real storage, like every model file of the tests (tmpfs pages cannot be
    dropped from the page cache, which paging and the load tests rely on)."""
    d = disk_dir / "tiny"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def paging_pair(disk_dir):
    """(draft, target) with a 16-layer target (~250 KB per layer) on a real disk, for the pager."""
    return tiny.write_pair(disk_dir, target=tiny.TinySpec(n_layer=16, layer_scale=0.15, seed=1))


@pytest.fixture(scope="session")
def quantized_pair(disk_dir):
    """(draft, target): a Q8_0 draft and a Q4_0 target (8 layers of ~190 KB, repacked by llama.cpp when
    resident) whose outputs end: an end-of-generation token wins where one ordinary token would."""
    return tiny.write_quantized_pair(disk_dir)


@pytest.fixture(scope="session")
def quantized_budget_pair(disk_dir):
    """(draft, target) as budget_pair, quantized as real models are: a Q4_0 target (12 layers of ~2.4 MB, repacked
    by llama.cpp when resident) and a Q8_0 draft, so what llama.cpp copies out of a file shows in the peak."""
    return tiny.write_pair(disk_dir / "qbudget",
                           target=tiny.TinySpec(n_layer=12, n_embd=512, n_ff=2048, seed=31, qtype="Q4_0"),
                           draft=tiny.TinySpec(n_layer=2, n_embd=512, n_ff=1024, seed=32, qtype="Q8_0"))


@pytest.fixture(scope="session")
def budget_pair(disk_dir):
    """(draft, target) where the target's weights (95 MB, 24 layers of 3.8 MB) outweigh llama.cpp's buffers, so
    a whole-engine memory_budget a little below what the resident target needs makes the plan page it."""
    return tiny.write_pair(disk_dir / "budget", target=tiny.TinySpec(n_layer=24, n_embd=256, n_ff=1024, seed=21),
                           draft=tiny.TinySpec(n_layer=2, n_embd=256, n_ff=512, seed=22))
