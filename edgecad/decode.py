"""Decoders: a mode is a generator of token ids, counting into the completion's Stats.

`TargetDecoder`: one target pass per token. `SpeculativeDecoder` (tree, linear and BiLD differ only in
their TreeParams): one `step` per target pass, draft -> verify -> verdict -> commit -> adapt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .fidelity import NEAR_TIE_EPS, top2_gap
from .grammar import Grammar
from .llama import Batch, Context, Model, ModelParams
from .pipeline import Pipeline
from .sampling import SamplingParams, log_softmax, pick, processed
from .drafter import Drafter
from .fallback import FallbackThreshold
from .tree import Acceptance, Fallback, TokenTree, TreeParams
from .verify import Verdict, acceptance_for, keep_accepted, verify_tree


@dataclass
class Stats:
    """Counters of one completion, filled by its decoder; the engine turns them into its `edgecad` dict."""
    mode: str
    lossless: bool = True
    prompt_tokens: int = 0
    prompt_reused: int = 0       # prompt tokens the target's cache already held (not decoded again)
    token_ids: list = field(default_factory=list)
    target_passes: int = 0       # target passes that produce tokens (target mode: one per token)
    prompt_passes: int = 0       # of which the prompt's: its first pass (target mode; speculative when the
                                 # prompt's end was decoded in the first tree's pass), timed in prompt_seconds
    draft_tokens: int = 0        # tree nodes drafted, roots excluded
    prompt_draft_tokens: int = 0  # of which in the prompt's pass (its tree shrunk to the room the prompt left)
    prompt_pass_tokens: int = 0  # tokens the prompt's pass emitted (speculative; the timed passes emitted the rest)
    accepted_tokens: int = 0     # drafted tokens accepted and emitted
    draft_passes: int = 0        # draft llama_decode calls after the prompt
    bild_divergent: int = 0      # bild: accepted drafted tokens that differ from the target's argmax
    prompt_seconds: float = 0.0  # prompt processing time (with the prompt's pass, prompt_passes)
    seconds: float = 0.0         # generation time after the prompt
    seconds_draft: float = 0.0   # of which drafting
    seconds_target: float = 0.0  # of which target passes
    seconds_chain: float = 0.0   # drafting chains beside target passes (pipeline; overlaps seconds_target)
    cpu_draft: float = 0.0       # CPU seconds of the computing thread (the caller's: it drafts, runs the target's
    cpu_target: float = 0.0      # passes, spins in llama.cpp's thread team) while drafting and during the timed
                                 # target passes: against seconds_draft and seconds_target, whether they had a core
                                 # (starved beside busy processes, they teach the learnt costs nothing)
    chain_tokens: int = 0        # tokens drafted into chains beside target passes
    reused_tokens: int = 0       # chain tokens the next tree started from (drafted during a pass, kept)
    near_ties: int = 0           # emitted tokens where the target's top-2 logits were within NEAR_TIE_EPS:
                                 # where another mode's numerics (batched vs single token) may choose the other
    logprobs: Optional[int] = None  # when set: keep, per emitted token, its log-probability and the top `logprobs`
    token_logprobs: list = field(default_factory=list)  # (logprob, [(token, logprob), ...]) per emitted token
    fallback: Optional[dict] = None  # summary of the fallback threshold's history
    paging: dict = field(default_factory=dict)  # the residency's measurements (Residency.completion_stats)
    on_prompt_done: Optional[Callable[[], None]] = None  # the residency's mark between prompt and generation
    between_passes: Optional[Callable[[], None]] = None  # called before each pass after the prompt's, once the
                                 # tokens before it were yielded: the engine's moves (edgecad.follow) raise there
    moves: list = field(default_factory=list)  # the engine's moves during the completion (edgecad.moves)
    moves_before: list = field(default_factory=list)  # its moves since the last completion and before this one (a
                                 # doubted choice checked, a reload after the floor): this completion still teaches
    paging_parts: list = field(default_factory=list)  # the residency's measurements of each plan moved from

    def note(self, logits: np.ndarray, token: int) -> None:
        """The target's logits row that gave an emitted token (kept only when logprobs were asked for)."""
        if self.logprobs is not None:
            lp = log_softmax(logits)
            k = min(self.logprobs, len(lp))
            top = np.argpartition(-lp, k - 1)[:k] if k else []
            top = sorted(top, key=lambda t: -lp[t])
            self.token_logprobs.append((float(lp[token]), [(int(t), float(lp[t])) for t in top]))

    def prompt_pass(self, seconds: float, reused: int, drafted: int, emitted: int) -> None:
        """The prompt's pass ran: its last tokens beside the first tree, which drafted `drafted` nodes and emitted
        `emitted` tokens (a pass after a move is the move's, in generation time)."""
        if not self.moves:
            self.prompt_passes += 1
            self.prompt_draft_tokens += drafted
            self.prompt_pass_tokens += emitted
        self.prompt_done(seconds, reused)

    def prompt_done(self, seconds: float, reused: int) -> None:
        """The prompt is in the target's KV cache: what follows is generation. After a move (the decoder resumed
        on another plan), its new prompt pass is generation time: the move's cost."""
        if not self.moves:
            self.prompt_seconds, self.prompt_reused = seconds, reused
        if self.on_prompt_done is not None:
            self.on_prompt_done()

    def before_pass(self) -> None:
        if self.between_passes is not None:
            self.between_passes()


COUNTED = ("draft_passes", "seconds_draft", "cpu_draft", "seconds_chain", "chain_tokens", "reused_tokens")  # the
# Stats a speculative decoder counts from its drafter's and pipeline's running counts (SpeculativeDecoder._counters)

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold, so leaves per tree < 256


class TargetDecoder:
    """Plain decoding: one target pass per token."""
    draft_context = None  # no draft
    pipeline = None       # nothing drafts beside the passes
    check_kv = False      # (only speculative steps have KV to check)

    def __init__(self, target: Context, batch: Batch, is_eog: Callable[[int], bool]):
        self.target, self.batch, self.is_eog = target, batch, is_eog

    @staticmethod
    def sequences(params: Optional[TreeParams]) -> int:
        """KV sequences (and logit rows) a pass needs."""
        return 1

    @staticmethod
    def load_draft(cfg, n_gpu_layers: int, progress: bool) -> Optional[Model]:
        """The draft model this decoder drafts with: none."""
        return None

    @classmethod
    def build(cls, target: Context, batch: Batch, params, draft_model, draft_params, residency) -> "TargetDecoder":
        return cls(target, batch, target.model.is_eog)

    def close(self) -> None:
        pass

    def __call__(self, prompt: Sequence[int], max_tokens: int, sp: SamplingParams, rng: np.random.Generator,
                 stats: Stats, done: Sequence[int] = ()) -> Iterator[int]:
        """The completion's tokens after `prompt` and the tokens already `done` (a completion resumed after a
        move: they are context, seen by penalties and grammar as generated); max_tokens: how many more."""
        ctx, b = self.target, self.batch
        grammar = _grammar(ctx, sp, done)
        t0 = time.perf_counter()
        logits = ctx.sync(b, list(prompt) + list(done), logits=True)
        stats.prompt_done(time.perf_counter() - t0, ctx.reused)
        stats.target_passes += 1  # the prompt's pass gives the first token
        stats.prompt_passes += not stats.moves  # (after a move, a pass of the move's)
        generated = list(done)
        for i in range(max_tokens):
            tok = pick(processed(logits, generated, sp, grammar), sp, rng)
            stats.near_ties += top2_gap(logits) < NEAR_TIE_EPS
            generated.append(tok)
            stats.note(logits, tok)
            if grammar is not None:
                grammar.accept(tok)
            yield tok
            if self.is_eog(tok) or i + 1 == max_tokens or len(ctx.tokens) >= ctx.n_ctx:
                return
            stats.before_pass()
            b.clear()
            b.add(tok, len(ctx.tokens), (0,), True)
            td, cpu = time.perf_counter(), time.thread_time()
            ctx.decode(b)
            ctx.tokens.append(tok)
            stats.seconds_target += time.perf_counter() - td
            stats.cpu_target += time.thread_time() - cpu
            stats.target_passes += 1
            logits = ctx.logits(0)


class SpeculativeDecoder:
    """Speculative decoding with a resident draft: the drafter builds a tree from the last accepted token (the
    root), the target verifies root and tree in one pass, the mode's acceptance rule gives the verdict."""

    def __init__(self, target: Context, batch: Batch, drafter: Drafter, params: TreeParams,
                 is_eog: Callable[[int], bool], pipeline: Optional[Pipeline] = None):
        self.target, self.batch, self.drafter, self.p = target, batch, drafter, params
        self.is_eog, self.pipeline = is_eog, pipeline
        # the target's pass: verify_tree, or with the pipeline the same while a chain is drafted beside it (offered
        # to the drafter's accept, the third value)
        self.verify = pipeline.verify if pipeline is not None else (
            lambda target, batch, tree, sp, room, left, prefix: (*verify_tree(target, batch, tree, prefix), None))
        self.check_kv = False  # tests: assert both KV caches hold only the accepted path after every step

    @property
    def draft_context(self) -> Context:
        return self.drafter.ctx

    @staticmethod
    def sequences(params: TreeParams) -> int:
        """KV sequences (and logit rows) a pass needs: one per tree node, the root's included."""
        return min(MAX_SEQ, params.max_nodes + 1)

    @staticmethod
    def load_draft(cfg, n_gpu_layers: int, progress: bool) -> Optional[Model]:
        """The resident draft, read into llama.cpp's own memory and repacked (faster; it is never paged: see
        Residency.model_params), on a GPU when placement says."""
        return Model(cfg.draft_path, ModelParams(use_mmap=False, use_extra_bufts=True, n_gpu_layers=n_gpu_layers),
                     cfg.draft_info, progress=f"loading {cfg.draft_path.name}" if progress else None)

    @classmethod
    def build(cls, target: Context, batch: Batch, params: TreeParams, draft_model, draft_params,
              residency) -> "SpeculativeDecoder":
        """With the draft's own context (and, when the residency has one, the pipeline's gate) and drafter."""
        drafter = Drafter(Context(draft_model, draft_params, **residency.draft_hooks()), params,
                          cls.sequences(params), draft_params.n_batch)
        return cls(target, batch, drafter, params, target.model.is_eog, residency.pipeline(drafter))

    def close(self) -> None:
        """Settle the pipeline (its thread drafts in the draft's context), free the drafter and the context."""
        if self.pipeline is not None:
            self.pipeline.settle()
        self.drafter.close()
        self.drafter.ctx.close()

    def step(self, fallback: FallbackThreshold, accept, sp: SamplingParams, rng: np.random.Generator,
             recent: Sequence[int], room: int, left: int, prefix: Sequence[int] = (),
             grammar: Optional[Grammar] = None, rows: bool = False) -> tuple[TokenTree, Verdict]:
        """One target pass. room: KV cells left after the root; left: tokens still wanted after the root's;
        prefix: the prompt's last tokens, not in the target's KV yet, decoded in this pass (the first); grammar:
        the completion's, in its state at the root, left in its state after the emitted tokens; rows: keep a copy
        of the logits row that gave each emitted token (for logprobs)."""
        p, drafter, t0 = self.p, self.drafter, time.perf_counter()
        # draft: a tree of at most max_nodes tokens below the root, until its best branch's confidence < T; an
        # alternative child joins when its draft probability >= branch_p or its branch confidence pays its cost
        nodes = min(p.max_nodes, room, self.batch.capacity - 1 - len(prefix))  # (a prompt's pass: beside it)
        tree = drafter.draft(nodes, min(p.max_depth, room, left), sp, rng, fallback.current(),
                             fallback.break_even(), grammar)
        # verify: one target pass over root + nodes (tree attention), logits for every node
        tv, cpu = time.perf_counter(), time.thread_time()
        logits, leaf_seq, chain = self.verify(self.target, self.batch, tree, sp, room, left, prefix)
        seconds, cpu = time.perf_counter() - tv, time.thread_time() - cpu
        # verdict: greedy keeps drafted tokens while they are the target's argmax; sampling accepts x with
        # min(1, p(x)/q(x)), else p <- norm(max(p - q, 0)); either way each token is the target's own
        path, bonus, divergent = accept(tree, logits, rng, recent, grammar)
        if grammar is not None:
            grammar.accept(bonus)
        ties = tuple(top2_gap(logits[i]) < NEAR_TIE_EPS for i in [0, *path])  # the rows that chose each token
        # commit: both KV caches keep root + path (the draft's also a chain drafted past it); the bonus is the next root
        keep_accepted(self.target, tree, leaf_seq, path)
        drafter.accept(tree, path, bonus, chain)
        # adapt: LLMCad's threshold from how much of the best branch was taken, capped by the measured cost
        fallback.step(tree, path, None if prefix else time.perf_counter() - t0)  # (a prompt's pass costs more)
        return tree, Verdict(path, bonus, divergent, seconds, ties, logits[[0, *path]].copy() if rows else None, cpu)

    def __call__(self, prompt: Sequence[int], max_tokens: int, sp: SamplingParams, rng: np.random.Generator,
                 stats: Stats, done: Sequence[int] = ()) -> Iterator[int]:
        """As TargetDecoder's."""
        p, drafter, target = self.p, self.drafter, self.target
        if self.pipeline is not None:
            self.pipeline.settle()  # (a chain a Ctrl-C left drafting must be gone before the draft decodes)
        prompt = list(prompt) + list(done)
        t0 = time.perf_counter()
        # the target's KV: every accepted token but the root; the last of them not held yet are decoded in the
        # first tree's pass (a paged target streams its weights once for both)
        head = prompt[:-1]
        cut = first_pass_cut(len(head), target.common_prefix(head), self.batch.capacity, p.max_nodes)
        target.sync(self.batch, head[:cut])
        prefix = list(head[cut:])
        drafter.start(prompt)
        reused = target.reused
        if not prefix:
            stats.prompt_done(time.perf_counter() - t0, reused)
        stats.lossless = p.acceptance is Acceptance.EXACT
        accept, fallback, grammar = acceptance_for(p, sp), FallbackThreshold(p), _grammar(target, sp, done)
        if self.pipeline is not None:
            self.pipeline.start(rng)
        root_pos, produced, generated = len(head), 0, list(done)  # the root's position
        d0 = self._counters()
        try:
            while produced < max_tokens and root_pos < target.n_ctx:
                room, left = target.n_ctx - root_pos - 1, max_tokens - produced - 1  # KV cells, tokens after root
                tree, verdict = self.step(fallback, accept, sp, rng, generated, room, left, prefix, grammar,
                                          stats.logprobs is not None)
                tokens = [int(tree.token[i]) for i in verdict.path] + [verdict.bonus]
                if prefix:  # the prompt's pass: its time is the prompt's, as the target's first pass is alone
                    stats.prompt_pass(time.perf_counter() - t0, reused, tree.n_drafted, min(len(tokens), left + 1))
                    prefix, d0 = [], self._counters()
                else:
                    stats.seconds_target += verdict.seconds
                    stats.cpu_target += verdict.cpu
                stats.target_passes += 1
                stats.draft_tokens += tree.n_drafted
                stats.bild_divergent += verdict.divergent
                root_pos = len(target.tokens)
                if self.check_kv:
                    self._check_kv(root_pos)
                for j, (tok, tie) in enumerate(zip(tokens, verdict.ties)):
                    stats.near_ties += tie
                    stats.accepted_tokens += j < len(verdict.path)  # drafted tokens emitted (none past an end)
                    generated.append(tok)
                    if verdict.rows is not None:
                        stats.note(verdict.rows[j], tok)
                    yield tok
                    produced += 1
                    if produced >= max_tokens or self.is_eog(tok):
                        return
                stats.before_pass()
        finally:
            for name, now, then in zip(COUNTED, self._counters(), d0):  # (added: a resumed decoder's too)
                setattr(stats, name, getattr(stats, name) + now - then)
            stats.fallback = fallback.summary() if p.fallback is Fallback.ADAPTIVE else None

    def _counters(self) -> tuple:
        """The drafter's and the pipeline's running counts, as Stats' COUNTED: a completion's are their
        differences."""
        d, pl = self.drafter, self.pipeline
        return d.decodes, d.seconds, d.cpu, pl.seconds if pl else 0.0, pl.tokens if pl else 0, d.reused_tokens

    def _check_kv(self, root_pos: int) -> None:
        """Both caches hold only sequence 0: the target every accepted token before the root,
        the draft its first n_past accepted tokens (and a kept chain). Raises AssertionError otherwise."""
        for ctx, n in ((self.target, root_pos), (self.drafter.ctx, self.drafter.kv_end + 1)):
            assert ctx.seq_pos_min(0) == (0 if n else -1) and ctx.seq_pos_max(0) == n - 1, (
                f"sequence 0 holds {ctx.seq_pos_min(0)}..{ctx.seq_pos_max(0)}, expected 0..{n - 1}")
            left = [s for s in range(1, ctx.params.n_seq_max) if ctx.seq_pos_max(s) != -1]
            assert not left, f"branch sequences {left} were left in the KV cache"


def first_pass_cut(n_head: int, held: int, capacity: int, max_nodes: int) -> int:
    """How much of a prompt's head (all its tokens but the last, the first tree's root) the target decodes before
    the first tree's pass, of which it holds `held` already: the rest goes beside that tree. As few passes as
    carry head and root; in them, the passes before the tree's carry what leaves a whole tree room, and when no
    fewer passes could, the tree shrinks to the room left, to none at worst (a paged target's pass of its own
    streams every weight once more for no token; a smaller first tree drafts fewer tokens)."""
    n = n_head - held
    k = -(-(n + 1) // capacity)  # passes that carry the head's rest and the root
    beside = max(min(n, capacity - 1 - max_nodes), n - (k - 1) * capacity)
    return n_head - beside


def _grammar(target: Context, sp: SamplingParams, done: Sequence[int] = ()) -> Optional[Grammar]:
    """The completion's grammar, in its state after the tokens `done` (its start state without), when its sampling
    has one."""
    if sp.grammar is None:
        return None
    g = Grammar(target.model, sp.grammar)
    for tok in done:
        g.accept(tok)
    return g


def decoder_for(mode: str) -> type:
    """The decoder of a mode: target alone, or speculative (tree, linear and bild differ in TreeParams only)."""
    return TargetDecoder if mode == "target" else SpeculativeDecoder
