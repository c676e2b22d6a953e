"""edgecad.Engine: the public API, shaped like llama-cpp-python's `Llama`.

An Engine owns the target model (and optionally a draft model), each with one
llama.cpp context. `create_completion` turns a prompt into tokens, runs the
decoder of the engine's mode (a generator of token ids), and assembles text,
stop strings, streaming chunks and statistics in one place for every mode.
"""
from __future__ import annotations

import codecs
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import native, registry
from .devices import placement
from .errors import EdgecadError, PromptTooLongError, VocabularyMismatchError
from .fidelity import NEAR_TIE_EPS, top2_gap
from .gguf_file import GGUFInfo, read_gguf
from .llama import Batch, Context, ContextParams, Model, ModelParams, default_threads, set_verbose
from .memory import CONFIGS, load_costs, measure_read, observe, parse_memory, plan_memory, save_costs
from .pager import (Pager, PagerParams, emulate_storage, file_mappings, lazy_load, new_mapping, parse_budget,
                    storage_bytes_read)
from .sampling import SamplingParams, penalize, pick
from .tree import MODE_PARAMS, Drafter, FallbackThreshold, TokenTree, TreeParams
from .verify import Verdict, accept_bild, accept_greedy, accept_sampling, keep_accepted, verify_tree

MODES = ("target", "tree", "linear", "bild")
_UNBOUNDED = 1 << 62  # memory_budget=None: no limit, everything resident
MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold, so leaves per tree < 256


@dataclass
class Stats:
    """Counters of one completion; `as_dict` is the completion's `edgecad` entry."""
    mode: str
    lossless: bool = True
    prompt_tokens: int = 0
    prompt_reused: int = 0       # prompt tokens the target's cache already held (not decoded again)
    token_ids: list = field(default_factory=list)
    target_passes: int = 0       # target passes that produce tokens (target mode: one per token)
    draft_tokens: int = 0        # tree nodes drafted, roots excluded
    accepted_tokens: int = 0     # drafted tokens accepted
    draft_passes: int = 0        # draft llama_decode calls after the prompt
    bild_divergent: int = 0      # bild: accepted drafted tokens that differ from the target's argmax
    prompt_seconds: float = 0.0  # prompt processing (prefill) time
    seconds: float = 0.0         # generation time after the prompt
    seconds_draft: float = 0.0   # of which drafting
    seconds_target: float = 0.0  # of which target passes
    seconds_chain: float = 0.0   # drafting chains beside target passes (pipeline; overlaps seconds_target)
    chain_tokens: int = 0        # tokens drafted into chains beside target passes
    reused_tokens: int = 0       # chain tokens the next tree started from (drafted during a pass, kept)
    near_ties: int = 0           # emitted tokens where the target's top-2 logits were within NEAR_TIE_EPS:
                                 # where another mode's numerics (batched vs single token) may choose the other
    fallback: Optional[dict] = None  # summary of the fallback threshold's history
    paging: Optional[dict] = None    # target_budget_bytes, peak_resident_target_bytes, bytes_read, io_wait_seconds
    memory: Optional[object] = None  # the engine's MemoryPlan (edgecad.memory)

    def as_dict(self) -> dict:
        n, passes = len(self.token_ids), max(self.target_passes, 1)
        d = {
            "mode": self.mode,
            "lossless": self.lossless,
            "n_tokens": n,
            "token_ids": list(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_reused": self.prompt_reused,
            "prompt_seconds": self.prompt_seconds,
            "seconds": self.seconds,
            "tokens_per_second": n / self.seconds if self.seconds > 0 else 0.0,
            "target_passes": self.target_passes,
            "mean_accepted_per_pass": n / passes,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "tree_nodes_per_pass": self.draft_tokens / passes,
            "draft_passes": self.draft_passes,
            "seconds_draft": self.seconds_draft,
            "seconds_target": self.seconds_target,
            "seconds_chain": self.seconds_chain,
            "chain_tokens": self.chain_tokens,
            "reused_tokens": self.reused_tokens,
            "near_ties": self.near_ties,
            "fallback": self.fallback,
        }
        if self.mode == "bild":
            d["bild_divergent_tokens"] = self.bild_divergent
        pg, mem = self.paging or {}, self.memory
        d["config"] = mem.config if mem else self.mode
        d["config_reason"] = mem.reason if mem else ""
        bounded = mem is not None and mem.budget < _UNBOUNDED
        d["budget_bytes"] = mem.budget if bounded else None
        d["memory_plan"] = mem.parts if bounded else None
        d["target_budget_bytes"] = pg.get("target_budget_bytes")
        d["peak_resident_target_bytes"] = pg.get("peak_resident_target_bytes")
        d["bytes_read"] = pg.get("bytes_read", 0)
        d["io_wait_seconds"] = pg.get("io_wait_seconds", 0.0)
        d["io_busy_seconds"] = pg.get("io_busy_seconds", 0.0)  # the IO thread reading (overlaps compute)
        d["draft_layers_in_pass"] = pg.get("draft_layers_in_pass", 0)  # draft layers run while a pass waited on IO
        d["gate_wait_seconds"] = pg.get("gate_wait_seconds", 0.0)  # chain drafting held while the target computed
        d["target_compute_seconds"] = self.seconds_target - d["io_wait_seconds"]
        return d


def check_same_vocabulary(draft: GGUFInfo, target: GGUFInfo) -> None:
    """Speculative decoding compares token ids: the draft must use the target's vocabulary exactly."""
    if draft.vocab_size != target.vocab_size or draft.vocab_digest != target.vocab_digest:
        raise VocabularyMismatchError(
            f"draft {draft.path} ({draft.vocab_size} tokens) does not share the vocabulary of target "
            f"{target.path} ({target.vocab_size} tokens): pick a draft model of the same family "
            "(same tokenizer)"
        )


class Engine:
    """Run a target model, optionally sped up by a resident draft model.

    Args (keyword-only after `draft`):
        target, draft: a GGUF path or a registry name (see `edgecad models list`); no target: the
            default pair (qwen2.5-coder 1.5B + 0.5B), once fetched with `edgecad models fetch`.
        mode: "tree" (edgecad: token tree + adaptive fallback), "linear" (a chain, llama.cpp's
            speculative defaults), "bild" (Big Little Decoder; not lossless) or "target" (no draft).
            None: the automatic configuration picks the fastest of target-only and draft + tree, the
            target resident or paged, inside memory_budget (see edgecad.memory; stats say which and why).
        tree_params: override the mode's TreeParams (see edgecad.tree).
        memory_budget: everything the engine may hold resident (both models' weights, KV caches, compute
            buffers, the process itself): an int, "1.5GB", "60%" (of the draft + target files), "auto"
            (available memory or the cgroup limit, less a margin), or None for no limit.
        target_budget: fix the target's share instead: bytes of the target file kept resident ("450MB",
            "40%" of the target); the rest of the engine comes on top. For experiments and tests.
        pager: how the target is streamed under a budget (IO mode, read-ahead, storage profile).
        pipeline: with a paged target and a draft, draft on while the target's pass waits on storage
            (a chain past the tree's best leaf, kept when the target accepts that branch). Off by
            default: measured 0.89-0.97x on 2 cores (docs/paging.md, "The pipeline").
        n_ctx: context length in tokens (prompt + completion).
        backend: "auto" (the draft on a GPU when this llama.cpp has one: Metal, Vulkan, CUDA; the target on
            the CPU) or "cpu". See edgecad.devices and docs/devices.md.
        draft_gpu_layers: draft layers on the GPU; None = all when a GPU is used (-1 = all, llama.cpp's way).
        target_gpu_layers: target layers on the GPU (default 0): only with a resident target, except on
            Metal (unproven): CUDA and Vulkan copy offloaded weights, which then cannot be paged.
        n_threads: compute threads; None = all cores this process may use.
        seed: default random seed of sampled completions.
        verbose: print llama.cpp's log.
        progress: show the models' load progress on stderr.
    """

    def __init__(
        self,
        target: Union[str, os.PathLike, None] = None,
        draft: Union[str, os.PathLike, None] = None,
        *,
        # decoding
        mode: Optional[str] = None,
        tree_params: Optional[TreeParams] = None,
        # memory
        memory_budget: Union[int, str, None] = "auto",
        target_budget: Union[int, str, None] = None,
        pager: Optional[PagerParams] = None,
        pipeline: bool = False,
        n_ctx: int = 4096,
        # compute
        backend: str = "auto",
        draft_gpu_layers: Optional[int] = None,
        target_gpu_layers: int = 0,
        n_threads: Optional[int] = None,
        seed: Optional[int] = None,
        verbose: bool = False,
        progress: bool = False,
    ):
        self._target_model = self._draft_model = self._drafter = self._batch = self._pager = self._chain = None
        self._target = self._draft = None
        native.lib.ec_interrupt_clear()
        set_verbose(verbose)
        self.verbose = verbose
        if target is None:  # the default pair (`edgecad models fetch` brings it)
            target = registry.DEFAULT_TARGET
            draft = draft or (registry.DEFAULT_DRAFT if mode != "target" else None)
        if mode is not None and mode not in MODES:
            raise EdgecadError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode not in (None, "target") and draft is None:
            raise EdgecadError(f"mode {mode!r} needs a draft model: pass draft=PATH_OR_NAME (or use mode='target')")
        _check_int("n_ctx", n_ctx, 8, None, "tokens")
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1, MAX_THREADS, f"this device has {os.cpu_count()} cores")
        self.n_threads = n_threads or default_threads()
        self.target_path = registry.resolve(target)
        self.draft_path = registry.resolve(draft) if draft is not None else None
        t_info = read_gguf(self.target_path)
        d_info = read_gguf(self.draft_path) if self.draft_path is not None else None
        if d_info is not None:
            check_same_vocabulary(d_info, t_info)
        pager = pager or PagerParams()
        self._infos = (t_info, d_info)  # the cost cache's key: the pair given, whatever runs

        # The memory plan: which configuration runs, and how the budget is split (edgecad.memory).
        t0 = time.perf_counter()
        self._costs = load_costs(t_info, d_info, self.n_threads)
        configs = None if mode is None else (CONFIGS[:2] if mode == "target" else CONFIGS[2:])
        n_batch = min(512, n_ctx)
        nodes = (tree_params or MODE_PARAMS.get(mode if mode not in (None, "target") else "tree")).max_nodes
        budget = _UNBOUNDED if memory_budget is None else parse_memory(
            memory_budget, t_info.file_size + (d_info.file_size if d_info else 0))
        if target_budget is not None:
            target_budget = parse_budget(target_budget, t_info.file_size)
            budget = _UNBOUNDED
        plan_args = dict(n_ctx=n_ctx, n_batch=n_batch, tree_nodes=nodes, pager=pager, target_budget=target_budget)
        plan = plan_memory(budget, t_info, d_info, costs=self._costs, configs=configs, **plan_args)
        if plan.paged and not self._costs.read_measured:  # calibrate the storage once per device and model
            measure_read(self._costs, t_info, d_info, self.n_threads)
            plan = plan_memory(budget, t_info, d_info, costs=self._costs, configs=configs, runtime=plan.runtime,
                               **plan_args)
        self.memory_plan = plan
        self.budget_plan = plan.paging
        self.mode = mode or ("tree" if plan.speculative else "target")
        self.tree_params = tree_params or MODE_PARAMS.get(self.mode)
        self.check_kv = False  # tests: assert both KV caches hold only the accepted path after every step
        if verbose or os.environ.get("EDGECAD_SHOW_PLAN"):
            sys.stderr.write(plan.describe() + f"\n  (planned in {time.perf_counter() - t0:.2f} s)\n")
        paged = plan.paged
        if tree_params is None and self.tree_params is not None and not paged:
            # The cost-aware cap measured +13% tok/s paged but -7% resident (scripts/eval_fallback.py):
            # a resident target's passes are cheap, LLMCad's threshold alone does better there.
            self.tree_params = replace(self.tree_params, cost_aware=False)
        speculative = self.mode != "target"
        t_gpu, d_gpu = self._load(plan, t_info, d_info, pager, speculative, backend=backend,
                                  draft_gpu_layers=draft_gpu_layers, target_gpu_layers=target_gpu_layers,
                                  progress=progress)
        if speculative and self.tree_params.max_nodes + 1 > n_ctx // 2:  # a tree's sequences and outputs fit n_ctx
            self.tree_params = replace(self.tree_params, max_nodes=max(1, n_ctx // 2 - 1))
        n_seq = min(MAX_SEQ, self.tree_params.max_nodes + 1) if speculative else 1
        # llama.cpp reserves max(outputs, sequences) logit rows and allows n_batch outputs: n_batch >= n_seq
        cp = ContextParams(n_ctx=n_ctx, n_batch=max(plan.n_batch, n_seq), n_seq_max=n_seq, n_threads=self.n_threads,
                           op_offload=t_gpu != 0)
        hooks = {}
        if self._pager is not None:
            hooks = dict(cb_eval=self._pager.cb_eval, cb_eval_user_data=self._pager.handle,
                         after_decode=self._pager.after_pass)
        self.pipeline = bool(pipeline and speculative and self._pager is not None)
        self._target = Context(self._target_model, cp, **hooks)
        self.n_ctx = self._target.n_ctx
        self._batch = Batch(max(cp.n_batch, n_seq), n_seq)
        self._drafter = None
        if speculative:
            gate = dict(cb_eval=self._pager.gate_cb_eval, cb_eval_user_data=self._pager.handle) if self.pipeline else {}
            self._draft = Context(self._draft_model, replace(cp, op_offload=d_gpu != 0), **gate)
            self._drafter = Drafter(self._draft, self.tree_params, n_seq, cp.n_batch)
        if native.lib.ec_interrupt_pending():  # a Ctrl-C while C code ran (a log callback may have eaten it)
            self.close()
            raise KeyboardInterrupt
        self._rng = np.random.default_rng(_seed(seed))
        self._lock, self._streaming = threading.Lock(), False  # one completion at a time; it is an open stream
        self._chat_format = None  # the model's chat template, compiled on first use

    def _load(self, plan, t_info: GGUFInfo, d_info: Optional[GGUFInfo], pager: PagerParams, speculative: bool, *,
              backend: str, draft_gpu_layers: Optional[int], target_gpu_layers: int, progress: bool) -> tuple[int, int]:
        """Load the models where they compute (edgecad.devices) and, when paged, the pager. A paged target is
        mapped without being read (lazy_load); the pager reads what the plan keeps. Under a --storage profile,
        what the loads read from storage takes that storage's time. Returns (target, draft) GPU layers."""
        paged, verbose = plan.paged, self.verbose
        self.device, d_gpu, t_gpu = placement(backend, draft_gpu_layers, target_gpu_layers, paged)
        if self.device is not None and (verbose or os.environ.get("EDGECAD_SHOW_PLAN")):
            sys.stderr.write(f"  device        {self.device.name} ({self.device.description}): draft layers "
                             f"{'all' if d_gpu < 0 else d_gpu}, target layers {'all' if t_gpu < 0 else t_gpu}"
                             + (" (paging offloaded layers on Metal is unproven)" if t_gpu and paged else "") + "\n")
        t_load, read0 = time.perf_counter(), storage_bytes_read()
        before = file_mappings(self.target_path) if paged else set()
        with lazy_load(self.target_path, enabled=paged) as lazy:
            # Weight repacking is faster resident but copies the weights out of the mapping: off when paged.
            params = ModelParams(use_mmap=True, use_extra_bufts=not paged, n_gpu_layers=t_gpu)
            self._target_model = Model(self.target_path, params, t_info,
                                       progress=f"loading {self.target_path.name}" if progress else None)
        if paged and not lazy.applied and verbose:
            sys.stderr.write(f"edgecad: the target is read whole at load, then evicted ({lazy.reason})\n")
        if speculative:
            params = ModelParams(use_mmap=True, use_extra_bufts=True, n_gpu_layers=d_gpu)
            self._draft_model = Model(self.draft_path, params, d_info,
                                      progress=f"loading {self.draft_path.name}" if progress else None)
        emulate_storage(storage_bytes_read(since=read0), t_load, pager.bytes_per_second)
        if paged:  # its reads are throttled by the pager itself
            self._pager = Pager(self._target_model, t_info, plan.paging, new_mapping(self.target_path, before))
        self.lazy_load = lazy
        self.load_seconds = time.perf_counter() - t_load  # models loaded, pinned layers read
        self.load_bytes_read = storage_bytes_read(since=read0)  # from storage (page-cache hits: 0)
        return t_gpu, d_gpu

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: Union[str, bytes], add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` (llama-cpp-python's `Llama.tokenize`): BOS when the vocabulary uses one and
        add_bos; special-token texts parsed as special tokens when `special`."""
        return self._target_model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return self._target_model.detokenize(tokens, special=special)

    # ------------------------------------------------------------------ decoders

    def _decode_target(self, prompt: Sequence[int], max_tokens: int, sp: SamplingParams,
                       rng: np.random.Generator, stats: Stats) -> Iterator[int]:
        """Plain decoding: one target pass per token."""
        ctx, b = self._target, self._batch
        t0 = time.perf_counter()
        logits = ctx.sync(self._batch, prompt, logits=True)
        stats.prompt_seconds, stats.prompt_reused = time.perf_counter() - t0, ctx.reused
        stats.target_passes = 1  # the prompt's pass gives the first token
        generated = []
        for i in range(max_tokens):
            tok = pick(penalize(logits, generated, sp.repeat_penalty), sp, rng)
            stats.near_ties += top2_gap(logits) < NEAR_TIE_EPS
            generated.append(tok)
            yield tok
            if self._target_model.is_eog(tok) or i + 1 == max_tokens or len(ctx.tokens) >= self.n_ctx:
                return
            b.clear()
            b.add(tok, len(ctx.tokens), (0,), True)
            td = time.perf_counter()
            ctx.decode(b)
            ctx.tokens.append(tok)
            stats.seconds_target += time.perf_counter() - td
            stats.target_passes += 1
            logits = ctx.logits(0)

    def _acceptance(self, sp: SamplingParams):
        """The acceptance rule of this engine and completion: (tree, logits, rng, recent) -> (path, bonus,
        divergent); `recent`: the tokens generated before the root (the repeat penalty's history)."""
        p = self.tree_params
        if p.acceptance == "bild":
            return lambda tree, logits, rng, recent: accept_bild(tree, logits, sp, rng, p.rollback_ce, recent)
        if sp.greedy:
            return lambda tree, logits, rng, recent: (*accept_greedy(tree, logits, recent, sp.repeat_penalty), 0)
        return lambda tree, logits, rng, recent: (*accept_sampling(tree, logits, sp, rng, recent), 0)

    def _verify(self, tree: TokenTree, accept, sp: SamplingParams, rng: np.random.Generator,
                chain_rng: np.random.Generator, chain_len: int, recent: Sequence[int] = ()) -> Verdict:
        """The target's half of a step: one pass over the root and every node, the acceptance rule,
        the target's KV cut to the accepted path. With the pipeline, the draft drafts a chain past the
        tree's best leaf meanwhile (its decodes run while the pass waits on storage: ec_pager_gate)."""
        if not self.pipeline or chain_len < 2:
            t0 = time.perf_counter()
            logits, leaf_seq = verify_tree(self._target, self._batch, tree)
            seconds = time.perf_counter() - t0
        else:
            # The chain is drafted in a second thread; the target runs in this one, as the tree drafting
            # does: llama.cpp's OpenMP team belongs to the calling thread, and one team's threads spinning
            # after its decode slow the other team's next decode on small core counts.
            done, box = threading.Event(), {}

            def chain():
                try:
                    self._drafter.extend(tree, sp, chain_rng, chain_len, done.is_set)
                except BaseException as e:  # re-raised in this thread
                    box["err"] = e

            th = self._chain = threading.Thread(target=chain, name="edgecad-chain")
            t0 = time.perf_counter()
            try:
                self._pager.begin_pass()
                th.start()
                logits, leaf_seq = verify_tree(self._target, self._batch, tree)
            finally:
                seconds = time.perf_counter() - t0
                done.set()
                try:
                    self._pager.end_pass()  # never leave the draft gated (the decode may not have run)
                finally:
                    self._join_chain()
            if "err" in box:
                raise box["err"]
        path, bonus, divergent = accept(tree, logits, rng, recent)
        ties = tuple(top2_gap(logits[i]) < NEAR_TIE_EPS for i in [0, *path])  # the rows that chose each token
        keep_accepted(self._target, tree, leaf_seq, path)
        return Verdict(path, bonus, divergent, seconds, ties)

    def _decode_speculative(self, prompt: Sequence[int], max_tokens: int, sp: SamplingParams,
                            rng: np.random.Generator, stats: Stats) -> Iterator[int]:
        """Speculative decoding, one step per target pass: the draft builds a tree from the last
        accepted token (the root) -> the target verifies root and tree in one pass -> a verdict
        (accepted path, bonus token) -> both caches keep that path -> the threshold adapts."""
        p, drafter = self.tree_params, self._drafter
        t0 = time.perf_counter()
        self._target.sync(self._batch, prompt[:-1])  # the target's KV: every accepted token but the root
        drafter.start(prompt)
        stats.prompt_seconds, stats.prompt_reused = time.perf_counter() - t0, self._target.reused
        stats.lossless = p.acceptance == "exact"
        accept, fallback = self._acceptance(sp), FallbackThreshold(p)
        chain_rng = np.random.default_rng(rng.integers(1 << 63)) if self.pipeline else None
        root_pos, produced, generated = len(self._target.tokens), 0, []  # the root's position
        d0 = (drafter.decodes, drafter.seconds, drafter.seconds_extend, drafter.chain_tokens, drafter.reused_tokens)
        try:
            while produced < max_tokens and root_pos < self.n_ctx:
                room, left = self.n_ctx - root_pos - 1, max_tokens - produced - 1  # KV cells, tokens after the root
                t_step = time.perf_counter()
                tree = drafter.draft(min(p.max_nodes, room), min(p.max_depth, room, left), sp, rng, fallback.current())
                depth = int(tree.depth[: tree.n].max())
                # chain tokens: useful up to the next tree's depth, and the draft's KV cells free beside the tree
                verdict = self._verify(tree, accept, sp, rng, chain_rng,
                                       min(p.max_depth + 1, room - tree.n_drafted - 1, left - depth), generated)
                drafter.accept(tree, verdict.path, verdict.bonus)
                fallback.step(tree, verdict.path, time.perf_counter() - t_step)
                stats.seconds_target += verdict.seconds
                stats.target_passes += 1
                stats.draft_tokens += tree.n_drafted
                stats.bild_divergent += verdict.divergent
                root_pos = len(self._target.tokens)
                if self.check_kv:
                    self._check_kv(root_pos)
                for j, (tok, tie) in enumerate(zip([int(tree.token[i]) for i in verdict.path] + [verdict.bonus],
                                                   verdict.ties)):
                    stats.near_ties += tie
                    stats.accepted_tokens += j < len(verdict.path)  # drafted tokens emitted (none past an end)
                    generated.append(tok)
                    yield tok
                    produced += 1
                    if produced >= max_tokens or self._target_model.is_eog(tok):
                        return
        finally:
            n, s, se, ct, rt = d0
            stats.draft_passes = drafter.decodes - n
            stats.seconds_draft = drafter.seconds - s
            stats.seconds_chain = drafter.seconds_extend - se
            stats.chain_tokens = drafter.chain_tokens - ct
            stats.reused_tokens = drafter.reused_tokens - rt
            stats.fallback = fallback.summary() if p.fallback == "adaptive" else None

    def _join_chain(self) -> None:
        """Wait for the pipeline's chain thread, if one was started: it drafts in the draft's context and passes
        the pager's gate, so it must be gone before either is freed (close joins it too, should a Ctrl-C have
        landed between its start and the join in _verify)."""
        th = self._chain
        if th is not None and th.ident is not None:
            interrupted = False
            while th.is_alive():  # a Ctrl-C inside the join must not leave the thread running
                try:
                    th.join()
                except KeyboardInterrupt:
                    interrupted = True
            self._chain = None
            if interrupted:
                raise KeyboardInterrupt
        self._chain = None

    def _check_kv(self, root_pos: int) -> None:
        """Both caches hold only sequence 0: the target every accepted token before the root,
        the draft its first n_past accepted tokens (and a kept chain). Raises AssertionError otherwise."""
        for ctx, n in ((self._target, root_pos), (self._draft, self._drafter.kv_end + 1)):
            assert ctx.seq_pos_min(0) == (0 if n else -1) and ctx.seq_pos_max(0) == n - 1, (
                f"sequence 0 holds {ctx.seq_pos_min(0)}..{ctx.seq_pos_max(0)}, expected 0..{n - 1}")
            left = [s for s in range(1, ctx.params.n_seq_max) if ctx.seq_pos_max(s) != -1]
            assert not left, f"branch sequences {left} were left in the KV cache"

    # ------------------------------------------------------------------ completion
    # llama-cpp-python's `Llama` surface: same names, defaults and result shapes. Arguments that
    # edgecad does not implement are accepted at their defaults and refused otherwise (_unsupported).

    def create_completion(
        self,
        prompt: Union[str, Sequence[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Union[str, Sequence[str], None] = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria=None,
        logits_processor=None,
        grammar=None,
        logit_bias=None,
    ):
        """Complete `prompt` (text or token ids): a `text_completion` dict, or an iterator of chunks
        if stream. The dict's `edgecad` entry holds the statistics (configuration, speed, paging)."""
        _unsupported(suffix=suffix, typical_p=typical_p, logprobs=logprobs, echo=echo,
                     frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                     tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                     stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
                     logit_bias=logit_bias)
        tokens = self.tokenize(prompt, special=True) if isinstance(prompt, (str, bytes)) else [int(t) for t in prompt]
        sp = _sampling(temperature, top_k, top_p, min_p, repeat_penalty)
        chunks = self._completion_chunks(tokens, max_tokens, sp, _stops(stop), seed, stream=stream)
        return chunks if stream else _join(chunks)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: Sequence[dict],
        functions=None,
        function_call=None,
        tools=None,
        tool_choice=None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Union[str, Sequence[str], None] = None,
        seed: Optional[int] = None,
        response_format=None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor=None,
        grammar=None,
        logit_bias=None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ):
        """Answer a conversation rendered with the model's own chat template (the GGUF's
        tokenizer.chat_template, through llama-cpp-python's sandboxed Jinja2 formatter): a
        `chat.completion` dict, or an iterator of `chat.completion.chunk`s if stream."""
        _unsupported(functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                     typical_p=typical_p, response_format=response_format, presence_penalty=presence_penalty,
                     frequency_penalty=frequency_penalty, tfs_z=tfs_z,
                     mirostat_mode=mirostat_mode, logits_processor=logits_processor, grammar=grammar,
                     logit_bias=logit_bias, logprobs=logprobs, top_logprobs=top_logprobs)
        tokens, stops = self.chat_tokens(messages)
        sp = _sampling(temperature, top_k, top_p, min_p, repeat_penalty)
        chunks = self._completion_chunks(tokens, max_tokens, sp, stops + _stops(stop), seed, stream=stream)
        return _chat_chunks(chunks) if stream else _chat_message(_join(chunks))

    def chat_tokens(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """The conversation as prompt tokens (ending with the assistant's turn opened), and the
        template's stop strings."""
        if self._chat_format is None:
            self._chat_format = self._target_model.chat_formatter()
        try:
            r = self._chat_format(messages=list(messages))
        except Exception as e:  # the template's own checks (roles must alternate, ...): jinja2 raises
            raise EdgecadError(f"the model's chat template refused these messages: {e}") from None
        tokens = self.tokenize(r.prompt, add_bos=not r.added_special, special=True)
        rstop = r.stop if isinstance(r.stop, list) else [r.stop] if r.stop else []
        return tokens, [s for s in rstop if s]

    def _completion_chunks(self, *args, stream: bool) -> Iterator[dict]:
        """One completion at a time per Engine (both contexts' KV is one state): a call waits while another
        completion computes, and is refused while a stream is open (waiting for its reader could deadlock:
        the reader may be the caller, or need the caller's thread)."""
        while not self._lock.acquire(timeout=0.02):
            if self._streaming:
                raise EdgecadError("another completion of this Engine is still streaming: read that stream to its "
                                   "end (or close it) first, or use one Engine per concurrent stream")
        self._streaming = stream
        try:
            native.lib.ec_interrupt_clear()  # a Ctrl-C before this completion is not this one's
            yield from self._chunks(*args)
        finally:
            self._streaming = False
            self._lock.release()

    def _chunks(self, tokens: list[int], max_tokens: Optional[int], sp: SamplingParams,
                stops: list[str], seed: Optional[int]) -> Iterator[dict]:
        if not tokens:
            raise EdgecadError("the prompt is empty: give at least one character of text")
        if len(tokens) >= self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}: "
                f"shorten the prompt or raise n_ctx above {len(tokens)}"
            )
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self.n_ctx - len(tokens)
        seed = _seed(seed)
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        stats = Stats(mode=self.mode, prompt_tokens=len(tokens))
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text: str, finish: Optional[str]) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": str(self.target_path),
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        # text: everything decoded so far (whole UTF-8 characters only); text[:emitted] is streamed.
        # A stop string can only start at or after `emitted` (a possible start is held back), so each
        # token costs a search over the unstreamed tail, not over the whole text.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as llama-cpp-python
        text, emitted, finish, cut = "", 0, "length", None
        for m in (self._target_model, self._draft_model):
            if m is not None:
                m.check_file()
        if self._pager is not None:
            self._pager.recover()
            self._pager.reset_peak()
            before = self._pager.stats()
        t0 = time.perf_counter()
        decode = self._decode_target if self.mode == "target" else self._decode_speculative
        decoder = decode(tokens, max_tokens, sp, rng, stats)
        try:
            for tok in decoder:
                stats.token_ids.append(tok)
                if self._target_model.is_eog(tok):
                    finish = "stop"
                    break
                text += utf8.decode(self._target_model.token_to_piece(tok))
                hits = [i for i in (text.find(s, emitted) for s in stops) if i >= 0]
                if hits:
                    finish, cut = "stop", min(hits)
                    break
                safe = len(text) - _held_back(text, stops, emitted)
                if safe > emitted:
                    yield chunk(text[emitted:safe], None)
                    emitted = safe
        finally:
            decoder.close()
        if cut is None:
            text += utf8.decode(b"", final=True)
            cut = len(text)
        stats.seconds = time.perf_counter() - t0 - stats.prompt_seconds
        if self._pager is not None:
            after = self._pager.stats()
            stats.paging = {
                "target_budget_bytes": self.budget_plan.budget,
                "peak_resident_target_bytes": after["peak_resident"],
                "bytes_read": after["bytes_read"] - before["bytes_read"],
                "io_wait_seconds": (after["io_wait_ns"] - before["io_wait_ns"]) / 1e9,
                "io_busy_seconds": (after["io_busy_ns"] - before["io_busy_ns"]) / 1e9,
                "draft_layers_in_pass": after["draft_layers_in_pass"] - before["draft_layers_in_pass"],
                "gate_wait_seconds": (after["gate_wait_ns"] - before["gate_wait_ns"]) / 1e9,
            }
        stats.memory = self.memory_plan
        last = chunk(text[emitted:cut], finish)
        n = len(stats.token_ids) - (finish == "stop" and bool(stats.token_ids)
                                    and self._target_model.is_eog(stats.token_ids[-1]))
        last["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}
        last["edgecad"] = stats.as_dict()
        self._learn(last["edgecad"])
        yield last

    def _learn(self, st: dict) -> None:
        """Correct the device's measured costs with this completion (edgecad.memory.observe)."""
        if self.mode in ("linear", "bild"):
            return  # other trees: their acceptance is not the tree mode's
        t, d = self._infos
        costs = observe(self._costs, self.memory_plan, st, t.file_size, d.file_size if d else 0)
        if costs is not self._costs:
            self._costs = costs
            save_costs(costs, t, d, self.n_threads)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free both models and contexts, once a completion computing in another thread is done (an open
        stream paused between chunks does not hold it up: its next chunk then fails, the engine closed)."""
        lock, held = getattr(self, "_lock", None), False
        while lock is not None and not (held := lock.acquire(timeout=0.02)) and not self._streaming:
            pass
        try:
            self._join_chain()
            for name in ("_drafter", "_batch", "_target", "_draft", "_pager", "_target_model", "_draft_model"):
                obj = getattr(self, name, None)
                if obj is not None:
                    obj.close()
                    setattr(self, name, None)
        finally:
            if held:
                lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ test hooks
    # Documented and kept stable for tests and measurement scripts (they are not needed to generate):
    # `check_kv` (set True: after every speculative step, assert both KV caches hold only the accepted
    # path), and the parts below.

    @property
    def pager(self) -> Optional[Pager]:
        """The target's native pager when the target is paged (stats, inject_fault, set_throttle), else None."""
        return self._pager

    @property
    def target_context(self) -> Optional[Context]:
        """The target's llama.cpp context (KV cache, logits)."""
        return self._target

    @property
    def draft_context(self) -> Optional[Context]:
        """The draft's llama.cpp context, None without a draft."""
        return self._draft


def _held_back(text: str, stops: Sequence[str], start: int) -> int:
    """Characters at the end of `text` (after `start`) not to stream yet: a possible start of a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


_DEFAULTS = {"suffix": None, "typical_p": 1.0, "logprobs": None, "top_logprobs": None, "echo": False,
             "frequency_penalty": 0.0, "presence_penalty": 0.0, "repeat_penalty": 1.0, "tfs_z": 1.0,
             "mirostat_mode": 0}


def _unsupported(**given) -> None:
    """Refuse, in one line, an argument of llama-cpp-python's API that edgecad does not implement."""
    for name, value in given.items():
        default = _DEFAULTS.get(name)
        empty = value is None or (isinstance(value, (str, list, dict, tuple)) and not value) or value is False
        if value != default and not (empty and not default):
            raise EdgecadError(f"{name}={value!r} is not supported by edgecad: leave {name} at its default "
                               f"({default!r})")


MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS: more aborts inside llama.cpp


def _check_int(name: str, value, lo: int, hi: Optional[int], note: str = "") -> None:
    """Raise unless `value` is an integer in [lo, hi] (hi None: no upper bound), naming the range."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and lo <= value and (hi is None or value <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"{lo}..{hi}"
        raise EdgecadError(f"{name}={value!r} is out of range: use an integer {rng}" + (f" ({note})" if note else ""))


def _seed(seed) -> Optional[int]:
    """llama.cpp's convention: -1 (or None) = a random seed."""
    if seed is None or seed == -1:
        return None
    _check_int("seed", seed, 0, None, "or -1 for a random seed")
    return int(seed)


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty=1.0) -> SamplingParams:
    """SamplingParams from llama-cpp-python's arguments, with the valid range named when one is off."""
    checks = [("temperature", temperature, lambda v: v >= 0, ">= 0.0"),
              ("top_p", top_p, lambda v: 0 < v <= 1, "> 0 and <= 1"),
              ("min_p", min_p, lambda v: 0 <= v <= 1, ">= 0.0 and <= 1.0"),
              ("repeat_penalty", repeat_penalty, lambda v: v > 0, "> 0 (1.0 = no penalty)")]
    for name, v, ok, rng in checks:
        if not ok(float(v)):
            raise EdgecadError(f"{name}={v!r} is out of range: use a value {rng}")
    _check_int("top_k", top_k, 0, None, "0 = off")
    return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                          repeat_penalty=float(repeat_penalty))


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) and stop else [s for s in (stop or []) if s and isinstance(s, str)]


def _join(chunks: Iterator[dict]) -> dict:
    """The completion of a stream of chunks: the last chunk, with all the text."""
    text, last = [], None
    for chunk in chunks:
        text.append(chunk["choices"][0]["text"])
        last = chunk
    last["choices"][0]["text"] = "".join(text)
    return last


def _chat_message(c: dict) -> dict:
    """A text completion as llama-cpp-python's chat.completion."""
    ch = c["choices"][0]
    return {"id": "chat" + c["id"], "object": "chat.completion", "created": c["created"], "model": c["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ch["text"]}, "logprobs": None,
                         "finish_reason": ch["finish_reason"]}],
            "usage": c["usage"], "edgecad": c["edgecad"]}


def _chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """Text completion chunks as llama-cpp-python's chat.completion.chunk stream: a role delta first,
    then content deltas, then an empty delta with the finish reason."""
    try:
        yield from _chat_chunk_stream(chunks)
    finally:
        chunks.close()  # closing the chat stream ends the decoder


def _chat_chunk_stream(chunks: Iterator[dict]) -> Iterator[dict]:
    for i, c in enumerate(chunks):
        head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        ch = c["choices"][0]
        if ch["finish_reason"] is not None and ch["text"]:  # the final chunk's text, as a content delta
            yield {**head, "choices": [{"index": 0, "delta": {"content": ch["text"]}, "logprobs": None,
                                        "finish_reason": None}]}
        out = {**head, "choices": [{"index": 0, "delta": {"content": ch["text"]} if ch["finish_reason"] is None
                                    else {}, "logprobs": None, "finish_reason": ch["finish_reason"]}]}
        if "edgecad" in c:
            out["usage"], out["edgecad"] = c["usage"], c["edgecad"]
        yield out
