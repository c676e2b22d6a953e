"""What this device measures, before planning (edgecad.plan is pure) and while running: the memory it may use,
the process's own size, the storage's read speed and readahead, what a process read from storage, and the learnt
costs kept across runs (~/.cache/edgecad/costs.json)."""
from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import psutil

from . import cgroup, native
from .gguf_file import GGUFInfo
from .plan import BudgetPlan, Costs, Device, MemoryPlan, PagerParams, costs_from_dict, observe, plan_budget
from .plan.units import MB, MiB

# ---------------------------------------------------------------------------- memory

def process_rss() -> int:
    return psutil.Process().memory_info().rss


def margin(n: int) -> int:
    """What a budget keeps under the memory it was made from: 2% (at least 32 MB), for the kernel's own charges
    (page tables, slab)."""
    return int(max(32 * MB, 0.02 * n))


def memory_room() -> tuple[int, str]:
    """(bytes, what set them) of the memory this engine may use now: the smaller of what the system has available
    (plus the anonymous memory this process already holds: its file pages are in "available" already) and its
    cgroup's tightest limit, hard or soft (edgecad.cgroup.tightest), less the margin. Cheap (a few small files):
    the engine reads it between passes (edgecad.follow). The limit is the cgroup's whole: other processes in the
    same cgroup are not subtracted."""
    mi = psutil.Process().memory_info()
    n, why = psutil.virtual_memory().available + mi.rss - getattr(mi, "shared", 0), "available memory"
    lim = cgroup.tightest()
    if lim is not None and lim[0] < n:
        n, why = lim[0], f"cgroup {lim[1]}"
    return n - margin(n), why


def auto_budget() -> int:
    """memory_budget="auto": the memory this engine may use now (memory_room)."""
    return memory_room()[0]


PSI_MEMORY = Path("/proc/pressure/memory")


def memory_pressure() -> Optional[float]:
    """The kernel's memory pressure (PSI): the share of the last 10 s in which some task waited for memory, in %;
    None where the kernel has no PSI (CONFIG_PSI off, or psi=0)."""
    try:
        some = PSI_MEMORY.read_text().splitlines()[0]
        return float(dict(f.split("=") for f in some.split()[1:])["avg10"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------- storage

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


def read_bandwidth(path: Path, offset: int = 0, length: Optional[int] = None) -> float:
    """Sequential read speed of a file range after dropping it from the page cache, bytes/s."""
    out = ctypes.c_double()
    length = os.path.getsize(path) - offset if length is None else length
    native.check(native.lib.ec_read_bandwidth(os.fsencode(path), offset, length, ctypes.byref(out)), "ec_read_bandwidth")
    return out.value


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


# ---------------------------------------------------------------------------- learnt costs

def cache_dir() -> Path:
    """edgecad's cache directory: EDGECAD_CACHE, else $XDG_CACHE_HOME/edgecad (default ~/.cache/edgecad)."""
    return Path(os.environ.get("EDGECAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                                os.path.expanduser("~/.cache"), "edgecad"))


def _cache_path() -> Path:
    return cache_dir() / "costs.json"


def _cache_key(target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> str:
    name = lambda i: f"{i.path.name}:{i.file_size}" if i is not None else "-"
    return f"{name(target)}|{name(draft)}|{os.cpu_count()}cpu|{n_threads}t"


def load_costs(target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> Costs:
    """This device's learnt costs for the pair (checked: plan.costs_from_dict), or the priors."""
    try:
        d = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return Costs()
    return costs_from_dict(d.get(_cache_key(target, draft, n_threads)) if isinstance(d, dict) else None)


def save_costs(costs: Costs, target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> None:
    """Best effort: a read-only cache directory only loses the calibration."""
    p = _cache_path()
    try:
        data = json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    data[_cache_key(target, draft, n_threads)] = asdict(costs)
    try:
        _write(p, data)
    except OSError:
        pass


def _write(p: Path, data: dict) -> None:
    """The cache file replaced whole (a reader never sees half of it)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)


def learn(costs: Costs, stats: dict, plan: MemoryPlan, target: GGUFInfo, draft: Optional[GGUFInfo],
          n_threads: int, gpu: tuple[bool, bool] = (False, False)) -> Costs:
    """The costs corrected by a completion's `edgecad` stats (plan.observe), saved for the next engine. target: as
    this device holds it (its local part with remote devices). A phase whose thread waits on another device (the
    target's passes with remote devices or target layers on a GPU, the drafting on a GPU: gpu = (target, draft)) has
    little CPU time while it is not starved at all, so only the other phase is judged."""
    if plan.remote is not None or gpu[0]:
        stats = {**stats, "cpu_target_seconds": None}
    if gpu[1]:
        stats = {**stats, "cpu_draft_seconds": None}
    new = observe(costs, stats, speculative=plan.speculative, target_bytes=target.pass_bytes,
                  streamed=plan.paging.streamed_bytes if plan.paging is not None else 0,
                  draft_bytes=draft.file_size if draft is not None else 0)
    if new is not costs:
        save_costs(new, target, draft, n_threads)
    return new


def reset_costs(target: Optional[GGUFInfo] = None, draft: Optional[GGUFInfo] = None,
                n_threads: int = 0) -> tuple[Path, int]:
    """Forget learnt costs: the pair's on this device (with `n_threads`), or with no target all of them (the
    cache file goes; so does a file that is not a cache's). Returns (the cache file, entries removed); OSError
    where the file cannot be read or changed."""
    p = _cache_path()
    if not p.exists():
        return p, 0
    try:
        data = json.loads(p.read_text())
    except ValueError:
        data = None
    if target is None or not isinstance(data, dict):
        p.unlink()
        return p, len(data) if isinstance(data, dict) else 1
    if data.pop(_cache_key(target, draft, n_threads), None) is None:
        return p, 0
    _write(p, data)
    return p, 1


READ_SAMPLE = 256 * 1_000_000  # bytes of the target read to measure the storage


def measure_read(costs: Costs, target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> Costs:
    """The costs with the storage's read bandwidth measured on the target's tensor data (dropped from the page
    cache first), kept in this device's cache: done once per device and model (the engine, `edgecad doctor`)."""
    costs = replace(costs, read_bps=read_bandwidth(target.path, target.data_offset,
                                                   min(READ_SAMPLE, target.file_size - target.data_offset)),
                    read_measured=True)
    save_costs(costs, target, draft, n_threads)
    return costs


def device(target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int, *, may_page: bool, calibrate: bool = True,
           local: Optional[GGUFInfo] = None) -> Device:
    """All the plan needs of this device, measured now: the process's size, the learnt costs (the storage's read
    speed measured first when the plan may page and this device has not measured it: `calibrate`), the storage's
    readahead, whether this build can page. local: the target's part this device holds when remote devices hold
    the rest (its own costs: passes also compute remotely; the whole target's on first use)."""
    costs = load_costs(target, draft, n_threads)  # keyed by the pair given, whatever runs
    if calibrate and may_page and not costs.read_measured:
        costs = measure_read(costs, target, draft, n_threads)
    remote_costs = None
    if local is not None:
        remote_costs = load_costs(local, draft, n_threads)
        if not remote_costs.observed and not remote_costs.read_measured:
            remote_costs = replace(costs, observed=0)
    return Device(process_rss(), costs, read_ahead_bytes(target.path), native.can_page(), remote_costs)


def paging_plan(info: GGUFInfo, budget: int, params: PagerParams = PagerParams()) -> BudgetPlan:
    """The target's paging plan on this device's storage (plan_budget with its readahead): for callers that plan
    the paging alone (the bench's paging rows, tests)."""
    return plan_budget(info, budget, params, readahead=read_ahead_bytes(info.path))
