"""Token trees: the parameters of every speculative mode, the tree itself, and cutting a KV cache to a path.

One set of parameters (TreeParams) describes every speculative mode: edgecad's
tree, a linear chain (llama.cpp's speculative defaults) and Big Little Decoder.
The drafter that grows trees is edgecad.drafter; the fallback threshold that
stops it, edgecad.fallback.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import numpy as np

from .errors import EdgecadError
from .llama import Context


class _Variant(str, Enum):
    """A choice among TreeParams' variants: a str, so "token" and Fallback.TOKEN are equal (and print alike)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, value, name: str):
        """`value` (a member or its string) as a member; an unknown one names the allowed values."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise EdgecadError(f"unknown TreeParams.{name} {value!r}: choose one of {allowed}") from None


class Fallback(_Variant):
    """When the draft stops drafting and hands the tree to the target."""
    ADAPTIVE = "adaptive"  # the best branch's cumulative confidence < the adaptive threshold (FallbackThreshold)
    TOKEN = "token"        # the next token's draft top-1 probability < p_min (llama.cpp's speculative, BiLD)


class Acceptance(_Variant):
    """Which drafted tokens the target keeps (the rule: verify.acceptance_for)."""
    EXACT = "exact"  # lossless: greedy matching, or multi-draft rejection sampling
    BILD = "bild"    # BiLD's rollback: a drafted token unless the target's cross-entropy on it > rollback_ce


@dataclass(frozen=True)
class TreeParams:
    max_nodes: int = 32        # drafted tokens per tree, root excluded (the verify batch has max_nodes + 1)
    max_depth: int = 16        # longest branch, in drafted tokens
    max_width: int = 3         # children per node: the top-1 plus up to max_width - 1 alternatives
    branch_p: float = 0.1      # an alternative whose draft probability is >= branch_p starts a new branch
    fallback: Fallback = Fallback.ADAPTIVE  # when drafting stops (a string names a member: "adaptive", "token")
    p_min: float = 0.75        # the per-token confidence floor of Fallback.TOKEN
    threshold_init: float = 0.3  # first value of the adaptive threshold
    threshold_min: float = 0.02  # the adaptive threshold stays within [threshold_min, threshold_max]
    threshold_max: float = 0.9
    cost_aware: bool = True    # also stop at the measured break-even confidence (see FallbackThreshold)
    acceptance: Acceptance = Acceptance.EXACT  # the target's rule (a string names a member: "exact", "bild")
    rollback_ce: float = 5.0   # BiLD's rollback threshold, in nats

    def __post_init__(self):
        object.__setattr__(self, "fallback", Fallback.of(self.fallback, "fallback"))
        object.__setattr__(self, "acceptance", Acceptance.of(self.acceptance, "acceptance"))


MODE_PARAMS = {
    "tree": TreeParams(),
    # llama.cpp common/speculative defaults: a chain of up to n_max=16 tokens while top-1 p >= p_min=0.75
    "linear": TreeParams(max_nodes=16, max_depth=16, max_width=1, fallback=Fallback.TOKEN, p_min=0.75),
    # Big Little Decoder: fall back when the small model's top probability < 0.6, at most 10 draft steps;
    # roll back a drafted token when the large model's cross-entropy on it > 5.0
    "bild": TreeParams(max_nodes=10, max_depth=10, max_width=1, fallback=Fallback.TOKEN, p_min=0.6,
                       acceptance=Acceptance.BILD, rollback_ce=5.0),
}


# ---------------------------------------------------------------------------- the tree

class TokenTree:
    """A token tree in flat arrays. Node 0 is the root: the last accepted token, not yet verified.

    token/parent/depth/prob/conf/branch are arrays of length `capacity`; `n` nodes are in use.
    prob[i] is the draft probability of token[i] under its parent's distribution, conf[i] the
    product of prob along the path (the branch confidence), branch[i] the draft KV sequence.
    """

    def __init__(self, capacity: int, root_token: int, root_pos: int):
        self.token = np.zeros(capacity, np.int32)
        self.parent = np.full(capacity, -1, np.int32)
        self.depth = np.zeros(capacity, np.int32)
        self.prob = np.ones(capacity)
        self.conf = np.ones(capacity)
        self.branch = np.zeros(capacity, np.int32)
        self.decoded = np.zeros(capacity, bool)  # the draft has this node in its KV cache
        self.token[0], self.root_pos, self.n = root_token, root_pos, 1
        self.children: list[dict[int, int]] = [{}]   # per node: token -> child node
        self.draws: list[list[int]] = [[]]           # per node: child tokens in the order drafted
        self.q: list[Optional[np.ndarray]] = [None]  # per node: the draft distribution its children came from

    def add(self, parent: int, token: int, prob: float, branch: int) -> int:
        i = self.n
        self.token[i], self.parent[i], self.depth[i] = token, parent, self.depth[parent] + 1
        self.prob[i], self.conf[i], self.branch[i] = prob, self.conf[parent] * prob, branch
        self.children[parent][token] = i
        self.children.append({})
        self.draws.append([])
        self.q.append(None)
        self.n += 1
        return i

    def pos(self, i: int) -> int:
        return self.root_pos + int(self.depth[i])

    def path(self, i: int) -> list[int]:
        """Nodes from the root's child down to i (the root excluded)."""
        out = []
        while i > 0:
            out.append(i)
            i = int(self.parent[i])
        return out[::-1]

    def leaves(self) -> list[int]:
        return [i for i in range(self.n) if not self.children[i]]

    @property
    def n_drafted(self) -> int:
        return self.n - 1


def keep_path(ctx: Context, seq: int, last_pos: int) -> None:
    """Make sequence 0 hold exactly `seq`'s cells up to last_pos, and drop every other sequence."""
    ctx.seq_rm(seq, last_pos + 1, -1)
    ctx.seq_keep(seq)
    if seq != 0:
        ctx.seq_cp(seq, 0)
        ctx.seq_rm(seq)
