"""The target's paging plan: which tensors stay pinned, which layers stream through a window every pass.

The target stays memory-mapped by llama.cpp (no weight repacking). The plan pins what every pass touches (output
matrix, norms; the embeddings when the output is tied to them) and as many whole leading layers as fit; the other
layers stream through a window of `window_layers` (the current one, the read-ahead and the eviction lag).
The native pager that carries the plan out is edgecad.residency.paged.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Optional

from ..errors import EdgecadError
from ..gguf_file import GGUFInfo, mb
from .units import MiB

STORAGE_PROFILES = {  # bytes per second the IO thread may read; 0 = as fast as the device goes
    "native": 0.0,
    "nvme": 2e9,   # NVMe SSD (Jetson, laptops)
    "ufs": 1e9,    # UFS flash (phones)
    "sd": 45e6,    # SD card (Raspberry Pi)
}


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
    memory: str = "owned"    # where streamed layers live: "owned", slots the pager owns, read with direct IO (no
                             # page cache, no readahead); "cache", the file's pages in the page cache

    def __post_init__(self):
        if self.io not in ("prefetch", "demand"):
            raise EdgecadError(f"unknown IO mode {self.io!r}: use 'prefetch' or 'demand'")
        if self.memory not in ("owned", "cache"):
            raise EdgecadError(f"unknown pager memory {self.memory!r}: use 'owned' or 'cache'")
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


def plan_budget(info: GGUFInfo, budget: int, params: PagerParams = PagerParams(), *, readahead: int) -> BudgetPlan:
    """Pin the essentials and as many leading layers as fit; stream the rest through the window. readahead: the
    kernel's readahead window of the model's storage, bytes (edgecad.measure.read_ahead_bytes)."""
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
    # small layers: exact reads, no readahead (see docs/paging.md); owned slots are read directly: none either
    ra = readahead if largest >= 2 * readahead and params.memory == "cache" else 0
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
