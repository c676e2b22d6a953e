"""One memory budget for the whole engine, and the configuration that runs fastest inside it.

The budget is everything the engine keeps resident: the process itself (Python, numpy, llama.cpp's
libraries), the draft's weights, the target's weights kept resident and its streaming window, both
KV caches, llama.cpp's compute buffers and the engine's own arrays. `plan_memory` splits it for each
configuration that could run (target resident, target paged, draft + tree with the target resident
or paged), predicts each one's speed from measured costs (`Costs`: storage read bandwidth, target
pass time against batch size, draft time, acceptance; cached per device and model and corrected after
every completion) and keeps the fastest. A budget that runs nothing raises with the smallest that does.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from . import cgroup
from .errors import EdgecadError
from .gguf_file import GGUFInfo
from .pager import BudgetPlan, PagerParams, parse_size, plan_budget, read_bandwidth

MB = 1_000_000


# ---------------------------------------------------------------------------- device memory

def process_rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def auto_budget() -> int:
    """The memory this engine may use: the smaller of what the system has available (plus what this
    process already holds) and the process's cgroup limit, less a margin of 2% (at least 32 MB) for
    the kernel's own charges (page tables, slab)."""
    import psutil
    avail = psutil.virtual_memory().available + process_rss()
    limit = cgroup.limit()
    n = min(avail, limit) if limit else avail
    return int(n - max(32 * MB, 0.02 * n))


def parse_memory(value: Union[int, float, str], model_bytes: int) -> int:
    """Bytes of the engine's budget: an int, "1.5GB", "900MiB", "40%" (of the model files, draft +
    target), or "auto" (auto_budget)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        s = str(value).strip().lower()
        n = -1
        if s == "auto":
            n = auto_budget()
        elif s.endswith("%"):
            try:
                pct = float(s[:-1])
                n = int(model_bytes * pct / 100) if 0 < pct and math.isfinite(pct) else -1
            except ValueError:
                pass
        else:
            n = parse_size(s)
        if n is None or n == -1:
            raise EdgecadError(f"cannot read memory budget {value!r}: give bytes, a size such as '1.5GB' or "
                               "'900MiB', a share of the model files such as '60%', or 'auto'")
    if n <= 0:
        raise EdgecadError(f"memory budget {value!r} is not positive: give a size such as '1.5GB' or 'auto'")
    return n


# ---------------------------------------------------------------------------- what a context costs

def _cells(n_ctx: int) -> int:
    """KV cells llama.cpp allocates for a context of n_ctx tokens (padded to 256)."""
    return -(-max(n_ctx, 1) // 256) * 256


def kv_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """llama.cpp's F16 KV cache of one context (n_ctx padded to 256 cells); llama.cpp clears it at
    creation, so all of it is resident from the start."""
    n_head = int(info.arch_value("attention.head_count", 1))
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head))
    n_embd = int(info.arch_value("embedding_length", 0))
    k = int(info.arch_value("attention.key_length", n_embd // max(n_head, 1)))
    v = int(info.arch_value("attention.value_length", k))
    return _cells(n_ctx) * info.n_layer * n_head_kv * (k + v) * 2


def activation_bytes(info: GGUFInfo, n_batch: int, n_ctx: int = 512) -> int:
    """A layer's fp32 activations and attention scores for a batch of n_batch tokens."""
    n_embd = int(info.arch_value("embedding_length", 0))
    n_ff = int(info.arch_value("feed_forward_length", 4 * n_embd))
    n_head = int(info.arch_value("attention.head_count", 1))
    return n_batch * (4 * n_embd + 3 * n_ff) * 4 + n_batch * _cells(n_ctx) * n_head * 4


def compute_bytes(info: GGUFInfo, n_batch: int, n_outputs: int, n_ctx: int = 512) -> int:
    """Resident part of llama.cpp's compute buffer and logits for our batches: a batch of n_batch
    tokens (prompt chunks, one output) and tree passes of n_outputs tokens with logits for each.
    Estimated from the model's sizes (fp32 activations), not llama.cpp's worst-case reservation."""
    logits = 2 * n_outputs * info.vocab_size * 4  # graph output and llama.cpp's copy
    return activation_bytes(info, n_batch, n_ctx) + logits + 24 * MB


# ---------------------------------------------------------------------------- remote devices

@dataclass(frozen=True)
class RemotePlan:
    """Which of the target's layers live on remote devices (edgecad.rpc): the last ones, in device order."""
    devices: tuple               # RemoteDevice, in the order llama.cpp gets them
    counts: tuple                # layers on each device (consecutive: the first device the earliest)
    first: int                   # the first remote layer; layers first.. n_layer-1 are remote
    weight_bytes: tuple          # each device's bytes of weights (sent at load)
    kv_bytes: tuple              # each device's KV cache
    reserve: int                 # compute buffer reserved on each device
    n_embd: int                  # activations that cross to each device and back: n_embd floats per token

    @property
    def n_layers(self) -> int:
        return sum(self.counts)

    def model_params(self) -> dict:
        """ModelParams fields: llama.cpp offloads the last n_gpu_layers "layers", the output layer among them,
        to the devices in proportion to tensor_split. The output stays on the CPU (cpu_tensors: its logits
        would cross the network) and each device's boundary lies half a layer inside its share."""
        k, split = self.n_layers, [float(c) for c in self.counts]
        if len(split) > 1:
            split[0] -= 0.5
            split[-1] += 1.5
        return dict(n_gpu_layers=k + 1, devices=tuple(d.handle for d in self.devices), tensor_split=tuple(split),
                    cpu_tensors=r"^(output|output_norm|token_embd)\.", remote=True)

    def net_bytes(self, tokens: int, kv_len: int = 0) -> int:
        """Bytes passes over `tokens` tokens in all move over the network (estimated): to each device and back,
        the activations (fp32), and to it the attention mask over the cached cells (fp32, kv_len of them)."""
        return tokens * (2 * self.n_embd * 4 + (_cells(kv_len) if kv_len else 0) * 4) * len(self.devices)

    def describe(self) -> str:
        mb = lambda n: f"{n / MB:,.0f} MB"  # noqa: E731
        out, start = [], self.first
        for d, c, w, kv in zip(self.devices, self.counts, self.weight_bytes, self.kv_bytes):
            out.append(f"remote          {d.name} at {d.endpoint}: layers "
                       + (f"{start}-{start + c - 1}" if c > 1 else f"{start}" if c else "none")
                       + f" ({mb(w)} of weights + KV {mb(kv)} + compute {mb(self.reserve)}; it announces "
                       f"{mb(d.memory_free)} free)")
            start += c
        out.append(f"network         ~{self.net_bytes(1) / 1e3:,.0f} KB per token of a pass (activations in and "
                   "out), + 4 bytes per cached token (the attention mask)")
        return "\n".join(out)


def plan_remote(target: GGUFInfo, devices: list, *, n_ctx: int, n_batch: int) -> Optional[RemotePlan]:
    """As many of the target's last layers as each remote device's announced memory holds (with their KV cache
    and a compute buffer), the first layer kept local; None when no device holds a layer. The last device
    takes the last layers (llama.cpp gives devices consecutive layers in order)."""
    layers = target.layers()
    per_kv = kv_bytes(target, n_ctx) // max(target.n_layer, 1)
    reserve = activation_bytes(target, n_batch, n_ctx) + 24 * MB
    counts, weights, kvs, i = [], [], [], len(layers)
    for d in reversed(devices):
        room, c, w = d.memory_free - reserve, 0, 0
        while i - c > 1 and w + layers[i - c - 1].n_bytes + (c + 1) * per_kv <= room:
            w += layers[i - c - 1].n_bytes
            c += 1
        counts.insert(0, c), weights.insert(0, w), kvs.insert(0, c * per_kv)
        i -= c
    used = [k for k, c in enumerate(counts) if c]  # (a device that holds no layer is left out)
    if not used:
        return None
    pick = lambda xs: tuple(xs[k] for k in used)  # noqa: E731
    return RemotePlan(pick(devices), pick(counts), i, pick(weights), pick(kvs), reserve,
                      int(target.arch_value("embedding_length", 0)))


# ---------------------------------------------------------------------------- measured costs

def cache_dir() -> Path:
    """edgecad's cache directory: EDGECAD_CACHE, else $XDG_CACHE_HOME/edgecad (default ~/.cache/edgecad)."""
    return Path(os.environ.get("EDGECAD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                                os.path.expanduser("~/.cache"), "edgecad"))


def _cache_path() -> Path:
    return cache_dir() / "costs.json"


@dataclass
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


def _cache_key(target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> str:
    name = lambda i: f"{i.path.name}:{i.file_size}" if i is not None else "-"
    return f"{name(target)}|{name(draft)}|{os.cpu_count()}cpu|{n_threads}t"


def load_costs(target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> Costs:
    try:
        d = json.loads(_cache_path().read_text())
        d = d.get(_cache_key(target, draft, n_threads)) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            return Costs()
        return Costs(**{k: v for k, v in d.items() if k in Costs.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError):
        return Costs()


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
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, p)
    except OSError:
        pass


READ_SAMPLE = 256 * 1_000_000  # bytes of the target read to measure the storage


def measure_read(costs: Costs, target: GGUFInfo, draft: Optional[GGUFInfo], n_threads: int) -> None:
    """Measure the storage's read bandwidth on the target's tensor data (dropped from the page cache first)
    and keep it in this device's costs: done once per device and model (the engine, `edgecad doctor`)."""
    costs.read_bps = read_bandwidth(target.path, target.data_offset,
                                    min(READ_SAMPLE, target.file_size - target.data_offset))
    costs.read_measured = True
    save_costs(costs, target, draft, n_threads)


# ---------------------------------------------------------------------------- the plan

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
        mb = lambda n: f"{n / MB:,.0f} MB"
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


def _holds_whole(target: GGUFInfo, room: int, pager: PagerParams) -> bool:
    """The target's tensors fit in `room` (its file also has a header, which is never read again)."""
    try:
        return plan_budget(target, max(room, 1), pager).resident_all
    except EdgecadError:
        return False


def plan_memory(budget: int, target: GGUFInfo, draft: Optional[GGUFInfo], *, n_ctx: int, n_batch: int,
                tree_nodes: int, costs: Costs, pager: PagerParams = PagerParams(), runtime: Optional[int] = None,
                configs: Optional[tuple] = None, target_budget: Optional[int] = None,
                grow_tree: bool = True, remote: Optional[RemotePlan] = None) -> MemoryPlan:
    """The fastest configuration among `configs` (default: all that the models allow) inside `budget`.
    target_budget fixes the target's share instead (bytes of its file kept resident): the budget is
    then whatever the rest needs plus that share. grow_tree: a paged tree may grow past tree_nodes where
    passes are IO-bound (edgecad's own tree; not a baseline's or one the caller fixed)."""
    from .native import can_page
    runtime = process_rss() if runtime is None else runtime
    plans, why_not, smallest = {}, {}, None
    for cfg in configs or (CONFIGS if draft is not None else CONFIGS[:2]):
        if cfg.paged and not can_page():  # (never a pager that cannot hold its budget)
            why_not[cfg.name] = ("this platform's build cannot page a model (it cannot drop a file's pages or find "
                            "llama.cpp's mapping: edgecad.native.capabilities())")
            continue
        r = _plan_config(cfg, budget, target, draft, n_ctx=n_ctx, n_batch=n_batch, tree_nodes=tree_nodes,
                         costs=costs, pager=pager, runtime=runtime, target_budget=target_budget, grow_tree=grow_tree)
        if isinstance(r, MemoryPlan):
            plans[cfg.name] = r
        else:
            why_not[cfg.name], need = r
            smallest = need if smallest is None or (need is not None and need < smallest) else smallest
    if not plans:
        head = ((f"memory budget {budget / MB:,.0f} MB" if target_budget is None else
                 f"target budget {target_budget / MB:,.0f} MB") + f" cannot run {target.path.name}"
                + (f" (with draft {draft.path.name})" if draft is not None else ""))
        if smallest is None:  # every configuration asked for was ruled out by something else
            raise EdgecadError(head + ": " + "; ".join(f"{c}: {w}" for c, w in why_not.items())
                               + ": choose another configuration (mode) or budget")
        raise EdgecadError(head + f": the smallest configuration needs {smallest / MB:,.0f} MB; give a larger "
                           + ("memory_budget" if target_budget is None else "target_budget") + " or a smaller n_ctx")
    best = max(plans.values(), key=lambda p: p.tokens_per_second)
    others = [f"{c} {p.tokens_per_second:.2f}" for c, p in plans.items() if p is not best]
    return replace(best, alternatives={**{c: round(p.tokens_per_second, 3) for c, p in plans.items()}, **why_not},
                   reason=("the only configuration that fits" if not others else
                           "fastest predicted (vs " + ", ".join(others) + " tok/s)"), remote=remote)


# Shrinking steps for a paged configuration that does not fit, tried cumulatively in this order: each frees
# memory at a price (a smaller read-ahead overlaps less IO with compute; smaller prompt batches take more passes,
# each streaming the target; a smaller tree verifies fewer tokens per pass; demand reads overlap nothing).
SHRINK = (("depth", 1), ("n_batch", 256), ("n_batch", 128), ("nodes", 16), ("depth", 0), ("n_batch", 64),
          ("nodes", 8))
MAX_TREE_NODES = 255  # llama.cpp holds 256 sequences per context: root + 255 nodes, each at most one leaf


def _plan_config(cfg: Config, budget: int, target: GGUFInfo, draft: Optional[GGUFInfo], *, n_ctx: int, n_batch: int,
                 tree_nodes: int, costs: Costs, pager: PagerParams, runtime: int,
                 target_budget: Optional[int], grow_tree: bool) -> Union[MemoryPlan, tuple]:
    """One configuration's split of the budget and its predicted speed, or (why it cannot run, the budget it
    would need or None). A paged tree may verify more than tree_nodes nodes where passes are IO-bound
    (tree_size); a paged configuration that does not fit shrinks (SHRINK) before giving up."""
    spec = cfg.speculative
    kv = kv_bytes(target, n_ctx) + (kv_bytes(draft, n_ctx) if spec else 0)
    dw = draft.file_size if spec else 0

    def fixed_for(nb: int, nodes: int) -> tuple[int, int, int]:
        """(compute, fixed, room) with prompt batches of nb tokens and trees of `nodes` drafted nodes."""
        outs = nodes + 1 if spec else 1
        nt = max(nb, outs)  # a tree's pass is one batch too
        c = compute_bytes(target, nt, outs, n_ctx) + (compute_bytes(draft, nt, outs, n_ctx) if spec else 0)
        c += outs * target.vocab_size * 4 if spec else 0  # the drafter's distributions (float32)
        f = runtime + kv + c + dw
        return c, f, (budget - f if target_budget is None else target_budget)

    nb, nodes = n_batch, tree_nodes if spec else 0
    compute, fixed, room = fixed_for(nb, nodes)
    paging = None
    if cfg.paged:
        if target_budget is not None:
            paging = plan_budget(target, target_budget, pager)  # too small: its own clear error
        else:
            paging, nb, nodes, pager = _fit_paged(target, pager, nb, nodes, fixed_for)
            if paging is None:  # the smallest it shrinks to
                need = fixed_for(nb, nodes)[1] + plan_budget(target, 1 << 62, pager).minimum
                return f"needs {need / MB:,.0f} MB", need
        if paging.resident_all:
            return "the target fits: not paged", None
        if spec and grow_tree:  # IO-bound passes verify larger trees, as large as the budget holds
            bigger = tree_size(costs, target, paging, pager, nodes)
            while bigger > nodes:  # (the budget holds it and it streams no more than the smaller tree's plan)
                grown = paging if target_budget is not None else _fit(target, fixed_for(nb, bigger)[2], paging.params)
                if grown is not None and grown.streamed_bytes <= paging.streamed_bytes:
                    nodes, paging = bigger, grown
                    break
                bigger = max(nodes, bigger // 2)
        compute, fixed, room = fixed_for(nb, nodes)
        pipeline = spec and _waits(costs, target, draft, paging, paging.params, nodes)
        if pipeline:  # a chain's distributions beside the tree's (a chain is no deeper than the tree has nodes)
            chain = (nodes + 1) * target.vocab_size * 4
            smaller = paging if target_budget is not None else _fit(target, room - chain, paging.params)
            if smaller is None:
                pipeline = False  # (no room for it: drafting beside the passes is an extra)
            else:
                paging, compute, fixed = smaller, compute + chain, fixed + chain
        tgt = paging.budget
    else:
        pipeline = False
        tgt = target.file_size
        # Resident, the target is read into memory llama.cpp owns (Residency.model_params): it is held
        # whole, nothing of it can be given back, so it fits or the target is paged
        fits = lambda: room >= tgt or _holds_whole(target, room, pager)
        while not fits() and nb > 64:  # smaller prompt batches touch fewer activations: the same
            nb //= 2                   # output, prompts longer than nb take more (cheap, resident) passes
            compute, fixed, room = fixed_for(nb, nodes)
        if not fits():
            need = fixed_for(n_batch, nodes)[1] + tgt
            return f"needs {need / MB:,.0f} MB", need
    total = budget if target_budget is None else fixed + tgt
    tgt = min(tgt, total - fixed)  # (a resident target held whole without its header: the parts add up)
    pager = paging.params if paging else pager
    return MemoryPlan(cfg, total, runtime, dw, kv, compute, tgt, paging,
                      _speed(costs, target, draft if spec else None, paging, pager, nodes), n_batch=nb,
                      tree_nodes=nodes, pipeline=pipeline)


def _fit(target: GGUFInfo, room: int, params: PagerParams) -> Optional[BudgetPlan]:
    """The paging plan for `room`, or None when the target's minimum does not fit in it."""
    try:
        return plan_budget(target, max(room, 0), params)
    except EdgecadError:
        return None


def _fit_paged(target: GGUFInfo, pager: PagerParams, nb: int, nodes: int, fixed_for):
    """The paging plan of the first shrinking step that fits (SHRINK): (plan or None, n_batch, nodes, pager)."""
    for knob, v in ((None, None),) + SHRINK:
        if knob == "depth" and pager.depth > v:
            pager = replace(pager, depth=v)
        elif knob == "n_batch":
            nb = min(nb, v)
        elif knob == "nodes" and nodes:
            nodes = min(nodes, v)
        paging = _fit(target, fixed_for(nb, nodes)[2], pager)
        if paging is not None:
            return paging, nb, nodes, pager
    return None, nb, nodes, pager


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


def _waits(costs: Costs, target: GGUFInfo, draft: GGUFInfo, paging: BudgetPlan, pager: PagerParams,
           nodes: int) -> bool:
    """A tree's pass would wait on storage (its reads less its compute) longer than its drafting takes: the
    pipeline's chain then drafts in time that is otherwise idle (measured: 1.33x at 45 MB/s; 0.95-0.98x where
    compute hides the reads)."""
    n = min(costs.tree_nodes, nodes)
    wait = io_seconds(costs, paging, pager) - costs.target_pass(target.pass_bytes, n + 1, _streamed(paging))
    return wait > costs.draft_time(draft.file_size, n)


def _speed(costs: Costs, target: GGUFInfo, draft: Optional[GGUFInfo], paging: Optional[BudgetPlan],
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


def observe(costs: Costs, plan: MemoryPlan, stats: dict, target_bytes: int, draft_bytes: int) -> Costs:
    """Fold one completion's measurements into the costs (exponential average, weight 1/3 once
    warmed up): acceptance and tree size, per-node draft time, read bandwidth, and the target's pass time:
    a 1-token pass calibrates the compute speed (resident) or the paged overhead (paged), a tree's pass the
    batch slope."""
    if stats.get("mode") in ("linear", "bild"):
        return costs  # other trees: their acceptance is not the tree mode's, which the plan predicts
    # the prompt's pass counts in target_passes, its time in prompt_seconds (not seconds_target, seconds_draft)
    passes = stats.get("target_passes") or 0
    timed = passes - (stats.get("prompt_passes") or 0)
    if timed < 2:
        return costs
    w = 1.0 / min(costs.observed + 1, 3)
    mix = lambda old, new: (1 - w) * old + w * new
    c = replace(costs, observed=costs.observed + 1)
    if plan.speculative and stats.get("draft_tokens"):
        c.tree_tokens = mix(c.tree_tokens, stats["n_tokens"] / passes)
        c.tree_nodes = mix(c.tree_nodes, max(1.0, stats["draft_tokens"] / passes))
        timed_nodes = stats["draft_tokens"] * timed / passes
        c.draft_node_s = mix(c.draft_node_s, stats["seconds_draft"] / timed_nodes / (draft_bytes / 1e9))
    k = (stats["draft_tokens"] / passes + 1) if plan.speculative else 1
    per_pass = max(stats.get("target_compute_seconds", 0.0), 1e-6) / timed
    streamed = _streamed(plan.paging)
    one = c.target_byte_s * target_bytes  # a resident 1-token pass
    if k < 1.5 and streamed:
        c.paged_byte_s = mix(c.paged_byte_s, max(0.0, per_pass - one) / streamed)
    elif k < 1.5:
        c.target_byte_s = mix(c.target_byte_s, per_pass / target_bytes)
    else:  # what the pass would cost resident, over a resident 1-token pass
        resident = max(per_pass - c.paged_byte_s * streamed, one)
        c.batch_slope = mix(c.batch_slope, (resident / one - 1) / (k - 1))
    busy, read = stats.get("io_busy_seconds") or 0.0, stats.get("bytes_read") or 0
    if plan.paged and busy > 0 and read > 64 * MB:
        c.read_bps = mix(c.read_bps, read / busy)
    return c
