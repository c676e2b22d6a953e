"""From the user's arguments to what an engine runs: one `resolve()` for Engine, `edgecad inspect` and
`edgecad doctor`.

It checks the arguments, finds the model files (paths or registry names), checks the draft shares the
target's vocabulary, measures the device (edgecad.measure; remote devices announce their memory), then plans
once (edgecad.plan, pure): which configuration runs, the budget's split, the target's paging plan, the remote
split, the mode and its tree parameters.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import native, registry
from .errors import EdgecadError, RequestError, VocabularyMismatchError
from .gguf_file import GGUFInfo, read_gguf
from .llama import default_threads
from .measure import auto_budget, device
from .plan import CONFIGS, Device, MemoryPlan, PagerParams, parse_budget, parse_memory, plan_memory, plan_remote
from .rpc.client import connect
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
    plan: MemoryPlan                  # configuration, budget split, paging plan, remote split, the costs it used
    pager: PagerParams
    n_ctx: int
    n_threads: int
    pipeline: bool = False            # draft beside a paged target's passes: the caller's choice, else the plan's
    mode_given: Optional[str] = None          # the caller's mode (None: the plan's)
    tree_given: Optional[TreeParams] = None   # the caller's tree_params (no residency adjustment then)
    pipeline_given: Optional[bool] = None     # the caller's pipeline (None: the plan's)
    ceiling: Optional[int] = None     # an explicit memory_budget (moving memory only lowers it); None: "auto"
    follows: bool = False             # the plan may be re-made while running (replan): a whole-engine budget, not
                                      # memory_budget=None, target_budget or remote devices
    device: Optional[Device] = field(default=None, repr=False, compare=False)  # what the plan knew of this device
    plan_args: tuple = field(default=(), repr=False, compare=False)  # the plan's other arguments, (name, value)

    @property
    def speculative(self) -> bool:
        return self.mode != "target"

    @property
    def tree_params_given(self) -> bool:
        return self.tree_given is not None

    @property
    def local_info(self) -> GGUFInfo:
        """The target as this device holds it (without the layers on remote devices)."""
        return self.plan.target_info


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


def _without_recurrent(t_info: GGUFInfo, d_info: GGUFInfo, mode: Optional[str]) -> Optional[str]:
    """The mode with a draft: a recurrent model (or a hybrid) cannot drop the tokens a speculative step rejects
    from its state, so a pair with one runs the target alone (said on stderr), and a speculative mode asked for is
    refused."""
    rec = next((i for i in (t_info, d_info) if i.recurrent), None)
    if rec is None or mode == "target":
        return mode
    why = (f"{rec.path.name} is a recurrent model ({rec.architecture}): its state cannot drop the drafted tokens the "
           "target rejects")
    if mode is not None:
        raise EdgecadError(f"mode {mode!r} cannot run: {why}; use mode='target' (or no draft)")
    sys.stderr.write(f"edgecad: the draft is not used: {why}\n")
    return "target"


def _plan(t_info: GGUFInfo, d_info: Optional[GGUFInfo], budget: int, args: dict, remote: Optional[list],
          n_threads: int, calibrate: bool, follows: bool) -> tuple[MemoryPlan, Device]:
    """Measure (the device; the remote devices' announced memory, split into the target's last layers), then plan
    once. With remote devices, the plan uses them where the target is not held whole here."""
    split = plan_remote(t_info, connect(list(remote)), n_ctx=args["n_ctx"], n_batch=args["n_batch"]) if remote else None
    may_page = follows or args["target_budget"] is not None or budget < t_info.file_size + (
        d_info.file_size if d_info else 0)  # (an engine that follows its memory may page after a move)
    dev = device(t_info, d_info, n_threads, may_page=may_page, calibrate=calibrate,
                 local=split.local if split else None)
    try:
        plan = plan_memory(budget, t_info, d_info, device=dev, remote=split, **args)
    except EdgecadError as e:
        if remote and split is None:
            raise EdgecadError(f"{e}; and no remote device announces memory for one of its layers") from None
        raise
    if remote and plan.remote is None:
        why = "none announces memory for a layer" if split is None else "the target fits in this device's memory budget"
        sys.stderr.write(f"edgecad: the remote devices are not used: {why}\n")
    return plan, dev


def resolve(target: Union[str, os.PathLike, None] = None, draft: Union[str, os.PathLike, None] = None, *,
            mode: Optional[str] = None, tree_params: Optional[TreeParams] = None,
            memory_budget: Union[int, str, None] = "auto", target_budget: Union[int, str, None] = None,
            pager: Optional[PagerParams] = None, pipeline: Optional[bool] = None, n_ctx: int = 4096,
            n_threads: Optional[int] = None, remote: Optional[list] = None, calibrate: bool = True,
            follow: bool = False, verbose: bool = False) -> EngineConfig:
    """The configuration an Engine with these arguments runs (see Engine for each argument). calibrate: measure
    the storage's read speed when the plan pages and this device has not measured it yet (once per device and
    model; `edgecad inspect` plans without it). follow: the engine follows its memory while it runs
    (edgecad.follow): an explicit memory_budget is then a ceiling the room never exceeds."""
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
        mode = _without_recurrent(t_info, d_info, mode)
    pager = pager or PagerParams()
    if pager.memory == "owned" and not native.owned_supported():  # (a llama.cpp whose tensors edgecad cannot point)
        sys.stderr.write("edgecad: this llama.cpp's tensor layout is not the one edgecad knows: streamed layers go "
                         "through the page cache\n")
        pager = replace(pager, memory="cache")

    t0 = time.perf_counter()
    configs = None if mode is None else tuple(c for c in CONFIGS if c.speculative == (mode != "target"))
    nodes = (tree_params or MODE_PARAMS.get(mode if mode not in (None, "target") else "tree")).max_nodes
    budget = UNBOUNDED if memory_budget is None else parse_memory(
        memory_budget, t_info.file_size + (d_info.file_size if d_info else 0), auto_budget)
    auto = isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto"
    follows = follow and memory_budget is not None and target_budget is None and not remote
    ceiling = None if auto or not follows else budget  # (planned as given: a smaller room moves it down)
    if target_budget is not None:
        target_budget = parse_budget(target_budget, t_info.file_size, auto_budget)
        budget = UNBOUNDED
    grow = mode in (None, "tree") and tree_params is None  # edgecad's own tree grows where passes are IO-bound
    args = dict(n_ctx=n_ctx, n_batch=min(512, n_ctx), tree_nodes=nodes, pager=pager, target_budget=target_budget,
                configs=configs, grow_tree=grow)
    plan, dev = _plan(t_info, d_info, budget, args, remote, n_threads, calibrate, follows)
    show_plan(verbose, plan.describe() + f"\n  (planned in {time.perf_counter() - t0:.2f} s)")
    cfg = EngineConfig(target_path, draft_path, t_info, d_info, mode or "target", None, plan, pager, n_ctx, n_threads,
                       mode_given=mode, tree_given=tree_params, pipeline_given=pipeline, ceiling=ceiling,
                       follows=follows, device=dev, plan_args=tuple(args.items()))
    return _configured(cfg, plan)


def show_plan(verbose: bool, text: str) -> None:
    """Write a line of the engine's plan (what it chose, where it runs, how it moved) on stderr, where the user asked
    for it: `verbose`, or EDGECAD_SHOW_PLAN set."""
    if verbose or os.environ.get("EDGECAD_SHOW_PLAN"):
        sys.stderr.write(text + "\n")


def replan(cfg: EngineConfig, budget: int, configs: Optional[tuple] = None) -> EngineConfig:
    """The configuration at another whole-engine budget (memory that moved: edgecad.follow): the same arguments,
    the same device as measured (with its costs as `cfg.device` holds them), planned again; `configs`: only among
    these (a doubted choice's rival: edgecad.plan.doubt). Raises EdgecadError where nothing runs inside `budget`
    (the error names the smallest budget that does)."""
    args = dict(cfg.plan_args)
    args["configs"] = configs or args["configs"]
    plan = plan_memory(budget, cfg.target_info, cfg.draft_info, device=cfg.device, **args)
    return _configured(cfg, plan)


def _configured(cfg: EngineConfig, plan: MemoryPlan) -> EngineConfig:
    """cfg with `plan`: its mode (a speculative plan runs the tree unless a mode was given) and the mode's tree,
    fitted to the plan and the context."""
    given = cfg.mode_given
    mode = given or ("tree" if plan.speculative else "target")
    grow = given in (None, "tree") and not cfg.tree_params_given  # edgecad's own tree grows where passes are IO-bound
    tree = cfg.tree_given or MODE_PARAMS.get(mode)
    if tree is not None and plan.tree_nodes:  # the plan's tree size: smaller to fit the budget, larger where
        if grow and plan.tree_nodes > tree.max_nodes:  # IO-bound; wider and deeper alike (the break-even
            f = plan.tree_nodes // tree.max_nodes      # decides how much of it a pass uses: drafter, fallback)
            tree = replace(tree, max_nodes=plan.tree_nodes, max_width=min(MAX_WIDTH, tree.max_width * f),
                           max_depth=min(plan.tree_nodes, tree.max_depth * f))
        else:
            tree = replace(tree, max_nodes=min(tree.max_nodes, plan.tree_nodes))
    if tree is not None and tree.max_nodes + 1 > cfg.n_ctx // 2:  # a tree's sequences and outputs fit the context
        tree = replace(tree, max_nodes=max(1, cfg.n_ctx // 2 - 1))
    pipeline = plan.pipeline if cfg.pipeline_given is None else cfg.pipeline_given
    return replace(cfg, mode=mode, tree_params=tree, plan=plan, pipeline=pipeline)
