"""The cost model: what a device measured (storage read speed, pass times, drafting, acceptance), the speed it
predicts for a plan, and how each completion corrects it. Pure: the measuring and the cache are edgecad.measure.

A busy minute must not teach the plan wrong (measured: a few completions beside other processes left a drafting
cost 20x the pair's and a batch slope of 1.07 in the cache, and every later engine planned the F16 target at 2 GB
without its tree: 2.3x llama-cpp-python instead of 8.5x). So a completion whose passes or drafting were starved of
CPU teaches nothing (STARVED), each learnt cost is the median of its last HISTORY observations, moved by at most
STEP per completion, and held inside BOUNDS."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, fields, replace
from typing import Optional

from ..gguf_file import GGUFInfo
from .paging import BudgetPlan, PagerParams
from .units import MB

MAX_TREE_NODES = 255  # llama.cpp holds 256 sequences per context: root + 255 nodes, each at most one leaf

STARVED = 0.7   # a phase (the target's timed passes, the drafting) whose computing thread was on a core less than
                # this share of its wall time was starved: other processes had the cores, a CPU quota throttled it,
                # the device took its cores away. Unstarved, that thread computes (or spins in its OpenMP team's
                # barriers) throughout, so its CPU time is about its wall time (the pager's waits, where it blocks,
                # count in neither). Measured on 2 cores, the real pair: 0.98-1.00 resident, 0.92-0.93 paged at 40%,
                # 0.85 paged with the pipeline (its chain's thread joined after the pass); beside 8 other runnable
                # processes 0.25-0.36; one busy thread beside 2 of ours would leave 2/3
HISTORY = 9     # observations kept per learnt cost: the cost is their median, so 4 wild ones cannot move it
                # past the others
STEP = 3.0      # a completion moves a learnt cost by at most this factor (the median of its first observations
                # alone would move it all the way)

# Physically plausible ranges of the learnt costs, from the priors (this project's 2 x86 cores) to the devices
# edgecad targets (a phone's slow cores, a workstation): an observation or a cached value outside is clamped in.
BOUNDS = {
    "read_bps": (5e6, 1e11),             # a worn SD card's 5 MB/s to copies from the page cache (100 GB/s)
    "target_byte_s": (3.3e-12, 3.3e-9),  # a 1-token pass through 300 GB of weights a second (a workstation's
                                         # memory) to 0.3 GB/s (one slow core): the prior /10 to x100
    "batch_slope": (0.01, 2.0),          # each further token of a pass costs 1% (a GPU) to 200% (a batch computed
                                         # worse than one by one) of a 1-token pass: 0.24-0.48 measured
    "paged_byte_s": (0.0, 3.3e-9),       # a streamed byte costs at most 100 resident bytes' compute more
                                         # (7.7e-11 measured: 0.077 s per GB)
    "draft_node_s": (0.0035, 3.5),       # the prior /10 to x100, as target_byte_s
    "tree_nodes": (1.0, float(MAX_TREE_NODES)),
    "tree_tokens": (1.0, MAX_TREE_NODES + 1.0),  # at least the target's own token, at most every node and it
}


@dataclass(frozen=True)
class Costs:
    """What one device measured for one target (and draft): the inputs of the speed predictions.
    Priors come from this project's measurements (2 x86 cores); every completion not starved corrects them."""
    read_bps: float = 1.2e9          # storage read bandwidth of the model's directory, bytes/s (measured)
    target_byte_s: float = 3.3e-11   # resident target: seconds of a 1-token pass per byte of weights
    batch_slope: float = 0.45        # a k-token pass costs (1 + batch_slope * (k - 1)) 1-token passes (calibrated by
                                     # tree passes: 0.24 for the F16 1.5B target, 0.48 for its Q4_K_M on 2 cores)
    paged_byte_s: float = 0.0        # a paged pass computes this many seconds longer per streamed byte (its weights
                                     # not repacked, reads beside compute); calibrated by 1-token paged passes
    draft_node_s: float = 0.035      # drafting: seconds per drafted node (per GB of draft weights)
    tree_nodes: float = 12.0         # drafted nodes per pass (11-14 measured on both pairs, paged)
    tree_tokens: float = 6.0         # tokens per pass of a tree, accepted + bonus (6.4-8.4 measured, paged)
    observed: int = 0                # completions folded in
    read_measured: bool = False      # read_bps was measured on this device (not the prior)
    starved: int = 0                 # of the completions folded in, those that taught nothing: starved (STARVED)
    history: tuple = ()              # ((cost, (its last HISTORY observations, oldest first)), ...) by name: each
                                     # learnt cost follows their median (observe); a cost without any is its prior

    def samples(self, name: str) -> tuple:
        """The observations a learnt cost follows (none: it is its prior, or read_bps as measured)."""
        return dict(self.history).get(name, ())

    def target_pass(self, weight_bytes: int, k: float, streamed_bytes: int = 0) -> float:
        """Compute seconds of a target pass over k tokens (IO waits excluded), streaming `streamed_bytes`."""
        return self.target_byte_s * weight_bytes * (1 + self.batch_slope * (k - 1)) + self.paged_byte_s * streamed_bytes

    def draft_time(self, draft_bytes: int, nodes: float) -> float:
        return self.draft_node_s * nodes * draft_bytes / 1e9


def io_seconds(costs: Costs, paging: Optional[BudgetPlan], pager: PagerParams) -> float:
    """Seconds a pass spends reading the streamed layers (0 when they stay in the window)."""
    if paging is None or not paging.reads_every_pass:
        return 0.0
    bps = min(costs.read_bps, pager.bytes_per_second) if pager.bytes_per_second else costs.read_bps
    return paging.streamed_bytes / bps


def tree_size(costs: Costs, target: GGUFInfo, paging: Optional[BudgetPlan], pager: PagerParams, nodes: int) -> int:
    """Drafted nodes a pass may verify: `nodes`, doubled while the pass's compute with the larger tree stays under
    the seconds it reads from storage (Sequoia, SpecExec: hundreds of nodes when a pass reads for seconds, few
    when it is compute-bound). Within that cap LLMCad's threshold, capped by the measured break-even
    (edgecad.fallback), stops drafting when another node does not pay."""
    io, streamed = io_seconds(costs, paging, pager), _streamed(paging)
    while 0 < nodes < MAX_TREE_NODES and costs.target_pass(target.pass_bytes, min(2 * nodes, MAX_TREE_NODES) + 1,
                                                       streamed) <= io:
        nodes = min(2 * nodes, MAX_TREE_NODES)
    return nodes


def _streamed(paging: Optional[BudgetPlan]) -> int:
    return paging.streamed_bytes if paging is not None else 0


def waits(costs: Costs, target: GGUFInfo, draft: GGUFInfo, paging: BudgetPlan, pager: PagerParams,
           nodes: int) -> bool:
    """A tree's pass would wait on storage (its reads less its compute) longer than its drafting takes: the
    pipeline's chain then drafts in time that is otherwise idle (measured: 1.33x at 45 MB/s; 0.95-0.98x where
    compute hides the reads)."""
    n = min(costs.tree_nodes, nodes)
    wait = io_seconds(costs, paging, pager) - costs.target_pass(target.pass_bytes, n + 1, _streamed(paging))
    return wait > costs.draft_time(draft.file_size, n)


def speed(costs: Costs, target: GGUFInfo, draft: Optional[GGUFInfo], paging: Optional[BudgetPlan],
           pager: PagerParams, nodes: int = 0) -> float:
    """Predicted tokens/s: tokens per pass / seconds per pass. A pass computes (with the overhead per streamed
    byte when paged) and reads its streamed bytes at the read rate: with read-ahead the reads run under the
    compute (the larger of the two; measured: small pair at 40%, a 0.664 s pass of 0.405 s compute + 0.225 s
    drafting + 0.027 s waiting on 0.213 s of reads), with demand reads after it (the sum); a tree then drafts.
    `draft` None: the target alone. A tree drafts its measured nodes per pass, at most `nodes`; a tree capped
    below what it measured yields fewer tokens, growing with the logarithm of its nodes (its first nodes are its
    likeliest: Sequoia's accepted tokens grow about so with tree size)."""
    n = min(costs.tree_nodes, nodes or MAX_TREE_NODES) if draft is not None else 0
    compute, io = costs.target_pass(target.pass_bytes, n + 1, _streamed(paging)), io_seconds(costs, paging, pager)
    sec = max(compute, io) if pager.read_ahead else compute + io
    if draft is None:
        return 1.0 / sec
    tokens = 1 + (costs.tree_tokens - 1) * math.log1p(n) / math.log1p(max(costs.tree_nodes, n))
    return tokens / (sec + costs.draft_time(draft.file_size, n))


def observe(costs: Costs, stats: dict, *, speculative: bool, streamed: int, target_bytes: int,
            draft_bytes: int) -> Costs:
    """The costs corrected by one completion's measurements (its `edgecad` stats): acceptance and tree size,
    per-node draft time, read bandwidth, and the target's pass time: a 1-token pass calibrates the compute speed
    (resident) or the paged overhead (paged: `streamed` bytes read per pass), a tree's pass the batch slope.
    `speculative`: the plan drafted trees. A completion whose timed passes or drafting were starved of CPU (their
    computing thread's CPU seconds, cpu_target_seconds and cpu_draft_seconds, under STARVED of their wall time; a
    phase without them is trusted) teaches nothing: it only counts as starved."""
    if stats.get("mode") in ("linear", "bild"):
        return costs  # other trees: their acceptance is not the tree mode's, which the plan predicts
    # the prompt's pass counts in target_passes, its time in prompt_seconds (not seconds_target, seconds_draft)
    passes = stats.get("target_passes") or 0
    timed = passes - (stats.get("prompt_passes") or 0)
    if timed < 2:
        return costs
    if (_starved(stats.get("cpu_target_seconds"), stats.get("target_compute_seconds"))
            or speculative and _starved(stats.get("cpu_draft_seconds"), stats.get("seconds_draft"))):
        return replace(costs, observed=costs.observed + 1, starved=costs.starved + 1)
    seen = {}  # cost -> what this completion measured of it
    # the timed passes' own trees (the prompt's pass drafts a tree shrunk to the room its prompt tokens leave)
    nodes = (stats.get("draft_tokens") or 0) - (stats.get("prompt_draft_tokens") or 0)
    if speculative and nodes > 0:
        seen["tree_tokens"] = (stats["n_tokens"] - (stats.get("prompt_pass_tokens") or 0)) / timed
        seen["tree_nodes"] = max(1.0, nodes / timed)
        seen["draft_node_s"] = stats["seconds_draft"] / nodes / (draft_bytes / 1e9)
    k = (nodes / timed + 1) if speculative else 1
    per_pass = max(stats.get("target_compute_seconds", 0.0), 1e-6) / timed
    one = costs.target_byte_s * target_bytes  # a resident 1-token pass
    if k < 1.5 and streamed:
        seen["paged_byte_s"] = max(0.0, per_pass - one) / streamed
    elif k < 1.5:
        seen["target_byte_s"] = per_pass / target_bytes
    else:  # what the pass would cost resident, over a resident 1-token pass
        resident = max(per_pass - costs.paged_byte_s * streamed, one)
        seen["batch_slope"] = (resident / one - 1) / (k - 1)
    busy, read = stats.get("io_busy_seconds") or 0.0, stats.get("bytes_read") or 0
    if streamed and busy > 0 and read > 64 * MB:
        seen["read_bps"] = read / busy
    return _fold(costs, seen)


def _starved(cpu: Optional[float], wall: Optional[float]) -> bool:
    """A phase's computing thread had a core less than STARVED of its wall time (unknown: not starved)."""
    return cpu is not None and wall is not None and wall > 0 and cpu < STARVED * wall


def _fold(costs: Costs, seen: dict) -> Costs:
    """The costs with one completion's observations folded in: each, clamped into its BOUNDS, joins its cost's
    last HISTORY; the cost moves towards their median by at most STEP."""
    history, new = dict(costs.history), {"observed": costs.observed + 1}
    for name, x in seen.items():
        if not math.isfinite(x):
            continue
        kept = history[name] = (*history.get(name, ()), _bounded(name, x))[-HISTORY:]
        old, target = getattr(costs, name), statistics.median(kept)
        new[name] = _bounded(name, min(max(target, old / STEP), old * STEP) if old > 0 else target)
    return replace(costs, **new, history=tuple(sorted(history.items())))


def _bounded(name: str, x: float) -> float:
    lo, hi = BOUNDS[name]
    return min(max(float(x), lo), hi)


def costs_from_dict(d) -> Costs:
    """Costs from what a cache holds (edgecad.measure: JSON, hostile until checked): a field of the wrong type or
    not finite is its prior, learnt costs are clamped into BOUNDS, observations beyond the last HISTORY and of
    unknown costs are dropped. An entry without a history was learnt by an exponential average that a busy
    minute could teach wrong: it loads as the priors (its measured read speed kept)."""
    if not isinstance(d, dict):
        return Costs()
    out = {}
    for f in fields(Costs):
        v = d.get(f.name)
        if f.type == "bool" and isinstance(v, bool):
            out[f.name] = v
        elif f.type == "int" and _number(v) is not None:
            out[f.name] = int(max(_number(v), 0))
        elif f.type == "float" and _number(v) is not None:
            out[f.name] = _bounded(f.name, _number(v))
    history = {}
    for item in d.get("history") if isinstance(d.get("history"), list) else ():
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0] in BOUNDS \
                and isinstance(item[1], list):
            xs = tuple(_bounded(item[0], x) for x in map(_number, item[1][-HISTORY:]) if x is not None)
            if xs:
                history[item[0]] = xs
    if "history" not in d:  # (before issue 35)
        return replace(Costs(), **{k: out[k] for k in ("read_bps", "read_measured") if k in out and
                                   out.get("read_measured")})
    return replace(Costs(), **out, history=tuple(sorted(history.items())))


def _number(v) -> Optional[float]:
    """v as a finite float, or None (not a number, a bool, NaN, infinite, an integer beyond a float's range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v) if math.isfinite(v) else None
    except OverflowError:
        return None
