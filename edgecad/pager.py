"""The native pager's Python side: the target streamed through a window inside its share of the budget, as the
paging plan says (edgecad.plan.paging).

The target stays memory-mapped by llama.cpp (no weight repacking). At each layer boundary (llama.cpp's cb_eval, in
C: native/pager.c) the IO thread reads ahead and evicts the layer `lag` behind: by default into slots of memory the
pager owns, read with direct IO, the weights pointed there (native/owned.c); else through the page cache.
llama.cpp's loader would read the whole file (mmap with MAP_POPULATE, then POSIX_MADV_WILLNEED): `lazy_load` turns
both off for the paged target while it loads (native/guard.c), so a load reads the header and the pager then reads
what the plan keeps.
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import llama_cpp as C

from . import native
from .errors import EdgecadError, NativeError
from .gguf_file import GGUFInfo, block_of
from .plan import BudgetPlan

_lib = native.lib


def file_mappings(path: Path) -> set:
    """{(address, file offset, length)} of every mapping of `path` in this process (/proc/self/maps)."""
    st = os.stat(path)
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        raise EdgecadError("paging needs Linux (/proc/self/maps); run without memory_budget here") from None
    out = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or int(parts[4]) != st.st_ino:
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        if os.makedev(major, minor) == st.st_dev:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.add((lo, int(parts[2], 16), hi - lo))
    return out


def finds_mappings() -> bool:
    """Whether this platform tells where llama.cpp mapped a file (/proc/self/maps: Linux, Android). Without it
    (macOS) only the owned residency pages, learning the mapping from the weights' own buffer (native/owned.c)."""
    return native.capabilities()["find_mapping"]


def new_mapping(path: Path, before: Optional[set]) -> tuple[int, int, int]:
    """The mapping of `path` that appeared since `before`: the one llama.cpp just made for this
    model (another Model of the same file, or a gguf reader, has its own). (0, 0, 0) where the platform cannot
    tell (before is None: finds_mappings)."""
    if before is None:
        return 0, 0, 0
    new = file_mappings(path) - before
    if len(new) != 1:
        raise NativeError(f"cannot tell llama.cpp's mapping of {path} apart ({len(new)} new mappings): "
                          "was the model loaded with mmap?")
    return new.pop()


@dataclass
class LazyLoad:
    """What `lazy_load` did."""
    applied: bool = False       # llama.cpp mapped the file without reading it
    reason: str = ""            # why not, when not applied
    populate_dropped: int = 0   # mmap calls whose MAP_POPULATE was dropped
    willneed_dropped: int = 0   # bytes of POSIX_MADV_WILLNEED advice not given


_guard_lock = threading.Lock()  # the C guard is process-wide: one load at a time under it


@contextmanager
def lazy_load(path: Path, enabled: bool = True):
    """While llama.cpp loads `path` in this block, it maps the file without reading it: llama.cpp would
    read a model whole at load (MAP_POPULATE, POSIX_MADV_WILLNEED; hard-coded on), the pager reads only
    what the plan keeps. libllama's mmap/posix_madvise import slots are patched for the block and restored
    after. Where that cannot apply (not Linux, a libllama without those slots), or with EDGECAD_LOAD_GUARD=0,
    the load reads the file whole as before and `.reason` says why. Yields a LazyLoad."""
    out = LazyLoad()
    if not enabled:
        out.reason = "not paged"
    elif os.environ.get("EDGECAD_LOAD_GUARD", "1") == "0":
        out.reason = "EDGECAD_LOAD_GUARD=0"
    if out.reason:
        yield out
        return
    with _guard_lock:
        code = _lib.ec_load_guard_begin(os.fsencode(path), os.fsencode(C.llama_cpp._lib._name))
        if code:
            out.reason = _lib.ec_last_error().decode(errors="replace")
            yield out
            return
        out.applied = True
        st = native.GuardStats()
        try:
            yield out
        except BaseException:
            _lib.ec_load_guard_end(ctypes.byref(st))  # restore the slots; the load's own error is the one raised
            raise
        native.check(_lib.ec_load_guard_end(ctypes.byref(st)), "ec_load_guard_end")
        out.populate_dropped, out.willneed_dropped = st.populate_dropped, st.willneed_dropped


def mincore_sees(path: str | os.PathLike) -> bool:
    """Whether mincore() tells this process which pages of the file are in RAM. Since Linux 5.2 it does only for
    a file the process owns or may write (mm/mincore.c, can_do_mincore: a side channel otherwise); for any other
    file it reports every page resident, so residency figures would be false (measured: a root-owned 0644 file
    read by another user, 2048/2048 pages "resident" right after a cache drop)."""
    try:
        return (os.geteuid() == 0 or os.stat(path).st_uid == os.geteuid()  # (root: CAP_FOWNER)
                or os.access(path, os.W_OK, effective_ids=True))
    except OSError:
        return False


class Pager:
    """The native pager of one loaded target model; `cb_eval` goes into its context params."""

    def __init__(self, model, info: GGUFInfo, plan: BudgetPlan, mapping: tuple[int, int, int]):
        """model: the loaded edgecad.llama.Model whose file this pager streams; it closes the pager before it
        frees its mapping (the IO thread must never advise an address llama.cpp no longer maps).
        mapping: (address, file offset, length) of llama.cpp's mapping of this model (new_mapping)."""
        self.path, self.plan, self._h = Path(model.path), plan, None
        addr, map_off, map_len = mapping
        ranges = {l.index: l for l in info.layers()}
        n = max(ranges) + 1
        layers = (native.Range * n)(*[(ranges[i].start, ranges[i].n_bytes) if i in ranges else (0, 0) for i in range(n)])
        streamed = (ctypes.c_uint8 * n)(*[int(i in plan.streamed_layers) for i in range(n)])
        pinned = (native.Range * max(1, len(plan.pinned)))(*[(o, b) for _, o, b in plan.pinned])
        per_pass = (native.Range * max(1, len(plan.evict_each_pass)))(*[(o, b) for _, o, b in plan.evict_each_pass])
        pp, owned = plan.params, plan.params.memory == "owned"
        sees = pp.measure and mincore_sees(self.path)  # (else residency would read as "all of it")
        # owned: what the pager holds is counted exactly, mincore or not (only the per-pass rows are the cache's)
        self.measured = owned or sees
        params = native.PagerParams(pp.read_ahead, pp.lag, pp.bytes_per_second, int(sees),
                                    int(plan.readahead_bytes > 0), int(owned))
        # owned: every weight the pager holds, by block (a layer, or pinned range i as block n + i); the token
        # embeddings read by row stay the mapping's
        block = {name: n + i for i, (name, _, _) in enumerate(plan.pinned)}
        block.update((t.name, block_of(t.name)) for t in info.tensors if block_of(t.name) in ranges)
        weights = [(t.name.encode(), t.offset, block[t.name]) for t in info.tensors if owned and t.name in block]
        self._tensors = (native.Tensor * max(1, len(weights)))(*weights)  # (C copies the names; kept for the call)
        self.n_weights = len(weights)  # the weights the owned residency holds (0: the page cache's)
        spec = native.PagerSpec(os.fsencode(self.path), addr, map_off, map_len, layers, streamed, n, pinned,
                                len(plan.pinned), per_pass, len(plan.evict_each_pass), params, native.ggml_get_name_address,
                                self._tensors, len(weights))
        h = ctypes.c_void_p()
        native.check(_lib.ec_pager_open(ctypes.byref(spec), ctypes.byref(h)), "ec_pager_open")
        self._h = h
        model.close_first(self)
        self.cb_eval = C.ggml_backend_sched_eval_callback(native.pager_cb_eval_address)
        # the draft context's cb_eval when it drafts during target passes (with user data `handle`)
        self.gate_cb_eval = C.ggml_backend_sched_eval_callback(native.gate_cb_eval_address)
        self.settle()

    @property
    def handle(self) -> ctypes.c_void_p:
        return self._h

    def settle(self) -> None:
        """Back to the state after load: read the pinned layers, evict the streamed ones (and whatever a
        whole-file load read), start reading the first window. Also clears an IO error. (The Ctrl-C flag is
        cleared by whoever starts the work: an Engine's load, a completion.)"""
        native.check(_lib.ec_pager_settle(self._h), "ec_pager_settle", self.path)

    def recover(self) -> None:
        """Before a completion: end a pass that a Ctrl-C left open (a gated draft would wait for its end), and
        after an IO error or an interrupted read (raised by the pass that met it), settle again."""
        self.end_pass()
        if _lib.ec_pager_error(self._h):
            self.settle()

    def inject_fault(self, code: int = native.EC_EIO) -> None:
        """Tests: make the next read fail as a failing storage would (or, with native.EC_FAULT_POPULATE_NOOP,
        make MADV_POPULATE_READ return without reading from now on)."""
        native.check(_lib.ec_pager_inject_fault(self._h, code), "ec_pager_inject_fault")

    def set_throttle(self, bytes_per_second: float) -> None:
        """Change the storage throttle now (0 = none). Tests stall the storage with it."""
        native.check(_lib.ec_pager_set_throttle(self._h, bytes_per_second), "ec_pager_set_throttle")

    def begin_pass(self) -> None:
        """Before a target decode the draft runs beside: the gate holds the draft until the pass waits."""
        native.check(_lib.ec_pager_pass_begin(self._h), "ec_pager_pass_begin")

    def end_pass(self) -> None:
        """Release a gated draft; read the next pass's first window early (idempotent)."""
        _lib.ec_pager_pass_end(self._h)

    def after_pass(self) -> None:
        """After every target decode: end_pass, and raise if the IO thread failed (the graph was aborted, logits
        are invalid) or a Ctrl-C stopped the pass (the pager then settles before the next completion)."""
        self.end_pass()
        self.check()

    def check(self) -> None:
        """Raise if the IO thread failed."""
        # (a Ctrl-C that stopped a read raises KeyboardInterrupt: the next completion settles again)
        native.check(_lib.ec_pager_error(self._h), f"the pager reading {self.path}", self.path)

    def stats(self) -> dict:
        s = native.PagerStats()
        native.check(_lib.ec_pager_get_stats(self._h, ctypes.byref(s)), "ec_pager_get_stats")
        return {k: getattr(s, k) for k, _ in native.PagerStats._fields_}

    def reset_peak(self) -> None:
        _lib.ec_pager_reset_peak(self._h)

    def close(self) -> None:
        if self._h:
            _lib.ec_pager_close(self._h)
            self._h = None

    def __del__(self):
        self.close()
