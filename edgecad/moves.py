"""The engine's moves: memory that moves while it runs (edgecad.follow's Watch says when).

Between passes the Watch reads the room; a plan made for it that differs from the running one replaces it. The
target's side is freed first, then loaded as the new plan says; the draft stays loaded while the plan keeps it. The
completion resumes from its tokens so far (the new KV caches are filled from them in one prompt pass; penalties
and grammar see them as generated), so its tokens are the ones it would have given without the move. Below what
any plan needs, the completion stops (MemoryFloorError) and the engine keeps only its vocabulary until the room
comes back. `Moves` is a part of Engine (which inherits it), as compat.LlamaMembers is.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Iterator

import numpy as np

from .config import EngineConfig, replan
from .decode import Stats, decoder_for
from .errors import BudgetTooSmallError, MemoryFloorError
from .follow import Due
from .llama import ModelParams
from .plan.units import mb
from .sampling import SamplingParams


class Moves:
    """The engine's moves (Engine inherits them): `_tokens` runs a completion's decoder across them."""

    def _tokens(self, tokens: list[int], max_tokens: int, sp: SamplingParams, rng: np.random.Generator,
                stats: Stats, t0: float) -> Iterator[int]:
        """The decoder's tokens. A move between passes (_between_passes) stops the decoder, moves, and resumes
        on the new plan from the tokens so far; at the floor the engine frees its models (MemoryFloorError)."""
        done: list[int] = []
        while True:
            decoder = self._decoder(tokens, max_tokens - len(done), sp, rng, stats, done=list(done))
            try:
                for tok in decoder:
                    done.append(tok)
                    yield tok
                return
            except _Move as m:
                move = m
            except MemoryFloorError:
                decoder.close()
                self._keep_vocabulary()
                raise
            finally:
                decoder.close()
            stats.moves.append(self._move(move.config, move.due, len(done), t0))
            stats.on_prompt_done = self._residency.prompt_done
            self._residency.begin_completion()

    def _between_passes(self) -> None:
        """Stats.between_passes: raise _Move when the Watch calls for a plan that differs from the running one;
        MemoryFloorError when none fits the room."""
        due = self._watch.due(self._holds())
        if due is None:
            return
        cfg = replace(self.config, device=replace(self.config.device, costs=self._costs))
        try:
            new = replan(cfg, due.budget)
        except BudgetTooSmallError as e:
            if not due.down:
                self._watch.planned(due.budget, False)
                return
            raise MemoryFloorError(f"edgecad stopped: {due.why}, and {_floor(e)}: free memory (close other apps) or "
                                   "raise the limit, then send the request again (it was kept)") from None
        if _same(new.plan, self.memory_plan):
            self._watch.planned(due.budget, False)
            return
        raise _Move(new, due)

    def _holds(self) -> int:
        """Bytes the running plan holds: its budget less its spare."""
        return self.memory_plan.budget - max(self.memory_plan.parts["spare"], 0)

    def _move(self, new: EngineConfig, due: Due, at_token: int, t0: float) -> dict:
        """Free the target's side, load it as `new` says (the draft loaded or freed as it asks), and say so."""
        old, t = self.memory_plan, time.perf_counter()
        self._free_target_side(keep_draft=new.speculative)
        try:
            self._configure(new)
            self._load_target(new, False)
            if new.speculative and self._draft_model is None:
                self._draft_model = decoder_for(new.mode).load_draft(new, self._gpu[1], False)
            self._make_contexts(new)
        except BaseException:  # (a file changed, a Ctrl-C during the load): nothing half loaded stays
            self._keep_vocabulary()
            raise
        self._watch.planned(due.budget, not due.down)
        move = {"seconds": round(time.perf_counter() - t0, 3), "at_token": at_token,
                "from": _describe(old), "to": _describe(new.plan), "why": due.why,
                "move_seconds": round(time.perf_counter() - t, 3)}
        self.moves.append(move)
        if self.verbose or os.environ.get("EDGECAD_SHOW_PLAN"):
            sys.stderr.write(f"edgecad: moved from {move['from']} to {move['to']}: {move['why']}\n")
        return move

    def _free_target_side(self, keep_draft: bool) -> None:
        """Free the decoder (the draft's context), the target's context and weights (and the draft's unless
        kept): what a move or the floor gives back."""
        for name in ("_decoder", "_batch", "_target") + (() if keep_draft else ("_draft_model",)):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)
        if self._target_model is not None:
            self._target_model.close()  # (its dependents first: the pager)
        self._residency.close()

    def _keep_vocabulary(self) -> None:
        """Free everything but the target's vocabulary (tokenizing and chat templates go on); the next completion
        plans and loads again (_reload_if_freed). Where even the vocabulary cannot load, the engine is closed (its
        calls say so)."""
        self._free_target_side(keep_draft=False)
        self._freed = True
        try:
            self._target_model.reload(ModelParams(vocab_only=True))
        except BaseException:
            self._target_model.close()
            self._target_model = None
            raise

    def _reload_if_freed(self) -> None:
        """After the floor freed the models: plan for the room there is now and load again (MemoryFloorError
        while it is still too small)."""
        if not self._freed:
            return
        room, why = self._watch.room()
        cfg = replace(self.config, device=replace(self.config.device, costs=self._costs))
        try:
            new = replan(cfg, room)
        except BudgetTooSmallError as e:
            raise MemoryFloorError(f"edgecad cannot run: {why} is {mb(room)}, and {_floor(e)}: free memory (close "
                                   "other apps) or raise the limit, then send the request again") from None
        self._freed = False
        self._move(new, Due(room, f"{why} is {mb(room)} again", False), 0, time.perf_counter())


class _Move(Exception):
    """Raised between passes (Engine._between_passes): move to `config`, as `due` asks."""

    def __init__(self, config: EngineConfig, due: Due):
        super().__init__(due.why)
        self.config, self.due = config, due


def _same(a, b) -> bool:
    """Two plans run the same way: same configuration, target share and pinned layers, tree and batches."""
    return (a.kind, a.n_batch, a.tree_nodes, a.pipeline) == (b.kind, b.n_batch, b.tree_nodes, b.pipeline) and (
        (a.paging is None) == (b.paging is None)) and (
        a.paging is None or (a.paging.budget, a.paging.pinned_layers) == (b.paging.budget, b.paging.pinned_layers))


def _describe(plan) -> str:
    """A plan in a few words: "tree-paged in 700 MB (9 of 24 layers streamed, trees of 16)"."""
    s = f"{plan.config} in {mb(plan.budget)}"
    extra = []
    if plan.paging is not None:
        extra.append(f"{len(plan.paging.streamed_layers)} of "
                     f"{len(plan.paging.streamed_layers) + len(plan.paging.pinned_layers)} layers streamed")
    if plan.speculative:
        extra.append(f"trees of {plan.tree_nodes}")
    return s + (f" ({', '.join(extra)})" if extra else "")


def _floor(e: BudgetTooSmallError) -> str:
    """What the engine needs at the least, as the plan found it."""
    return f"it needs at least {mb(e.smallest)}" if e.smallest is not None else f"nothing runs in it ({e})"

