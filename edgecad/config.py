"""From the user's arguments to what an engine runs: one `resolve()` for Engine, `edgecad inspect` and
`edgecad doctor`.

It checks the arguments, finds the model files (paths or registry names), checks the draft shares the
target's vocabulary, reads the device's measured costs and plans the memory (edgecad.memory): which
configuration runs, the budget's split, the target's paging plan, the mode and its tree parameters.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import registry
from .errors import EdgecadError, RequestError, VocabularyMismatchError
from .gguf_file import GGUFInfo, read_gguf
from .llama import default_threads
from .memory import (CONFIGS, Costs, MemoryPlan, load_costs, measure_read, parse_memory, plan_memory, process_rss,
                     plan_remote)
from .pager import PagerParams, parse_budget
from .rpc import connect
from .tree import MODE_PARAMS, TreeParams

MODES = ("target", "tree", "linear", "bild")
UNBOUNDED = 1 << 62  # memory_budget=None: no limit, everything resident
MAX_THREADS = 512    # ggml's GGML_MAX_N_THREADS: more aborts inside llama.cpp


@dataclass(frozen=True)
class EngineConfig:
    """What an engine runs, resolved from the user's arguments."""
    target_path: Path
    draft_path: Optional[Path]        # the draft given (None: none); loaded only when the mode is speculative
    target_info: GGUFInfo
    draft_info: Optional[GGUFInfo]    # the draft given, even when the plan runs the target alone
    mode: str                         # one of MODES
    tree_params: Optional[TreeParams] # the mode's, fitted to n_ctx (None in target mode); see Residency.tree_params
    plan: MemoryPlan                  # configuration, budget split, paging plan (plan.paging)
    costs: Costs                      # the device's measured costs the plan used
    pager: PagerParams
    n_ctx: int
    n_threads: int
    tree_params_given: bool = False   # the caller fixed tree_params (no residency adjustment then)
    pipeline: bool = False            # draft beside a paged target's passes: the caller's choice, else the plan's

    @property
    def speculative(self) -> bool:
        return self.mode != "target"

    @cached_property
    def local_info(self) -> GGUFInfo:
        """The target as this device holds it: without the layers on remote devices (plan.remote)."""
        r = self.plan.remote
        return self.target_info.local_part(r.first) if r is not None else self.target_info


def check_int(name: str, value, lo: int, hi: Optional[int], note: str = "") -> None:
    """Raise unless `value` is an integer in [lo, hi] (hi None: no upper bound), naming the range."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and lo <= value and (hi is None or value <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"{lo}..{hi}"
        raise RequestError(f"{name}={value!r} is out of range: use an integer {rng}" + (f" ({note})" if note else ""),
                           name)


MAX_WIDTH = 16  # children per node of a grown tree: beyond 16, an alternative's draft probability is small


def check_same_vocabulary(draft: GGUFInfo, target: GGUFInfo) -> None:
    """Speculative decoding compares token ids: the draft must use the target's vocabulary exactly."""
    if draft.vocab_size != target.vocab_size or draft.vocab_digest != target.vocab_digest:
        raise VocabularyMismatchError(
            f"draft {draft.path} ({draft.vocab_size} tokens) does not share the vocabulary of target "
            f"{target.path} ({target.vocab_size} tokens): pick a draft model of the same family "
            "(same tokenizer)"
        )


def _plan(t_info: GGUFInfo, d_info: Optional[GGUFInfo], budget: int, args: dict, remote: Optional[list],
          n_threads: int, calibrate: bool):
    """(the plan, the costs it was made from): measured first (the storage's read speed, once
    per device and model, where the models do not fit the budget whole), then planned. With remote devices, the
    target's last layers go to them where the target does not fit here resident: the remote split is the plan's
    input, and the plan is made for the local part."""
    costs = load_costs(t_info, d_info, n_threads)  # keyed by the pair given, whatever runs
    may_page = args["target_budget"] is not None or budget < t_info.file_size + (d_info.file_size if d_info else 0)
    if calibrate and may_page and not costs.read_measured:
        measure_read(costs, t_info, d_info, n_threads)
    if not remote:
        return plan_memory(budget, t_info, d_info, costs=costs, **args), costs
    devices = connect(list(remote))
    try:
        whole = plan_memory(budget, t_info, d_info, costs=costs, **args)
    except EdgecadError as e:  # nothing fits here: the target's layers may go to the remote devices
        whole, too_small = None, e
    if whole is not None and not whole.paged and args["target_budget"] is None:
        sys.stderr.write("edgecad: the remote devices are not used: the target fits in this device's memory "
                         "budget\n")
        return whole, costs
    split = plan_remote(t_info, devices, n_ctx=args["n_ctx"], n_batch=args["n_batch"])
    if split is None:
        if whole is None:
            raise EdgecadError(f"{too_small}; and no remote device announces memory for one of its layers")
        sys.stderr.write("edgecad: the remote devices are not used: none announces memory for a layer\n")
        return whole, costs
    local = t_info.local_part(split.first)
    local_costs = load_costs(local, d_info, n_threads)  # (its own: passes also compute remotely)
    if not local_costs.observed and not local_costs.read_measured:  # first time: what the whole target measured
        local_costs = replace(costs, observed=0)
    return plan_memory(budget, local, d_info, costs=local_costs, remote=split, **args), local_costs


def resolve(target: Union[str, os.PathLike, None] = None, draft: Union[str, os.PathLike, None] = None, *,
            mode: Optional[str] = None, tree_params: Optional[TreeParams] = None,
            memory_budget: Union[int, str, None] = "auto", target_budget: Union[int, str, None] = None,
            pager: Optional[PagerParams] = None, pipeline: Optional[bool] = None, n_ctx: int = 4096,
            n_threads: Optional[int] = None, remote: Optional[list] = None, calibrate: bool = True,
            verbose: bool = False) -> EngineConfig:
    """The configuration an Engine with these arguments runs (see Engine for each argument). calibrate: measure
    the storage's read speed when the plan pages and this device has not measured it yet (once per device and
    model; `edgecad inspect` plans without it)."""
    if target is None:  # the default pair (`edgecad models fetch` brings it)
        target = registry.DEFAULT_TARGET
        draft = draft or (registry.DEFAULT_DRAFT if mode != "target" else None)
    if mode is not None and mode not in MODES:
        raise EdgecadError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode not in (None, "target") and draft is None:
        raise EdgecadError(f"mode {mode!r} needs a draft model: pass draft=PATH_OR_NAME (or use mode='target')")
    check_int("n_ctx", n_ctx, 8, None, "tokens")
    if n_threads is not None:
        check_int("n_threads", n_threads, 1, MAX_THREADS, f"this device has {os.cpu_count()} cores")
    n_threads = n_threads or default_threads()
    target_path = registry.resolve(target)
    draft_path = registry.resolve(draft) if draft is not None else None
    t_info = read_gguf(target_path)
    d_info = read_gguf(draft_path) if draft_path is not None else None
    if d_info is not None:
        check_same_vocabulary(d_info, t_info)
    pager = pager or PagerParams()

    t0 = time.perf_counter()
    configs = None if mode is None else tuple(c for c in CONFIGS if c.speculative == (mode != "target"))
    nodes = (tree_params or MODE_PARAMS.get(mode if mode not in (None, "target") else "tree")).max_nodes
    budget = UNBOUNDED if memory_budget is None else parse_memory(
        memory_budget, t_info.file_size + (d_info.file_size if d_info else 0))
    if target_budget is not None:
        target_budget = parse_budget(target_budget, t_info.file_size)
        budget = UNBOUNDED
    grow = mode in (None, "tree") and tree_params is None  # edgecad's own tree grows where passes are IO-bound
    args = dict(n_ctx=n_ctx, n_batch=min(512, n_ctx), tree_nodes=nodes, pager=pager, target_budget=target_budget,
                configs=configs, grow_tree=grow, runtime=process_rss())
    plan, costs = _plan(t_info, d_info, budget, args, remote, n_threads, calibrate)
    if verbose or os.environ.get("EDGECAD_SHOW_PLAN"):
        sys.stderr.write(plan.describe() + f"\n  (planned in {time.perf_counter() - t0:.2f} s)\n")
    mode = mode or ("tree" if plan.speculative else "target")
    tree = tree_params or MODE_PARAMS.get(mode)
    if tree is not None and plan.tree_nodes:  # the plan's tree size: smaller to fit the budget, larger where
        if grow and plan.tree_nodes > tree.max_nodes:  # IO-bound; wider and deeper alike (the break-even
            f = plan.tree_nodes // tree.max_nodes      # decides how much of it a pass uses: drafter, fallback)
            tree = replace(tree, max_nodes=plan.tree_nodes, max_width=min(MAX_WIDTH, tree.max_width * f),
                           max_depth=min(plan.tree_nodes, tree.max_depth * f))
        else:
            tree = replace(tree, max_nodes=min(tree.max_nodes, plan.tree_nodes))
    if tree is not None and tree.max_nodes + 1 > n_ctx // 2:  # a tree's sequences and outputs fit the context
        tree = replace(tree, max_nodes=max(1, n_ctx // 2 - 1))
    return EngineConfig(target_path, draft_path, t_info, d_info, mode, tree, plan, costs, pager, n_ctx, n_threads,
                        tree_params is not None, plan.pipeline if pipeline is None else pipeline)
