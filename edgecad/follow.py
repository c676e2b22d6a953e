"""Memory that moves: between passes, whether the engine should move to a plan made for the memory it has now.

A device's free memory moves while the engine runs: other apps come and go, a cgroup's limit is lowered or raised.
The engine reads what it may hold (edgecad.measure.memory_room: available memory, its cgroup's tightest limit,
hard or soft) between passes, at most every `interval` seconds, at once when its cgroup reached a limit since the
last reading; no thread wakes the device for it. A `Watch` turns the readings into moves:

- down at once, when the room fell under what the running plan holds by more than the margin the budget keeps
  (the engine must give memory back before the kernel takes it);
- up only when the room has stayed `grow_margin` above the budget the plan was made for during `grow_after`
  seconds, with no memory pressure (PSI); a signal that flaps (down again soon after a move up) doubles that wait.

An explicit memory_budget is a ceiling: the room never exceeds it. The engine re-plans (the pure plan) at the
Watch's budget and moves only when the plan differs (edgecad.engine).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from . import cgroup
from .measure import margin, memory_pressure, memory_room
from .plan.units import mb


@dataclass(frozen=True)
class FollowParams:
    """How an engine follows the memory it may use (Engine(follow_memory=...); None: it plans once)."""
    interval: float = 0.25      # seconds between readings (a reading: /proc/meminfo, the cgroup's limit files, PSI)
    grow_after: float = 3.0     # seconds the room must stay larger before the engine moves up
    grow_margin: float = 0.15   # how much larger than the budget the running plan was made for (a fraction)
    max_wait: float = 60.0      # the longest grow_after becomes on a flapping signal (doubled at each flap)
    pressure: float = 10.0      # PSI "some" avg10 (%) at or above which the engine does not move up


def signals() -> str:
    """What this device tells a running engine of its memory (`edgecad doctor`)."""
    out = ["available memory (/proc/meminfo)" if sys.platform.startswith("linux") else "available memory"]
    lim = cgroup.tightest()
    cgs = cgroup.own_cgroups()
    if cgs:
        v1 = cgs[0][2]
        files = " and ".join(cgroup.LIMIT_FILES[v1])
        out.append(f"cgroup {'v1' if v1 else 'v2'} limits ({files}; "
                   + (f"now {mb(lim[0])} by {lim[1]})" if lim else "none set now)"))
    out.append("memory pressure (/proc/pressure/memory)" if memory_pressure() is not None else
               "no memory pressure (PSI: the kernel has none)")
    return ", ".join(out)


@dataclass(frozen=True)
class Due:
    """A move the Watch asks for: re-plan at `budget`."""
    budget: int   # bytes the engine may hold now
    why: str      # what moved, for the stats ("cgroup memory.soft_limit_in_bytes fell to 700 MB")
    down: bool    # the room shrank (else it grew)


class Watch:
    """Readings between passes, and the moves they call for (see the module)."""

    def __init__(self, params: FollowParams, ceiling: Optional[int], budget: int,
                 clock: Callable[[], float]):
        self.p, self.ceiling, self.clock = params, ceiling, clock
        self.budget = budget              # what the running plan was made for
        self.wait = params.grow_after     # seconds the room must stay larger (doubled on a flapping signal)
        self.next = 0.0                   # the next reading's time
        self.events = cgroup.own_events()  # times the cgroup reached a limit so far
        self.larger_since: Optional[float] = None  # since when the room has stayed larger
        self.last_up: Optional[float] = None        # when the engine last moved up

    def room(self) -> tuple[int, str]:
        """(bytes, what set them): the memory this engine may use now, its ceiling included."""
        n, why = memory_room()
        return (self.ceiling, "the memory_budget given") if self.ceiling is not None and self.ceiling < n else (n, why)

    def due(self, holds: int) -> Optional[Due]:
        """The move to make now, if any. holds: the bytes the running plan holds (its budget less its spare)."""
        now, events = self.clock(), cgroup.own_events()
        if now < self.next and events == self.events:
            return None
        self.next, self.events = now + self.p.interval, events
        room, why = self.room()
        if room < holds - margin(holds):  # (within the margin a budget keeps anyway, a drift moves nothing)
            self.larger_since = None
            if self.last_up is not None and now - self.last_up < 2 * self.wait:  # down soon after up: a flap
                self.wait = min(2 * self.wait, self.p.max_wait)
            elif self.last_up is not None:  # down long after up: the signal settled, the wait comes back
                self.wait = self.p.grow_after
            return Due(room, f"{why} fell to {mb(room)} (the plan holds {mb(holds)})", True)
        pressure = memory_pressure()
        if room < self.budget * (1 + self.p.grow_margin) or (pressure or 0.0) >= self.p.pressure:
            self.larger_since = None
            return None
        if self.larger_since is None:
            self.larger_since = now
        if now - self.larger_since < self.wait:
            return None
        self.larger_since = None
        return Due(room, f"{why} rose to {mb(room)} (the plan was made for {mb(self.budget)})", False)

    def planned(self, budget: int, up: bool) -> None:
        """The engine re-planned at `budget` (moved, or kept its plan where the new one was the same)."""
        self.budget = budget
        if up:
            self.last_up = self.clock()
