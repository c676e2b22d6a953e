"""Run a command alone in a memory cgroup of a given size: the bench's equal-device-memory rows.

`MemoryCgroup(limit)` makes a cgroup (v1 `memory` hierarchy, or v2 with the memory controller),
`run(cmd)` starts the command inside it (the child joins before it execs), and after it exits
gives the cgroup's peak memory (page cache included, as the kernel charges it) and whether the
limit killed it. `drop_file_cache(paths)` evicts model files from the page cache first, so every
row starts cold. Where no cgroup can be made (no permission, no controller), `available()` says why.
`CpuQuota(share)` starves a running process of CPU (a cgroup's quota), as busy neighbours would: the tests of
what starved passes teach the learnt costs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from . import native
from .pager import mincore_sees

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def _v2_root() -> Optional[Path]:
    """A v2 directory where children get the memory controller, or None."""
    try:
        if "memory" in (V2 / "cgroup.subtree_control").read_text().split():
            return V2
    except OSError:
        pass
    return None


def available() -> tuple[bool, str]:
    """(memory cgroups can be made here, and if not, why)."""
    try:
        MemoryCgroup(1 << 30, "probe").close()
        return True, ""
    except OSError as e:
        return False, (f"cannot create a memory cgroup ({e.strerror or e}): run as root, or where the cgroup v2 "
                       "memory controller is delegated to you")


class _Cgroup:
    """A cgroup this process made (its directory: path); `close()` removes it."""
    path: Path

    def close(self) -> None:
        for _ in range(50):  # the exited child may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MemoryCgroup(_Cgroup):
    """One memory cgroup with a hard limit."""

    def __init__(self, limit_bytes: int, name: str = "bench"):
        self.limit = int(limit_bytes)
        self.v1 = V1.is_dir() and os.access(V1, os.W_OK)
        root = V1 if self.v1 else _v2_root()
        if root is None:
            raise OSError("no writable cgroup memory controller")
        self.path = root / f"edgecad-{name}-{os.getpid()}-{time.monotonic_ns()}"
        self.path.mkdir()
        try:
            if self.v1:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
                try:  # no swap beyond the limit either (absent when swap accounting is off)
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
                except OSError:
                    pass
            else:
                (self.path / "memory.max").write_text(str(self.limit))
                try:  # absent without swap accounting
                    (self.path / "memory.swap.max").write_text("0")
                except OSError:
                    pass
        except OSError:
            self.close()
            raise

    def set_limits(self, hard: Optional[int] = None, soft: Optional[int] = None) -> None:
        """Move the limits while the command runs (None: that one stays), as a manager does: the soft limit (v1
        memory.soft_limit_in_bytes, v2 memory.high) first when it falls. OSError where the kernel refuses: a v1
        hard limit cannot fall under what the cgroup holds (EBUSY); v2 kills instead."""
        hard_file, soft_file = LIMIT_FILES[self.v1]
        if soft is not None:
            (self.path / soft_file).write_text(str(soft))
        if hard is not None:
            swap = "memory.memsw.limit_in_bytes" if self.v1 else None
            up = hard > self.limit
            if swap and up and (self.path / swap).exists():  # (v1: memory + swap >= memory, raised first)
                (self.path / swap).write_text(str(hard))
            (self.path / hard_file).write_text(str(hard))
            if swap and not up and (self.path / swap).exists():
                (self.path / swap).write_text(str(hard))
            self.limit = hard

    def _join(self) -> None:  # runs in the child between fork and exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def start(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        """The command, started inside this cgroup."""
        return subprocess.Popen(list(cmd), preexec_fn=self._join, **kw)

    def run(self, cmd: Sequence[str], timeout: Optional[float] = None, **kw) -> subprocess.CompletedProcess:
        self.timed_out = False
        p = self.start(cmd, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            p.kill()
            out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    @property
    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    @property
    def events(self) -> dict:
        """The cgroup's memory events (v2: max, oom, oom_kill, ...; v1: oom_kill from memory.oom_control)."""
        try:
            text = (self.path / ("memory.oom_control" if self.v1 else "memory.events")).read_text()
            return {k: int(v) for k, _, v in (line.partition(" ") for line in text.splitlines()) if v.isdigit()}
        except OSError:
            return {}

    @property
    def oom_kills(self) -> int:
        return self.events.get("oom_kill", 0)


class CpuQuota(_Cgroup):
    """One CPU cgroup whose processes may run `share` of one core (v1 cpu.cfs_quota_us per cpu.cfs_period_us, v2
    cpu.max), in periods of `period_us`; `join(pid)` moves a running process in, all its threads. close() removes
    it once its processes have left (exited). OSError where none can be made (no permission, no controller)."""

    def __init__(self, share: float, period_us: int = 10_000, name: str = "test"):
        v1 = Path("/sys/fs/cgroup/cpu")
        if v1.is_dir() and os.access(v1, os.W_OK):
            root = v1
        elif "cpu" in _read(V2 / "cgroup.subtree_control").split():
            root = V2
        else:
            raise OSError("no writable cgroup cpu controller")
        self.path = root / f"edgecad-{name}-{os.getpid()}-{time.monotonic_ns()}"
        self.path.mkdir()
        quota = max(1000, int(share * period_us))  # (the kernel's smallest quota: 1 ms)
        try:
            if root == v1:
                (self.path / "cpu.cfs_period_us").write_text(str(period_us))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {period_us}")
        except OSError:
            self.close()
            raise

    def join(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def killed_by_limit(returncode: int, cg: MemoryCgroup) -> bool:
    """The memory limit killed the command (not a timeout)."""
    return cg.oom_kills > 0 or (returncode == -signal.SIGKILL and not getattr(cg, "timed_out", False))


def drop_file_cache(paths: Sequence[os.PathLike]) -> Optional[int]:
    """Evict files from the page cache. Returns the bytes of them that stay there: the pages a running process maps
    cannot be dropped (measured with mincore; None where this process cannot see them: pager.mincore_sees)."""
    left = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left = None if left is None or not mincore_sees(p) else left + native.file_resident(p)
    return left


def own_cgroups() -> list[tuple[Path, list[str], bool]]:
    """(hierarchy root, path parts, is v1) of this process's memory cgroups, from /proc/self/cgroup."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        parts = [p for p in path.split("/") if p]
        if "memory" in ctrls.split(","):
            out.append((V1, parts, True))
        elif hid == "0" and ctrls == "":
            out.append((V2 if (V2 / "cgroup.controllers").exists() else V2 / "unified", parts, False))
    return out


LIMIT_FILES = {True: ("memory.limit_in_bytes", "memory.soft_limit_in_bytes"),  # v1: hard, soft
               False: ("memory.max", "memory.high")}                            # v2: hard (kills), high (throttles)


def tightest() -> Optional[tuple[int, str]]:
    """(bytes, which file) of the smallest memory limit of this process's cgroups and their ancestors, hard or soft
    (v1 memory.limit_in_bytes / memory.soft_limit_in_bytes, v2 memory.max / memory.high: the limit a manager lowers
    first, above which the kernel reclaims and throttles), or None. Read between passes: a few small files."""
    best = None
    for root, parts, v1 in own_cgroups():
        for k in range(len(parts), -1, -1):
            for name in LIMIT_FILES[v1]:
                s = _read(root.joinpath(*parts[:k], name)).strip()
                if s and s != "max" and s.isdigit() and int(s) < _UNLIMITED and (best is None or int(s) < best[0]):
                    best = (int(s), name)
    return best


def limit() -> Optional[int]:
    """The smallest memory limit (hard or soft) of this process's cgroups and their ancestors, or None."""
    t = tightest()
    return t[0] if t else None


def own_events() -> Optional[int]:
    """How many times this process's cgroup reached a limit so far (v2 memory.events high + max, v1
    memory.failcnt), None where it cannot tell: a rise says memory was taken back from it."""
    cgs = own_cgroups()
    if not cgs:
        return None
    root, parts, v1 = cgs[0]
    d = root.joinpath(*parts)
    if v1:
        s = _read(d / "memory.failcnt").strip()
        return int(s) if s.isdigit() else None
    ev = dict(line.split(" ", 1) for line in _read(d / "memory.events").splitlines() if " " in line)
    return int(ev.get("high", 0)) + int(ev.get("max", 0)) if ev else None


def _own_dir() -> Optional[Path]:
    cgs = own_cgroups()
    return cgs[0][0].joinpath(*cgs[0][1]) if cgs else None


def reset_own_peak() -> bool:
    """Restart this process's cgroup peak (v1), e.g. after a load; False where it cannot."""
    d = _own_dir()
    try:
        (d / "memory.max_usage_in_bytes").write_text("0")
        return True
    except (OSError, TypeError):
        return False


def own_peak() -> Optional[int]:
    d = _own_dir()
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int((d / name).read_text())
        except (OSError, TypeError, ValueError):
            continue
    return None
