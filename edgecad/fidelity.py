"""Teacher-forced fidelity: how many generated tokens are the target's own greedy choice.

One batched target pass over prompt + output gives, at every generated position, the
target's logits given exactly the prefix that was generated. A token is faithful when it
is the argmax there; positions whose top-2 logits are within `eps` are near-ties, where
batched and sequential numerics may legitimately order the two tokens differently, and
are counted separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .llama import Batch, Context

NEAR_TIE_EPS = 0.3  # logits: batched and sequential passes of the Q4 models differ by up to ~0.3 (docs/paging.md);
                    # at 0.1 the target's own greedy output scored 0.9972 against a batched pass


def top2_gap(logits: np.ndarray) -> float:
    """The gap between the two largest logits."""
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


@dataclass
class Fidelity:
    n: int = 0          # generated tokens scored
    match: int = 0      # equal to the target's argmax
    near_ties: int = 0  # top-2 gap < eps (scored apart)
    mismatch_clear: int = 0  # differ from the argmax where the gap is clear: a lossless mode must have 0
    max_mismatch_gap: float = 0.0  # largest top-2 gap at a token that differs from the argmax

    @property
    def fraction(self) -> float:
        """Faithful fraction outside near-ties."""
        scored = self.n - self.near_ties
        return (scored - self.mismatch_clear) / scored if scored else 1.0

    def __iadd__(self, o: "Fidelity") -> "Fidelity":
        self.n += o.n
        self.match += o.match
        self.near_ties += o.near_ties
        self.mismatch_clear += o.mismatch_clear
        self.max_mismatch_gap = max(self.max_mismatch_gap, o.max_mismatch_gap)
        return self


def teacher_forced(ctx: Context, batch: Batch, prompt: Sequence[int], generated: Sequence[int],
                   eps: float = NEAR_TIE_EPS) -> Fidelity:
    """Score `generated` against the target behind `ctx` (its KV cache is cleared)."""
    toks = list(prompt) + list(generated)
    first = len(prompt) - 1  # the logits at position i predict token i + 1
    out = Fidelity()
    ctx.clear()
    for start in range(0, len(toks) - 1, batch.capacity):
        batch.clear()
        end = min(start + batch.capacity, len(toks) - 1)
        for i in range(start, end):
            batch.add(toks[i], i, (0,), i >= first)
        ctx.decode(batch)
        rows = [i for i in range(start, end) if i >= first]
        if not rows:
            continue
        logits = ctx.logits_all(len(rows))
        for r, i in enumerate(rows):
            lg = logits[r]
            gap = top2_gap(lg)
            tok, best = toks[i + 1], int(np.argmax(lg))
            out.n += 1
            if tok == best:
                out.match += 1
            if tok != best:
                out.max_mismatch_gap = max(out.max_mismatch_gap, gap)
            if gap < eps:
                out.near_ties += 1
            elif tok != best:
                out.mismatch_clear += 1
    ctx.clear()
    return out
