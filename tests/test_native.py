"""The C library's residency queries (mincore), on real files and memory."""
import mmap
import os

import pytest

from edgecad import native
from edgecad.cgroup import drop_file_cache
from edgecad.errors import NativeError
from helpers import sigint_after

PAGE = mmap.PAGESIZE


def test_file_residency_follows_the_page_cache(tmp_path):
    p = tmp_path / "blob"
    size = 256 * PAGE
    p.write_bytes(os.urandom(size))
    with open(p, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    dropped = native.file_resident(p)
    p.read_bytes()
    assert native.file_resident(p) == size
    assert dropped < size // 2
    assert native.file_resident(p, 10 * PAGE, 5 * PAGE) == 5 * PAGE
    assert native.file_resident(p, size + PAGE, PAGE) == 0  # past the end


def test_memory_residency_counts_touched_pages():
    n = 64
    m = mmap.mmap(-1, n * PAGE)
    try:
        import ctypes
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert native.mem_resident(addr, n * PAGE) == 0
        for i in range(0, n, 2):
            m[i * PAGE] = 1
        assert native.mem_resident(addr, n * PAGE) == n // 2 * PAGE
    finally:
        del addr
        m.close()


def test_errors_carry_code_and_message(tmp_path):
    with pytest.raises(NativeError) as e:
        native.file_resident(tmp_path / "missing")
    assert e.value.code == 2 and "open(" in str(e.value) and "No such file" in str(e.value)


# ---------------------------------------------------------------------------- the pager's C side, driven directly
# A real file mapped by this process stands for llama.cpp's mapping of a model, and the layer boundaries that
# llama.cpp's cb_eval would report are reported by calling ec_pager_cb_eval with a name: each wait, stop and
# close path of the IO thread is then reached on purpose, not by luck of timing.

import ctypes
import signal
import subprocess
import sys
import threading
import time


LAYER = 64 << 10
N_LAYERS = 8
NAMED = threading.Event()  # set when the C library asked a "tensor" its name: a callback has begun


def _name(t):
    NAMED.set()
    return t


NAME_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(_name)  # a "tensor" here is its name


native.install_interrupt()  # as edgecad.llama does at import: Ctrl-C also sets the C flag


def tensor(name: str):
    return ctypes.create_string_buffer(name.encode())


class Harness:
    """A pager over `path` whose layers are LAYER bytes each, all streamed unless `pinned` says otherwise."""

    def __init__(self, path, *, throttle=0.0, depth=2, lag=2, evict_pass=(), map_len=None, streamed=None,
                 readahead=0, owned=False):
        self.f = open(path, "rb")
        size = os.path.getsize(path)
        self.map = mmap.mmap(self.f.fileno(), size if map_len is None else map_len, prot=mmap.PROT_READ)
        self.addr = _address(self.map)
        layers = (native.Range * N_LAYERS)(*[(i * LAYER, LAYER) for i in range(N_LAYERS)])
        flags = (ctypes.c_uint8 * N_LAYERS)(*(streamed or [1] * N_LAYERS))
        ev = (native.Range * max(1, len(evict_pass)))(*evict_pass)
        params = native.PagerParams(depth, lag, throttle, 1, readahead, int(owned))
        self.h = ctypes.c_void_p()
        spec = native.PagerSpec(os.fsencode(path), self.addr, 0, len(self.map), layers, flags, N_LAYERS, None, 0,
                                ev, len(evict_pass), params, ctypes.cast(NAME_FN, ctypes.c_void_p))
        self.code = native.lib.ec_pager_open(ctypes.byref(spec), ctypes.byref(self.h))

    def boundary(self, il: int) -> bool:
        return native.lib.ec_pager_cb_eval(tensor(f"attn_norm-{il}"), False, self.h)

    def close(self):
        native.lib.ec_pager_close(self.h)
        self.map.close()
        self.f.close()


def _address(m: mmap.mmap) -> int:
    import numpy as np
    return np.frombuffer(m, dtype=np.uint8).ctypes.data


@pytest.fixture
def layer_file(disk_dir):
    p = disk_dir / "layers.bin"
    p.write_bytes(os.urandom(N_LAYERS * LAYER))
    with open(p, "rb") as f:
        os.fsync(f.fileno())
    return p


def _ctrl_c(delay: float) -> None:
    """A real SIGINT `delay` seconds from now; wait for Python's KeyboardInterrupt (raised in this thread)."""
    with pytest.raises(KeyboardInterrupt), sigint_after(delay):
        while True:
            time.sleep(0.01)


def _returns(fn, seconds: float = 60.0):
    """fn() returns (in another thread) within `seconds`: a hang fails this test, not the whole run."""
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"{fn} did not return within {seconds} s"


def test_the_owned_residency_reads_into_its_slots_past_the_page_cache(layer_file):
    """Owned: the window's layers are read into slots the pager holds (counted to the byte), with direct reads
    that leave nothing in the page cache, and the pass runs as with the page cache's residency."""
    from edgecad.cgroup import drop_file_cache
    drop_file_cache([layer_file])
    h = Harness(layer_file, depth=1, lag=1, owned=True)  # a window of 3 layers out of 8
    try:
        assert h.code == 0, native.lib.ec_last_error()
        assert native.lib.ec_pager_settle(h.h) == 0
        for _ in range(2):
            for il in range(N_LAYERS):
                assert h.boundary(il)
            assert native.lib.ec_pager_pass_end(h.h) == 0
        s = native.PagerStats()
        assert native.lib.ec_pager_get_stats(h.h, ctypes.byref(s)) == 0
        assert s.owned_bytes == 3 * LAYER and s.direct_reads == 1
        assert s.bytes_read >= 2 * N_LAYERS * LAYER
        assert 0 < s.peak_resident <= 3 * LAYER
        assert native.file_resident(layer_file) == 0  # (the reads bypassed the page cache)
    finally:
        h.close()


def test_lag_0_is_refused(layer_file):
    h = Harness(layer_file, lag=0)
    assert h.code == 1  # EC_EINVAL
    assert "lag must be >= 1" in native.lib.ec_last_error().decode()
    h.map.close(), h.f.close()
    from edgecad.errors import EdgecadError
    from edgecad.plan import PagerParams
    with pytest.raises(EdgecadError, match=r"lag=0 is out of range: use 1 or more"):
        PagerParams(lag=0)


def test_close_stops_a_read_the_storage_stalls(layer_file):
    """Storage at 1 byte/s: the IO thread's second read would take days. Closing the pager stops it at once
    (before: close joined the IO thread, which finished its queued read first; this test's timeout caught it)."""
    h = Harness(layer_file, throttle=1.0)
    assert h.code == 0
    assert native.lib.ec_pager_settle(h.h) == 0  # queues the first window: the second of its reads stalls
    s = native.PagerStats()
    while native.lib.ec_pager_get_stats(h.h, ctypes.byref(s)) == 0 and s.bytes_read < LAYER:
        time.sleep(0.01)  # the first read is done (it set the throttle's next slot days ahead)
    time.sleep(0.1)  # and the IO thread sleeps in the second
    _returns(h.close)


def test_ctrl_c_stops_a_settle_waiting_for_stalled_reads(layer_file):
    """A settle drains the IO queue first; a Ctrl-C stops the stalled read it waits for, and the settle ends."""
    h = Harness(layer_file, throttle=1.0)
    try:
        assert native.lib.ec_pager_settle(h.h) == 0  # a read now stalls in the IO thread
        _ctrl_c(0.3)  # the C handler sets the flag the IO thread reads; Python raises here
        rc = []
        _returns(lambda: rc.append(native.lib.ec_pager_settle(h.h)))  # drains: the stalled read stopped
        assert rc == [0]
    finally:
        native.lib.ec_interrupt_clear()
        h.close()


def test_a_gated_draft_leaves_on_ctrl_c_and_on_close(layer_file):
    """The pipeline's draft waits at the gate while a target pass computes. A pass whose end never came (a
    Ctrl-C between the decode and its end) must not hold the draft forever: Ctrl-C and close release it."""
    for release in ("ctrl-c", "close"):
        h = Harness(layer_file)
        assert native.lib.ec_pager_settle(h.h) == 0 and native.lib.ec_pager_pass_begin(h.h) == 0
        out = []
        NAMED.clear()
        th = threading.Thread(target=lambda: out.append(native.lib.ec_pager_gate_cb_eval(tensor("attn_norm-0"), False,
                                                                                        h.h)), daemon=True)
        th.start()
        assert NAMED.wait(30)  # the draft reached the gate's callback,
        th.join(0.3)
        assert th.is_alive()  # and is held there: the "target" is computing
        try:
            if release == "ctrl-c":
                _ctrl_c(0.1)
            else:
                _returns(h.close)
            th.join(60)
            assert not th.is_alive() and out == [False]  # let go, the draft's graph aborted
        finally:
            native.lib.ec_interrupt_clear()
            if release == "ctrl-c":
                h.close()


def test_an_empty_range_evicts_nothing(layer_file):
    """posix_fadvise reads a length of 0 as 'to the end of the file': an empty per-pass range must not drop
    the page cache of everything after it. (The layers lie outside the mapping here, so they are read into
    the page cache only, where DONTNEED would drop them.)"""
    fd = os.open(layer_file, os.O_RDONLY)  # cold: the settle's reads make page-cache folios within each layer
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    h = Harness(layer_file, evict_pass=[(LAYER, 0)], map_len=mmap.PAGESIZE, streamed=[0] * N_LAYERS)
    try:
        assert h.code == 0 and native.lib.ec_pager_settle(h.h) == 0  # reads every (pinned) layer
        assert native.file_resident(layer_file, LAYER) == (N_LAYERS - 1) * LAYER
    finally:
        h.close()


SIGACTION_CHILD = """
import ctypes, os, signal, sys
class SigAction(ctypes.Structure):  # glibc's struct sigaction on Linux (x86_64, aarch64)
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]
SA_SIGINFO = 4
sa = SigAction(handler=int(sys.argv[1]), flags=SA_SIGINFO)  # 0 = SIG_DFL, 1 = SIG_IGN, with SA_SIGINFO set
assert ctypes.CDLL(None, use_errno=True).sigaction(signal.SIGINT, ctypes.byref(sa), None) == 0
from edgecad import native
from edgecad.cgroup import drop_file_cache
native.lib.ec_interrupt_install()  # an embedding program's handler, whatever Python thinks it is
os.kill(os.getpid(), signal.SIGINT)
print("survived", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"),
                    reason="the child sets SIGINT's action with glibc's struct sigaction layout of 64-bit Linux")
@pytest.mark.parametrize("previous", ["SIG_DFL", "SIG_IGN"])
def test_ctrl_c_chains_to_sig_dfl_and_sig_ign_even_with_sa_siginfo(previous):
    """A program embedding Python may leave SIGINT at SIG_DFL or SIG_IGN with SA_SIGINFO set. The chained
    handler must do what that action says (die of SIGINT; nothing), not call the value 0 or 1 as a function
    (before: SIG_IGN crashed with SIGSEGV, SIG_DFL swallowed the Ctrl-C)."""
    r = subprocess.run([sys.executable, "-c", SIGACTION_CHILD, "0" if previous == "SIG_DFL" else "1"],
                       capture_output=True, text=True, timeout=120)
    if previous == "SIG_DFL":
        assert r.returncode == -signal.SIGINT and "survived" not in r.stdout, (r.returncode, r.stderr)
    else:
        assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr)


def test_a_populate_that_returns_without_reading_is_caught_and_reads_take_over(layer_file):
    """MADV_POPULATE_READ returns success without reading under qemu-user and in some sandboxes. The first
    populate after it is checked with mincore: the pager turns populating off, says so in its stats, and reads
    with pread, so every layer a boundary waits for is in RAM."""
    native.lib.ec_interrupt_clear()  # (a Ctrl-C an earlier test sent must not stop these reads)
    drop_file_cache([layer_file])
    # lag = every layer: nothing is evicted during the pass. (Layers of 64 KB are far smaller than the folios the
    # kernel's readahead makes, and an eviction reaches to its folios' edges, so evicting a neighbour would drop
    # part of the layer being checked: the engine never populates layers that small, docs/paging.md.)
    h = Harness(layer_file, readahead=1, lag=N_LAYERS)
    try:
        assert h.code == 0
        assert native.lib.ec_pager_inject_fault(h.h, native.EC_FAULT_POPULATE_NOOP) == 0  # before the first read
        assert native.lib.ec_pager_settle(h.h) == 0  # reads every layer: the window is the whole file
        for il in range(N_LAYERS):  # a pass: each boundary waits for its layer
            assert h.boundary(il)
            assert native.mem_resident(h.addr + il * LAYER, LAYER) == LAYER, il
        s = native.PagerStats()
        assert native.lib.ec_pager_get_stats(h.h, ctypes.byref(s)) == 0 and s.populate_ignored == 1
    finally:
        h.close()


# ---------------------------------------------------------------------------- platforms

PLATFORMS = ["x86_64-linux-gnu", "aarch64-linux-gnu", "aarch64-linux-musl", "arm-linux-gnueabihf", "aarch64-macos",
             "x86_64-macos"]  # Pi OS / Jetson, Alpine and static builds, 32-bit Pi OS, Macs


@pytest.mark.parametrize("target", PLATFORMS)
def test_the_c_library_compiles_and_links_for_each_platform(target, tmp_path):
    """Cross-compiled with zig's clang (the ziglang package), this project's flags, warnings as errors."""
    pytest.importorskip("ziglang", reason="ziglang (the test extra) is not installed")
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "native"
    r = subprocess.run([sys.executable, "-m", "ziglang", "cc", "-target", target, "-std=gnu11", "-O2", "-fPIC",
                        "-Wall", "-Wextra", "-Werror", "-D_FILE_OFFSET_BITS=64", "-shared", "-o",
                        str(tmp_path / "libedgecad.so"),
                        *[str(root / f) for f in ("common.c", "pager.c", "owned.c", "guard.c", "remote.c")],
                        "-lpthread"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "libedgecad.so").stat().st_size > 10_000


def test_this_platform_s_capabilities():
    caps = native.capabilities()
    assert set(caps) == {"drop_pages", "populate", "load_guard", "find_mapping"}
    if sys.platform.startswith("linux"):
        assert all(caps.values()) and native.can_page()


def _driver(tmp_path, target=None, static=True):
    """native/test_driver.c built natively (the system's cc) or for a target (zig's clang: static with musl, or
    dynamic with glibc); a dynamic build's command line also names the two stand-in libllamas (test_standin.c) the
    load guard is checked on: one importing mmap, one (64-bit file offsets) mmap64."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "native"
    srcs = [str(root / f) for f in ("test_driver.c", "common.c", "pager.c", "owned.c", "guard.c", "remote.c")]
    warn = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
    flags = [*warn, "-D_FILE_OFFSET_BITS=64", f"-I{root}"]
    cc = [os.environ.get("CC", "cc")] if target is None else [sys.executable, "-m", "ziglang", "cc", "-target", target]
    out = tmp_path / f"driver-{target or 'native'}"
    builds = [[*cc, *(["-static"] if target and static else []), *flags, "-o", str(out), *srcs, "-lpthread", "-ldl"]]
    standins = [] if target and static else [tmp_path / "libecstandin.so", tmp_path / "libecstandin64.so"]
    for lib, offset_bits in zip(standins, ([], ["-D_FILE_OFFSET_BITS=64"])):
        builds.append([*cc, *warn, *offset_bits, "-shared", "-fPIC", "-o", str(lib), str(root / "test_standin.c")])
    for cmd in builds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return str(out), [str(p) for p in standins]


CHECKS = {"capabilities", "residency", "paging-exact", "paging-readahead", "large-file", "guard-hook-abi",
          "interrupt-chain"}
EMULATED = {"aarch64": ("aarch64-linux-musl", None), "arm": ("arm-linux-musleabihf", None),
            "aarch64-glibc": ("aarch64-linux-gnu", "/usr/aarch64-linux-gnu"),
            "arm-glibc": ("arm-linux-gnueabihf", "/usr/arm-linux-gnueabihf")}  # arch: (zig target, glibc's root)


@pytest.mark.parametrize("arch", ["native", *EMULATED])
def test_the_c_library_s_own_behaviour_natively_and_under_emulation(tmp_path, arch):
    """The C test driver: capabilities, residency after a drop, exact and populated paging (each layer resident at
    its boundary), a sparse file of 4 GiB + 1 MiB (offsets past 32 bits, and a span of 4 GiB and more, which a
    32-bit size_t cut short), the load guard's mmap hooks called through the prototypes libc's header gives their
    symbols (static builds too: musl's 64-bit off_t on 32-bit ARM), the load guard on a stand-in libllama, the
    SIGINT chain. As aarch64 and 32-bit ARM under qemu-user, whose MADV_POPULATE_READ returns without reading: the
    pager's check catches it and preads (and qemu-user 7's 32-bit mmap cuts offsets to 32 bits: what lies past
    4 GiB is then not mapped, and the driver says so). Static musl builds have no shared objects to patch: their
    guard check says it skipped; the glibc builds (dynamic, run on Debian's cross libc) check the guard under
    emulation too, 32-bit ARM with 64-bit file offsets included, where qemu-user's MAP_POPULATE and WILLNEED read
    nothing: the guard's own counts and the mapped bytes at an offset are checked there, residency natively."""
    import shutil
    from pathlib import Path
    scratch = tmp_path / "scratch"  # (on real storage: a tmpfs page cache cannot be dropped)
    scratch.mkdir()
    if arch == "native":
        driver, standins = _driver(tmp_path)
        cmd = [driver, str(scratch), *standins]
    else:
        qemu_arch = arch.split("-")[0]
        qemu = shutil.which(f"qemu-{qemu_arch}-static") or shutil.which(f"qemu-{qemu_arch}")
        if qemu is None:
            pytest.skip(f"qemu-{qemu_arch}-static is not installed (Debian: apt-get install qemu-user-static)")
        pytest.importorskip("ziglang", reason="ziglang (the test extra) is not installed")
        target, libc = EMULATED[arch]
        if libc and not (Path(libc) / "lib").is_dir():
            pytest.skip(f"no {target} glibc at {libc} (Debian: apt-get install "
                        f"libc6-{'arm64' if qemu_arch == 'aarch64' else 'armhf'}-cross)")
        driver, standins = _driver(tmp_path, target, static=libc is None)
        cmd = [qemu, *(["-L", libc] if libc else []), driver, str(scratch), *standins]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and all(l.startswith("ok ") for l in lines), r.stdout + r.stderr
    found = {l.split(":")[0][3:]: l for l in lines}
    if arch in ("aarch64", "arm"):  # static: no loader, no import slots
        assert set(found) == CHECKS | {"load-guard"}, r.stdout
        assert "skipped: static build" in found["load-guard"]
        return
    assert set(found) == CHECKS | {"load-guard-mmap", "load-guard-mmap64"}, r.stdout
    if arch == "native":  # a real pass: residency shows what the guard dropped
        for name in ("load-guard-mmap", "load-guard-mmap64"):
            assert "guarded mapping 0 of" in found[name] and "not compared" not in found[name], found[name]


def test_openmp_workers_spin_through_a_layer_boundary_unless_the_user_says(tmp_path):
    """edgecad sets GOMP_SPINCOUNT before llama.cpp loads libgomp (docs/paging.md: a paged pass's compute); a value
    the user set stays."""
    code = "import os, edgecad; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    mine = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True,
                            text=True, timeout=120)
    assert mine.stdout.split() == ["1000000"], mine.stderr[-2000:]
    assert theirs.stdout.split() == ["5"], theirs.stderr[-2000:]
