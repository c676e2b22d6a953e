"""The engine's moves: memory that moves while it runs (edgecad.follow's Watch says when).

Between passes the Watch reads the room; a plan made for it that differs from the running one replaces it. The
target's side is freed first, then loaded as the new plan says; the draft stays loaded while the plan keeps it. The
completion resumes from its tokens so far (the new KV caches are filled from them in one prompt pass; penalties
and grammar see them as generated), so it goes on as the target would: greedy, the target's own argmax at every
position, sampled, a draw from its distribution (the numerics differ between plans by up to a near-tie, as between
any two plans: README, "What is guaranteed"). Below what
any plan needs, the completion stops (MemoryFloorError) and the engine keeps only its vocabulary until the room
comes back. `Moves` is a part of Engine (which inherits it), as compat.LlamaMembers is.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator, Optional

import numpy as np

from .config import EngineConfig, replan, show_plan
from .decode import Stats, decoder_for
from .devices import placement
from .errors import EdgecadError, MemoryFloorError
from .follow import Due
from .llama import ModelParams
from .plan import CONFIGS, Config, doubts
from .plan.doubt import measured
from .plan.units import mb
from .residency import residency_for
from .sampling import SamplingParams


class Moves:
    """The engine's moves (Engine inherits them): `_tokens` runs a completion's decoder across them."""

    _completions = 0            # completions this engine began
    _trial: Optional[Config] = None  # a doubted choice's rival runs this completion (edgecad.plan.doubt)
    _checked = False            # this engine checked its doubted choice (once per engine)
    _since: tuple = ()          # moves since the last completion began (a list from then on)

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
                new, due = m.config, m.due  # (not the exception: its traceback holds the old decoder's frame)
            except MemoryFloorError:
                self._keep_vocabulary()
                raise
            finally:
                decoder.close()
            stats.paging_parts.append(self._residency.completion_stats(stats))  # (the plan moved from)
            stats.moves.append(self._move(new, due, len(done), t0))
            stats.mode, stats.on_prompt_done = self.mode, self._residency.prompt_done
            self._residency.begin_completion()

    def _between_passes(self) -> None:
        """Stats.between_passes: raise _Move when the Watch calls for a plan that runs differently from the
        running one; MemoryFloorError when none fits the room (or none that can run here)."""
        due = self._watch.due(self._holds())
        if due is None:
            return
        try:
            new = self._plan_for(due.budget)
        except EdgecadError as e:
            if not due.down:
                self._watch.planned(due.budget, False)
                return
            raise MemoryFloorError(f"edgecad stopped: {due.why}, and {_floor(e)}; {_FIX}") from None
        if _runs_as(new) == _runs_as(self.config):
            self._watch.planned(due.budget, False)
            return
        raise _Move(new, due)

    def _between_completions(self) -> list:
        """At a completion's start: load again after the floor (_reload_if_freed); or check a doubted choice, once
        per engine (edgecad.plan.doubt): where the running plan pages and the engine's second completion finds its
        paged rival doubted, that completion runs the rival, which measures its costs; the next one runs whichever
        the costs then predict faster (_keep_faster). Returns the moves made (the completion's moves_before)."""
        self._completions, self._since = self._completions + 1, []
        if self._freed:
            self._reload_if_freed()
        elif self._trial is not None:  # (set only by a check)
            self._keep_faster(self._trial)
        elif (not self._checked and self._completions >= 2 and self.memory_plan.paged and self._watch is not None
              and self.config.mode_given is None and self.config.draft_info is not None):
            self._check_doubt()
        return self._since

    def _check_doubt(self) -> None:
        """Move to the rival of a doubted choice for this completion (paged: a move reloads no repacked target)."""
        running, self._checked = self.memory_plan, True  # (once per engine, whatever follows)
        try:
            mine = self._plan_for(running.budget, (running.kind,))
            rival = self._plan_for(running.budget, tuple(c for c in CONFIGS
                                                         if c.paged and c.speculative != running.speculative))
        except EdgecadError:
            return  # (the rival cannot run here: nothing to doubt)
        why = doubts(mine.plan, rival.plan)
        if why is not None and self._moved_between(rival, why):
            self._trial = rival.plan.kind

    def _keep_faster(self, rival: Config) -> None:
        """After the rival's completion: the configuration the costs now predict fastest, kept or moved back to."""
        running, self._trial = self.memory_plan, None
        try:
            new = self._plan_for(running.budget)
        except EdgecadError:
            return  # (nothing else runs here now: stay)
        how = ("on measured costs" if measured(self._costs, rival) else
               f"on priors: {rival.name}'s completion measured nothing (too short, starved of CPU, or it moved)")
        verdict = f"checked {rival.name}: {new.plan.config}, {new.plan.reason} {how}"
        if new.plan.kind != running.kind:
            self._moved_between(new, verdict)
        else:
            show_plan(self.verbose, f"edgecad: kept {running.config}: {verdict}")

    def _moved_between(self, new: EngineConfig, why: str) -> bool:
        """A move between completions for a check (not an up: no flap wait). Where its load fails, the engine loads
        again for the room there is, so the request still runs (MemoryFloorError where even that fails): False."""
        try:
            self._move(new, Due(new.plan.budget, why, True), 0, time.perf_counter())
            return True
        except MemoryFloorError:
            self._reload_if_freed()
            return False

    def _plan_for(self, budget: int, configs: Optional[tuple] = None) -> EngineConfig:
        """The configuration at `budget` (among `configs`: edgecad.config.replan): the running one re-planned with
        the costs learnt since, checked to run here. EdgecadError where nothing fits (BudgetTooSmallError) or the
        plan cannot run here (placement: paging offloaded layers on a device that copies them)."""
        new = replan(replace(self.config, device=replace(self.config.device, costs=self._costs)), budget, configs)
        placement(*self._placement, new.plan.paged)
        return new

    def _holds(self) -> int:
        """Bytes the running plan holds: its budget less its spare."""
        return self.memory_plan.budget - max(self.memory_plan.parts["spare"], 0)

    def _move(self, new: EngineConfig, due: Due, at_token: int, t0: float) -> dict:
        """Free the target's side, load it as `new` says (the draft loaded or freed as it asks), and say so.
        MemoryFloorError where llama.cpp could not allocate (no memory after all)."""
        old, t = self.memory_plan, time.perf_counter()
        self._free_target_side(keep_draft=new.speculative)
        try:
            self._configure(new)
            self._load_target(new, False)
            if new.speculative and self._draft_model is None:
                self._draft_model = decoder_for(new.mode).load_draft(new, self._gpu[1], False)
            self._make_contexts(new)
        except BaseException as e:  # (a file changed, a Ctrl-C during the load): nothing half loaded stays
            self._keep_vocabulary()
            if isinstance(e, EdgecadError) and not isinstance(e, MemoryFloorError):
                raise MemoryFloorError(f"edgecad stopped: moving to {_describe(new.plan)} failed ({e}); "
                                       + _FIX) from e
            raise
        self._watch.planned(due.budget, not due.down)
        move = {"seconds": round(time.perf_counter() - t0, 3), "at_token": at_token,
                "from": _describe(old), "to": _describe(new.plan), "why": due.why,
                "move_seconds": round(time.perf_counter() - t, 3)}
        self.moves.append(move)
        self._since = [*self._since, move]  # (a new list: the one a completion's stats took stays as it began)
        del self.moves[:-MOVES_KEPT]
        show_plan(self.verbose, f"edgecad: moved from {move['from']} to {move['to']}: {move['why']}")
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
        try:
            new = self._plan_for(room)
            self._freed = False
            self._move(new, Due(room, f"{why} is {mb(room)} again", False), 0, time.perf_counter())
        except MemoryFloorError:
            raise  # (its own line: the load failed)
        except EdgecadError as e:  # (nothing fits here, or a load failed: _move kept only the vocabulary)
            raise MemoryFloorError(f"edgecad cannot run: {why} is {mb(room)}, and {_floor(e)}; {_FIX}") from None


MOVES_KEPT = 100  # Engine.moves keeps the last ones (a server runs for long)
_FIX = "free memory (close other apps) or raise the limit, then send the request again"


class _Move(Exception):
    """Raised between passes (Moves._between_passes): move to `config`, as `due` asks."""

    def __init__(self, config: EngineConfig, due: Due):
        super().__init__(due.why)
        self.config, self.due = config, due


def _runs_as(cfg: EngineConfig) -> tuple:
    """What a configuration runs: two that agree need no move (the mode, the tree its residency uses, the
    pipeline, prompt batches, the target's share and pinned layers)."""
    p = cfg.plan
    paging = None if p.paging is None else (p.paging.budget, tuple(p.paging.pinned_layers), p.paging.params)
    return cfg.mode, p.kind, residency_for(cfg).tree_params(cfg), cfg.pipeline, p.n_batch, paging


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


def _floor(e: EdgecadError) -> str:
    """What the engine needs at the least, as the plan found it."""
    smallest = getattr(e, "smallest", None)
    return f"it needs at least {mb(smallest)}" if smallest is not None else f"it cannot run in it ({e})"
