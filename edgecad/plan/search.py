"""The search: the fastest configuration inside a memory budget, as one frozen MemoryPlan.

The budget is everything the engine keeps resident: the process itself (Python, numpy, llama.cpp's
libraries), the draft's weights, the target's weights kept resident and its streaming window, both
KV caches, llama.cpp's compute buffers and the engine's own arrays. `plan_memory` splits it for each
configuration that could run (target resident, target paged, draft + tree with the target resident
or paged), predicts each one's speed from the device's measured costs (edgecad.plan.costs) and keeps
the fastest. A budget that runs nothing raises with the smallest that does. Pure: what it needs of the
device (its costs, the process's size, the storage's readahead, whether it can page) comes in a Device,
measured before (edgecad.measure); remote devices come in as their split (edgecad.plan.remote).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Union

from ..errors import BudgetTooSmallError, EdgecadError
from ..gguf_file import GGUFInfo
from .costs import Costs, io_seconds, speed, tree_size, waits
from .paging import BudgetPlan, PagerParams, plan_budget
from .remote import RemotePlan
from .sizes import compute_bytes, kv_bytes
from .units import mb


@dataclass(frozen=True)
class Device:
    """What the plan needs to know of this device, measured before planning (edgecad.measure.device)."""
    runtime: int                 # bytes the process holds before any model: Python, numpy, llama.cpp's libraries
    costs: Costs = Costs()       # its learnt costs for this target (and draft)
    readahead: int = 8 << 20     # the kernel's readahead window on the target's storage, bytes
    can_page: bool = True        # this build can page a model (edgecad.native.can_page)
    remote_costs: Optional[Costs] = None  # its costs for the target's local part, with remote devices


@dataclass(frozen=True)
class Config:
    """A configuration the plan chooses among: a value, never parsed from its name."""
    speculative: bool  # the draft drafts token trees that the target verifies (else the target decodes alone)
    paged: bool        # the pager streams the target inside its share (else the target is held whole)

    @property
    def name(self) -> str:  # what the stats, the bench and the CLI show ("tree" stands for any speculative mode)
        return ("tree" if self.speculative else "target") + ("-paged" if self.paged else "")

    def __str__(self) -> str:
        return self.name


TARGET, TARGET_PAGED, TREE, TREE_PAGED = CONFIGS = (Config(False, False), Config(False, True), Config(True, False),
                                                    Config(True, True))


@dataclass(frozen=True)
class MemoryPlan:
    """How the budget is split for one configuration, and its predicted speed."""
    kind: Config                 # its configuration
    budget: int                  # bytes the whole engine may hold resident
    runtime: int                 # the process before any model: Python, numpy, llama.cpp's libraries (measured)
    draft_weights: int           # the resident draft (its file), 0 without a draft
    kv: int                      # KV caches of both contexts
    compute: int                 # compute buffers, logits and the engine's arrays (estimated)
    target: int                  # bytes of the target kept resident: its file, or the paging plan's budget
    paging: Optional[BudgetPlan] # the target's paging plan when paged
    tokens_per_second: float = 0.0  # predicted
    reason: str = ""
    alternatives: dict = field(default_factory=dict)  # config -> predicted tok/s, or why it cannot run
    n_batch: int = 512           # tokens per prompt batch (smaller when that lets the configuration fit)
    tree_nodes: int = 0          # drafted nodes a pass may verify (trees only: larger where passes are IO-bound,
                                 # smaller where that lets the configuration fit)
    pipeline: bool = False       # draft beside the passes (paged trees whose passes wait on storage longer than
                                 # their drafting takes: edgecad.pipeline)
    remote: Optional[RemotePlan] = None  # the target's layers on remote devices (the rest of the plan is this
                                         # device's: its target is the local part)
    costs: Costs = Costs()       # the device's costs the prediction was made from (what a completion corrects)
    target_info: Optional[GGUFInfo] = field(default=None, repr=False, compare=False)  # the target as this device
                                 # holds it: the whole file, or its local part with remote devices

    @property
    def paged(self) -> bool:
        return self.paging is not None

    @property
    def config(self) -> str:  # (the name the stats, the bench and the CLI show)
        return self.kind.name

    @property
    def speculative(self) -> bool:
        return self.kind.speculative

    @property
    def parts(self) -> dict:
        return {"runtime": self.runtime, "draft_weights": self.draft_weights, "kv_caches": self.kv,
                "compute_buffers": self.compute, "target": self.target,
                "spare": self.budget - self.runtime - self.draft_weights - self.kv - self.compute - self.target}

    def describe(self) -> str:
        lines = [f"memory budget   {mb(self.budget)} for the whole engine: configuration {self.config} "
                 f"(predicted {self.tokens_per_second:.2f} tok/s, prompt batches of {self.n_batch}"
                 + (f", trees of up to {self.tree_nodes} nodes" if self.speculative else "")
                 + (", drafting beside the passes" if self.pipeline else "") + f"): {self.reason}",
                 "  split         " + ", ".join(f"{k} {mb(v)}" for k, v in self.parts.items())]
        alts = ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.2f} tok/s'}" for k, v in self.alternatives.items())
        lines.append(f"  considered    {alts}")
        if self.paging is not None:
            lines += ["  " + l for l in self.paging.describe().splitlines()]
        if self.remote is not None:
            lines += ["  " + l for l in self.remote.describe().splitlines()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"config": self.config, "reason": self.reason, "budget_bytes": self.budget, "n_batch": self.n_batch,
                "tree_nodes": self.tree_nodes, "pipeline": self.pipeline,
                "predicted_tokens_per_second": self.tokens_per_second, "parts": self.parts,
                "alternatives": self.alternatives,
                "remote": None if self.remote is None else [
                    {"device": d.name, "endpoint": d.endpoint, "layers": c, "weight_bytes": w, "kv_bytes": kv,
                     "memory_free": d.memory_free}
                    for d, c, w, kv in zip(self.remote.devices, self.remote.counts, self.remote.weight_bytes,
                                           self.remote.kv_bytes)]}




@dataclass(frozen=True)
class _Ask:
    """One search's question: everything but the budget and the configuration."""
    target: GGUFInfo
    draft: Optional[GGUFInfo]
    device: Device
    n_ctx: int
    n_batch: int
    tree_nodes: int
    pager: PagerParams
    target_budget: Optional[int]
    grow_tree: bool


def plan_memory(budget: int, target: GGUFInfo, draft: Optional[GGUFInfo], *, device: Device, n_ctx: int,
                n_batch: int, tree_nodes: int, pager: PagerParams = PagerParams(), configs: Optional[tuple] = None,
                target_budget: Optional[int] = None, grow_tree: bool = True,
                remote: Optional[RemotePlan] = None) -> MemoryPlan:
    """The fastest configuration among `configs` (default: all that the models allow) inside `budget`.
    target_budget fixes the target's share instead (bytes of its file kept resident): the budget is
    then whatever the rest needs plus that share. grow_tree: a paged tree may grow past tree_nodes where
    passes are IO-bound (edgecad's own tree; not a baseline's or one the caller fixed). remote: the split of
    the target's last layers onto remote devices, used where the target is not held whole here (with a
    target_budget, always): the plan is then this device's part's."""
    ask = _Ask(target, draft, device, n_ctx, n_batch, tree_nodes, pager, target_budget, grow_tree)
    if remote is None:
        return _search(budget, ask, configs)
    if target_budget is None:
        try:
            whole = _search(budget, ask, configs)
            if not whole.paged:
                return whole  # (held whole here: nothing to gain from the network)
        except EdgecadError:
            pass  # nothing fits here: the remote devices take their layers
    local = replace(ask, target=remote.local, device=replace(device, costs=device.remote_costs or device.costs))
    return replace(_search(budget, local, configs), remote=remote)


def _search(budget: int, ask: _Ask, configs: Optional[tuple]) -> MemoryPlan:
    """The fastest of `configs` for one target (the whole, or this device's part of it)."""
    plans, why_not, smallest = {}, {}, None
    for cfg in configs or (CONFIGS if ask.draft is not None else CONFIGS[:2]):
        if cfg.paged and not ask.device.can_page:  # (never a pager that cannot hold its budget)
            why_not[cfg.name] = ("this platform's build cannot page a model (it cannot drop a file's pages or find "
                                 "llama.cpp's mapping: edgecad.native.capabilities())")
            continue
        r = _plan_config(cfg, budget, ask)
        if isinstance(r, MemoryPlan):
            plans[cfg.name] = r
        else:
            why_not[cfg.name], need = r
            smallest = need if smallest is None or (need is not None and need < smallest) else smallest
    if not plans:
        raise _nothing_fits(budget, ask, why_not, smallest)
    best = max(plans.values(), key=lambda p: p.tokens_per_second)
    others = [f"{c} {p.tokens_per_second:.2f}" for c, p in plans.items() if p is not best]
    return replace(best, alternatives={**{c: round(p.tokens_per_second, 3) for c, p in plans.items()}, **why_not},
                   reason=("the only configuration that fits" if not others else
                           "fastest predicted (vs " + ", ".join(others) + " tok/s)"))


def _nothing_fits(budget: int, ask: _Ask, why_not: dict, smallest: Optional[int]) -> BudgetTooSmallError:
    head = ((f"memory budget {mb(budget)}" if ask.target_budget is None else
             f"target budget {mb(ask.target_budget)}") + f" cannot run {ask.target.path.name}"
            + (f" (with draft {ask.draft.path.name})" if ask.draft is not None else ""))
    if smallest is None:  # every configuration asked for was ruled out by something else
        return BudgetTooSmallError(head + ": " + "; ".join(f"{c}: {w}" for c, w in why_not.items())
                                   + ": choose another configuration (mode) or budget")
    return BudgetTooSmallError(head + f": the smallest configuration needs {mb(smallest)}; give a larger "
                               + ("memory_budget" if ask.target_budget is None else "target_budget")
                               + " or a smaller n_ctx", smallest)


# Shrinking steps for a paged configuration that does not fit, tried cumulatively in this order: each frees
# memory at a price (a smaller read-ahead overlaps less IO with compute; smaller prompt batches take more passes,
# each streaming the target; a smaller tree verifies fewer tokens per pass; demand reads overlap nothing).
SHRINK = (("depth", 1), ("n_batch", 256), ("n_batch", 128), ("nodes", 16), ("depth", 0), ("n_batch", 64),
          ("nodes", 8))


@dataclass(frozen=True)
class _Split:
    """A configuration's fixed costs for prompt batches of n_batch tokens and trees of `nodes` drafted nodes."""
    n_batch: int
    nodes: int
    compute: int  # compute buffers, logits, the drafter's distributions
    fixed: int    # everything but the target: runtime, KV caches, compute, the draft's weights
    room: int     # what is left for the target (the target_budget when one is fixed)
    paging: Optional[BudgetPlan] = None  # the target's paging plan, when paged
    pipeline: bool = False               # a paged tree drafts beside its passes


def _split(cfg: Config, budget: int, ask: _Ask, nb: int, nodes: int) -> _Split:
    spec, t, d = cfg.speculative, ask.target, ask.draft
    outs = nodes + 1 if spec else 1
    nt = max(nb, outs)  # a tree's pass is one batch too
    c = compute_bytes(t, nt, outs, ask.n_ctx) + (compute_bytes(d, nt, outs, ask.n_ctx) if spec else 0)
    c += outs * t.vocab_size * 4 if spec else 0  # the drafter's distributions (float32)
    f = ask.device.runtime + _kv(cfg, ask) + c + (d.file_size if spec else 0)
    return _Split(nb, nodes, c, f, budget - f if ask.target_budget is None else ask.target_budget)


def _kv(cfg: Config, ask: _Ask) -> int:
    return kv_bytes(ask.target, ask.n_ctx) + (kv_bytes(ask.draft, ask.n_ctx) if cfg.speculative else 0)


def _plan_config(cfg: Config, budget: int, ask: _Ask) -> Union[MemoryPlan, tuple]:
    """One configuration's split of the budget and its predicted speed, or (why it cannot run, the budget it
    would need or None)."""
    s = _split(cfg, budget, ask, ask.n_batch, ask.tree_nodes if cfg.speculative else 0)
    s = _paged(cfg, budget, ask, s) if cfg.paged else _resident(cfg, budget, ask, s)
    if isinstance(s, tuple):
        return s
    paging = s.paging
    pager, tgt = (paging.params, paging.budget) if paging else (ask.pager, ask.target.file_size)
    total = budget if ask.target_budget is None else s.fixed + tgt
    tgt = min(tgt, total - s.fixed)  # (a resident target held whole without its header: the parts add up)
    costs = ask.device.costs
    return MemoryPlan(cfg, total, ask.device.runtime, ask.draft.file_size if cfg.speculative else 0, _kv(cfg, ask),
                      s.compute, tgt, paging,
                      speed(costs, ask.target, ask.draft if cfg.speculative else None, paging, pager, s.nodes),
                      n_batch=s.n_batch, tree_nodes=s.nodes, pipeline=s.pipeline, costs=costs, target_info=ask.target)


def _resident(cfg: Config, budget: int, ask: _Ask, s: _Split) -> Union[_Split, tuple]:
    """The split with the target held whole, or why not. Resident, the target is read into memory llama.cpp owns
    (Resident.model_params): it is held whole, nothing of it can be given back, so it fits or it is paged."""
    tgt = ask.target.file_size
    fits = lambda s: s.room >= tgt or _holds_whole(ask, s.room)  # noqa: E731
    while not fits(s) and s.n_batch > 64:  # smaller prompt batches touch fewer activations: the same output,
        s = _split(cfg, budget, ask, s.n_batch // 2, s.nodes)  # prompts longer than n_batch take more passes
    if not fits(s):
        need = _split(cfg, budget, ask, ask.n_batch, s.nodes).fixed + tgt
        return f"needs {mb(need)}", need
    return s


def _paged(cfg: Config, budget: int, ask: _Ask, s: _Split) -> Union[_Split, tuple]:
    """The split with the target paged (its paging plan, whether to pipeline), or (why not, the budget it needs).
    A paged configuration that does not fit shrinks (SHRINK) before giving up; a paged tree may verify more than
    tree_nodes nodes where passes are IO-bound (costs.tree_size)."""
    pager, fixed_target = ask.pager, ask.target_budget is not None
    if fixed_target:
        paging = _plan_budget(ask, ask.target_budget, pager)  # too small: its own clear error
    else:
        paging, s, pager = _fit_paged(cfg, budget, ask, s)
        if paging is None:  # the smallest it shrinks to
            need = s.fixed + _plan_budget(ask, 1 << 62, pager).minimum
            return f"needs {mb(need)}", need
    if paging.resident_all:
        return "the target fits: not paged", None
    if cfg.speculative and ask.grow_tree:  # IO-bound passes verify larger trees, as large as the budget holds
        bigger = tree_size(ask.device.costs, ask.target, paging, pager, s.nodes)
        while bigger > s.nodes:  # (the budget holds it and it streams no more than the smaller tree's plan)
            grown = paging if fixed_target else _fit(ask, _split(cfg, budget, ask, s.n_batch, bigger).room,
                                                     paging.params)
            if grown is not None and grown.streamed_bytes <= paging.streamed_bytes:
                s, paging = _split(cfg, budget, ask, s.n_batch, bigger), grown
                break
            bigger = max(s.nodes, bigger // 2)
    if not fixed_target:
        s, paging = _smaller_batches(cfg, budget, ask, s, paging)
    pipeline = cfg.speculative and waits(ask.device.costs, ask.target, ask.draft, paging, paging.params, s.nodes)
    if pipeline:  # a chain's distributions beside the tree's (a chain is no deeper than the tree has nodes)
        chain = (s.nodes + 1) * ask.target.vocab_size * 4
        smaller = paging if fixed_target else _fit(ask, s.room - chain, paging.params)
        if smaller is None:
            pipeline = False  # (no room for it: drafting beside the passes is an extra)
        else:
            paging, s = smaller, replace(s, compute=s.compute + chain, fixed=s.fixed + chain, room=s.room - chain)
    return replace(s, paging=paging, pipeline=pipeline)


def _smaller_batches(cfg: Config, budget: int, ask: _Ask, s: _Split, paging: BudgetPlan) -> tuple:
    """(split, paging plan) with prompt batches halved, down to 64 and never under a tree's pass, while a pass of
    that many tokens still computes longer than it reads (a prompt's passes then stay compute-bound, their reads
    hidden under the compute: more of them cost about what fewer cost) and the activations it frees pin more of
    the target (every decoding pass then streams less). Read-ahead only: demand reads overlap nothing."""
    costs, best, nb = ask.device.costs, (s, paging), s.n_batch
    while paging.params.read_ahead and nb // 2 >= max(64, s.nodes + 1):
        nb //= 2
        smaller = _split(cfg, budget, ask, nb, s.nodes)
        fit = _fit(ask, smaller.room, paging.params)
        if fit is None or fit.resident_all or not fit.reads_every_pass or (  # (the target's reads would stop:
                costs.target_pass(ask.target.pass_bytes, nb, fit.streamed_bytes)  # a plan of its own)
                < io_seconds(costs, fit, fit.params)):
            break
        if fit.streamed_bytes < best[1].streamed_bytes:  # (a halving may free less than a layer: the next may not)
            best = (smaller, fit)
    return best


def _plan_budget(ask: _Ask, budget: int, params: PagerParams) -> BudgetPlan:
    return plan_budget(ask.target, budget, params, readahead=ask.device.readahead)


def _holds_whole(ask: _Ask, room: int) -> bool:
    """The target's tensors fit in `room` (its file also has a header, which is never read again)."""
    try:
        return _plan_budget(ask, max(room, 1), ask.pager).resident_all
    except EdgecadError:
        return False


def _fit(ask: _Ask, room: int, params: PagerParams) -> Optional[BudgetPlan]:
    """The paging plan for `room`, or None when the target's minimum does not fit in it."""
    try:
        return _plan_budget(ask, max(room, 0), params)
    except EdgecadError:
        return None


def _fit_paged(cfg: Config, budget: int, ask: _Ask, s: _Split):
    """The paging plan of the first shrinking step that fits (SHRINK): (plan or None, the split, pager params)."""
    pager, nb, nodes = ask.pager, s.n_batch, s.nodes
    for knob, v in ((None, None),) + SHRINK:
        if knob == "depth" and pager.depth > v:
            pager = replace(pager, depth=v)
        elif knob == "n_batch":
            nb = min(nb, v)
        elif knob == "nodes" and nodes:
            nodes = min(nodes, v)
        s = _split(cfg, budget, ask, nb, nodes)
        paging = _fit(ask, s.room, pager)
        if paging is not None:
            return paging, s, pager
    return None, s, pager
