"""LLMCad's self-adjusting fallback threshold: when the draft stops drafting and hands over to the target."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .tree import TokenTree, TreeParams


class FallbackThreshold:
    """LLMCad's self-adjusting fallback threshold, optionally capped by a measured break-even.

    Drafting stops when the best branch's cumulative confidence falls below `value`.
    After each verification (LLMCad): if the best branch was fully accepted, the draft was
    too cautious: halve the threshold; otherwise set it to the fraction of that branch's
    drafted tokens that were wrong. Cost-aware cap: one more drafted node (confidence p)
    yields c * p tokens in expectation, c the measured calibration (accepted tokens per unit
    of drafted confidence), and costs `node_seconds`, the slope of step time over tree size
    (least squares over the steps so far); the run yields `rate` tokens/s. Drafting deeper
    pays while c * p >= node_seconds * rate, so the threshold in force is
    min(LLMCad's value, node_seconds * rate / c): when a target pass is expensive (paged
    weights) and nodes are cheap, the draft goes deeper before falling back.
    """

    def __init__(self, params: TreeParams):
        self.p = params
        self.value = params.threshold_init
        self.history = [self.value]
        self._s = np.zeros(5)  # sums of 1, n, t, n*n, n*t over steps (n nodes, t seconds)
        self._tokens = 0
        self._conf = 0.0       # summed confidence of drafted nodes
        self._accepted = 0     # drafted tokens accepted

    def update(self, n_drafted: int, n_accepted: int) -> None:
        """n_drafted tokens on the best branch, of which the first n_accepted were accepted."""
        if n_drafted <= 0:
            return
        if n_accepted >= n_drafted:
            v = self.value / 2
        else:
            v = (n_drafted - n_accepted) / n_drafted
        self.value = float(min(self.p.threshold_max, max(self.p.threshold_min, v)))
        self.history.append(self.value)

    def observe_step(self, n_nodes: int, seconds: float, n_tokens: int, conf_sum: float = 0.0,
                     accepted: int = 0) -> None:
        """One step: n_nodes drafted (confidences summing to conf_sum, `accepted` of them accepted)
        in `seconds`, adding n_tokens to the output."""
        self._s += (1, n_nodes, seconds, n_nodes * n_nodes, n_nodes * seconds)
        self._tokens += n_tokens
        self._conf += conf_sum
        self._accepted += accepted

    def calibration(self) -> float:
        """Accepted tokens per unit of draft confidence: the draft's confidence is optimistic."""
        return self._accepted / self._conf if self._conf > 0 and self._accepted > 0 else 1.0

    def node_seconds(self) -> Optional[float]:
        k, n, t, nn, nt = self._s
        den = k * nn - n * n
        if k < 3 or den <= 1e-9:
            return None
        return max(0.0, (k * nt - n * t) / den)

    def break_even(self) -> Optional[float]:
        """The branch confidence at which one more drafted node pays for its measured cost (cost-aware only, once
        measured): node_seconds * rate / c."""
        b = self.node_seconds()
        if not self.p.cost_aware or not b or self._s[2] <= 0:  # (a slope of 0: nodes look free, not measured)
            return None
        return b * (self._tokens / self._s[2]) / self.calibration()

    def current(self) -> float:
        b = self.break_even()
        return self.value if b is None else float(max(self.p.threshold_min, min(self.value, b)))

    def step(self, tree: TokenTree, path: Sequence[int], seconds: Optional[float]) -> None:
        """After a step of `seconds` whose target accepted `path`: adapt to how much of the tree's
        best branch was taken, and record the step's cost (None: a step whose cost says nothing of its tree's)."""
        best = tree.path(max(tree.leaves(), key=lambda i: tree.conf[i]))
        agree = next((k for k, (a, b) in enumerate(zip(best, path)) if a != b), min(len(best), len(path)))
        self.update(len(best), agree)
        if seconds is not None:
            self.observe_step(tree.n_drafted, seconds, len(path) + 1, float(tree.conf[1:tree.n].sum()), len(path))

    def summary(self) -> dict:
        h = np.array(self.history)
        return {"initial": float(h[0]), "final": float(h[-1]), "mean": float(h.mean()),
                "min": float(h.min()), "max": float(h.max()), "updates": len(h) - 1,
                "node_seconds": self.node_seconds()}


