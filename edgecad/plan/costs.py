"""The cost model: what a device measured (storage read speed, pass times, drafting, acceptance), the speed it
predicts for a plan, and how each completion corrects it. Pure: the measuring and the cache are edgecad.measure."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from ..gguf_file import GGUFInfo
from .paging import BudgetPlan, PagerParams
from .units import MB

MAX_TREE_NODES = 255  # llama.cpp holds 256 sequences per context: root + 255 nodes, each at most one leaf


@dataclass(frozen=True)
class Costs:
    """What one device measured for one target (and draft): the inputs of the speed predictions.
    Priors come from this project's measurements (2 x86 cores); every completion corrects them."""
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
    """The costs corrected by one completion's measurements (its `edgecad` stats; exponential average, weight 1/3
    once warmed up): acceptance and tree size, per-node draft time, read bandwidth, and the target's pass time:
    a 1-token pass calibrates the compute speed (resident) or the paged overhead (paged: `streamed` bytes read
    per pass), a tree's pass the batch slope. `speculative`: the plan drafted trees."""
    if stats.get("mode") in ("linear", "bild"):
        return costs  # other trees: their acceptance is not the tree mode's, which the plan predicts
    # the prompt's pass counts in target_passes, its time in prompt_seconds (not seconds_target, seconds_draft)
    passes = stats.get("target_passes") or 0
    timed = passes - (stats.get("prompt_passes") or 0)
    if timed < 2:
        return costs
    w = 1.0 / min(costs.observed + 1, 3)
    mix = lambda old, new: (1 - w) * old + w * new  # noqa: E731
    new = {"observed": costs.observed + 1}
    if speculative and stats.get("draft_tokens"):
        new["tree_tokens"] = mix(costs.tree_tokens, stats["n_tokens"] / passes)
        new["tree_nodes"] = mix(costs.tree_nodes, max(1.0, stats["draft_tokens"] / passes))
        timed_nodes = stats["draft_tokens"] * timed / passes
        new["draft_node_s"] = mix(costs.draft_node_s, stats["seconds_draft"] / timed_nodes / (draft_bytes / 1e9))
    k = (stats["draft_tokens"] / passes + 1) if speculative else 1
    per_pass = max(stats.get("target_compute_seconds", 0.0), 1e-6) / timed
    one = costs.target_byte_s * target_bytes  # a resident 1-token pass
    if k < 1.5 and streamed:
        new["paged_byte_s"] = mix(costs.paged_byte_s, max(0.0, per_pass - one) / streamed)
    elif k < 1.5:
        new["target_byte_s"] = mix(costs.target_byte_s, per_pass / target_bytes)
    else:  # what the pass would cost resident, over a resident 1-token pass
        resident = max(per_pass - costs.paged_byte_s * streamed, one)
        new["batch_slope"] = mix(costs.batch_slope, (resident / one - 1) / (k - 1))
    busy, read = stats.get("io_busy_seconds") or 0.0, stats.get("bytes_read") or 0
    if streamed and busy > 0 and read > 64 * MB:
        new["read_bps"] = mix(costs.read_bps, read / busy)
    return replace(costs, **new)
