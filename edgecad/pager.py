"""Paging the target inside a memory budget: budget parsing, the budget plan, the native pager.

The target stays memory-mapped by llama.cpp (no weight repacking). The plan pins what every
pass touches (output matrix, norms; the embeddings when the output is tied to them) and as
many whole layers as fit; the other layers stream through a window: at each layer boundary
(llama.cpp's cb_eval, in C) the IO thread reads ahead and evicts the layer `lag` behind.
llama.cpp's loader would read the whole file (mmap with MAP_POPULATE, then POSIX_MADV_WILLNEED):
`lazy_load` turns both off for the paged target while it loads (native/guard.c),
so a load reads the header and the pager then reads what the plan keeps.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import llama_cpp as C

from . import native
from .devices import ggml_lib
from .errors import EdgecadError, NativeError
from .gguf_file import GGUFInfo

STORAGE_PROFILES = {  # bytes per second the IO thread may read; 0 = as fast as the device goes
    "native": 0.0,
    "nvme": 2e9,   # NVMe SSD (Jetson, laptops)
    "ufs": 1e9,    # UFS flash (phones)
    "sd": 45e6,    # SD card (Raspberry Pi)
}
MiB = 1 << 20


@dataclass(frozen=True)
class PagerParams:
    io: str = "prefetch"     # "prefetch": read `depth` streamed layers ahead; "demand": read a layer when it is needed
    depth: int = 2           # read-ahead window, in streamed layers (prefetch only)
    lag: int = 1             # evict the streamed layer `lag` (>= 1) behind the current one: 1, the layer that just
                             # ran, holds the budget as 2 did since eviction reaches into folios (docs/paging.md);
                             # 0 would evict the layer about to run
    storage: str = "native"  # storage profile emulated by throttling the IO thread (STORAGE_PROFILES)
    throttle_bps: Optional[float] = None  # explicit throttle in bytes/s; overrides the profile
    measure: bool = True     # mincore residency at every layer boundary (peak_resident_target_bytes)
    embd_allowance: int = 4 * MiB  # budget kept for token-embedding rows read by a pass (untied output)

    def __post_init__(self):
        if self.io not in ("prefetch", "demand"):
            raise EdgecadError(f"unknown IO mode {self.io!r}: use 'prefetch' or 'demand'")
        if self.storage not in STORAGE_PROFILES:
            raise EdgecadError(f"unknown storage profile {self.storage!r}: use one of {', '.join(STORAGE_PROFILES)}")
        if self.depth < 0:
            raise EdgecadError(f"pager depth={self.depth} is out of range: use 0 (demand) or more layers of read-ahead")
        if self.lag < 1:
            raise EdgecadError(f"pager lag={self.lag} is out of range: use 1 or more (lag 0 would evict the layer "
                               "about to run)")

    @property
    def read_ahead(self) -> int:
        return self.depth if self.io == "prefetch" else 0

    @property
    def window_layers(self) -> int:
        """Streamed layers that may be resident at once: the current one, the read-ahead and the lag."""
        return self.read_ahead + self.lag + 1

    @property
    def bytes_per_second(self) -> float:
        return float(self.throttle_bps if self.throttle_bps is not None else STORAGE_PROFILES[self.storage])


# ---------------------------------------------------------------------------- budget

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": MiB,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30}


def parse_size(s: str) -> Optional[int]:
    """Bytes of a size such as "450MB", "1.5GiB", "2k" or "123"; None when `s` is not a size."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s.strip().lower())
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m and m.group(2) in _UNITS else None


def parse_budget(value: Union[int, float, str, None], file_size: int) -> Optional[int]:
    """Bytes of the target that may be resident (target_budget): what edgecad.memory.parse_memory reads, a share
    such as "40%" being of the target file. None = no budget."""
    from .memory import parse_memory  # (memory plans with this module's plan_budget)
    return None if value is None else parse_memory(value, file_size)


@dataclass
class BudgetPlan:
    budget: int                 # bytes of the target that may be resident
    file_size: int
    pinned: list                # [(name, offset, length)] non-layer tensors kept resident
    evict_each_pass: list       # [(name, offset, length)] dropped after every pass (embedding rows)
    pinned_layers: list         # layer indices kept resident
    streamed_layers: list       # layer indices read and evicted every pass
    layer_bytes: dict           # layer index -> bytes
    window_bytes: int           # reserved for the streaming window, and the partial pages eviction leaves
    minimum: int                # the smallest budget that works: essentials + window
    params: PagerParams = field(default_factory=PagerParams)
    readahead_bytes: int = 0    # kernel readahead kept on the pager's reads (reserved in the window); 0 = exact

    @property
    def resident_all(self) -> bool:
        return not self.streamed_layers

    @property
    def pinned_bytes(self) -> int:
        return sum(n for _, _, n in self.pinned) + sum(self.layer_bytes[i] for i in self.pinned_layers)

    @property
    def reads_every_pass(self) -> bool:
        """The streamed layers do not all fit the window: every pass reads them (else they stay resident)."""
        return len(self.streamed_layers) >= self.params.window_layers

    @property
    def streamed_bytes(self) -> int:
        return sum(self.layer_bytes[i] for i in self.streamed_layers)

    def describe(self) -> str:
        mb = lambda n: f"{n / 1e6:,.1f} MB"
        lines = [f"budget          {mb(self.budget)} of a {mb(self.file_size)} model "
                 f"({100 * self.budget / self.file_size:.0f}%), minimum {mb(self.minimum)}"]
        if self.resident_all:
            lines.append("plan            everything fits: the whole model stays resident, nothing is streamed")
            return "\n".join(lines)
        lines += [
            "pinned          " + ", ".join(f"{n} {mb(b)}" for n, _, b in self.pinned),
            f"pinned layers   {len(self.pinned_layers)} ({mb(sum(self.layer_bytes[i] for i in self.pinned_layers))}): "
            f"{_ranges(self.pinned_layers)}",
            f"streamed layers {len(self.streamed_layers)} ({mb(self.streamed_bytes)} read per pass): "
            f"{_ranges(self.streamed_layers)}",
            f"window          {self.params.window_layers} layers reserved ({mb(self.window_bytes)}): "
            f"read-ahead {self.params.read_ahead}, eviction lag {self.params.lag}, IO {self.params.io}, "
            + (f"kernel readahead {mb(self.readahead_bytes)}" if self.readahead_bytes else "exact reads"),
        ]
        if self.evict_each_pass:
            lines.append("per pass        " + ", ".join(f"{n} rows (dropped after each pass, "
                                                       f"{mb(self.params.embd_allowance)} allowed)"
                                                       for n, _, _ in self.evict_each_pass))
        return "\n".join(lines)


def _ranges(idx: list) -> str:
    if not idx:
        return "none"
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def read_ahead_bytes(path: Path) -> int:
    """The kernel's readahead window for the device holding `path` (read_ahead_kb), 8 MiB if unknown."""
    try:
        dev = os.stat(path).st_dev
        q = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        f = q / "queue" / "read_ahead_kb"
        if not f.exists():
            f = q.resolve().parent / "queue" / "read_ahead_kb"  # a partition: its disk's queue
        return int(f.read_text()) * 1024
    except (OSError, ValueError):
        return 8 * MiB


def plan_budget(info: GGUFInfo, budget: int, params: PagerParams = PagerParams()) -> BudgetPlan:
    """Pin the essentials and as many leading layers as fit; stream the rest through the window."""
    layers = info.layers()
    layer_bytes = {l.index: l.n_bytes for l in layers}
    pinned, per_pass = [], []
    for t in info.non_layer_tensors():
        if t.name == "token_embd.weight" and not info.tied_output:
            per_pass.append((t.name, t.offset, t.n_bytes))  # read by row: a few pages per token
        else:
            pinned.append((t.name, t.offset, t.n_bytes))
    essentials = sum(n for _, _, n in pinned) + sum(min(params.embd_allowance, n) for _, _, n in per_pass)
    total_layers = sum(layer_bytes.values())
    # Eviction drops whole pages only: a streamed layer keeps the partial pages it shares with its
    # neighbours in the file, at most two each; and the kernel's readahead on the pager's reads may
    # bring in up to read_ahead_kb past a range.
    largest = max(layer_bytes.values(), default=0)
    ra = read_ahead_bytes(info.path)
    ra = ra if largest >= 2 * ra else 0  # small layers: exact reads, no readahead (see docs/paging.md)
    slack = 2 * mmap.PAGESIZE * len(layers) + ra
    window = min(params.window_layers, len(layers)) * largest + slack
    plan = BudgetPlan(budget, info.file_size, pinned, per_pass, [], [], layer_bytes, window, essentials + window,
                      params, ra)
    if sum(n for _, _, n in pinned + per_pass) + total_layers <= budget:  # the whole model fits
        plan.pinned_layers = sorted(layer_bytes)
        return plan
    if budget < plan.minimum:
        raise EdgecadError(
            f"target budget {budget / 1e6:,.1f} MB is below the minimum of {plan.minimum / 1e6:,.1f} MB for "
            f"{info.path.name} (pinned output and norms {essentials / 1e6:,.1f} MB + a window of "
            f"{params.window_layers} layers {window / 1e6:,.1f} MB): give a target_budget of at least "
            f"{plan.minimum / 1e6:,.0f} MB"
        )
    room = budget - plan.minimum
    for l in layers:  # leading layers first: their compute overlaps the reads of the streamed ones
        if layer_bytes[l.index] <= room and len(plan.pinned_layers) < len(layers) - 1:
            plan.pinned_layers.append(l.index)
            room -= layer_bytes[l.index]
        else:
            break
    plan.streamed_layers = [l.index for l in layers if l.index not in plan.pinned_layers]
    return plan


# ---------------------------------------------------------------------------- native pager

_lib = native.lib


def _ggml_get_name() -> int:
    """Address of ggml_get_name in the libggml-base that llama_cpp loaded."""
    return ctypes.cast(ggml_lib("ggml-base").ggml_get_name, ctypes.c_void_p).value


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


def new_mapping(path: Path, before: set) -> tuple[int, int, int]:
    """The mapping of `path` that appeared since `before`: the one llama.cpp just made for this
    model (another Model of the same file, or a gguf reader, has its own)."""
    new = file_mappings(path) - before
    if len(new) != 1:
        raise NativeError(f"cannot tell llama.cpp's mapping of {path} apart ({len(new)} new mappings): "
                          "was the model loaded with mmap?")
    return new.pop()


def read_bandwidth(path: Path, offset: int = 0, length: Optional[int] = None) -> float:
    """Sequential read speed of a file range after dropping it from the page cache, bytes/s."""
    out = ctypes.c_double()
    length = os.path.getsize(path) - offset if length is None else length
    native.check(_lib.ec_read_bandwidth(os.fsencode(path), offset, length, ctypes.byref(out)), "ec_read_bandwidth")
    return out.value


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


def storage_bytes_read(since: Optional[int] = None) -> Optional[int]:
    """Bytes this process has read from storage so far, or since an earlier reading `since`
    (/proc/self/io read_bytes: page-cache hits do not count); None where the kernel does not say."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1]) - (since or 0)
    except (OSError, ValueError):
        pass
    return None


def emulate_storage(bytes_read: Optional[int], since: float, bytes_per_second: float) -> float:
    """Sleep until `bytes_read` bytes read from storage since perf_counter() `since` have taken as long as
    at `bytes_per_second` (a --storage profile, for reads the throttled pager does not make: model loads).
    Returns the seconds slept."""
    if not bytes_per_second or not bytes_read:
        return 0.0
    wait = bytes_read / bytes_per_second - (time.perf_counter() - since)
    if wait > 0:
        time.sleep(wait)
    return max(wait, 0.0)


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
        pp = plan.params
        self.measured = pp.measure and mincore_sees(self.path)  # (else residency would read as "all of it")
        params = native.PagerParams(pp.read_ahead, pp.lag, pp.bytes_per_second, int(self.measured),
                                    int(plan.readahead_bytes > 0))
        spec = native.PagerSpec(os.fsencode(self.path), addr, map_off, map_len, layers, streamed, n, pinned,
                                len(plan.pinned), per_pass, len(plan.evict_each_pass), params, _ggml_get_name())
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
