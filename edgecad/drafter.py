"""The drafter: builds token trees with the resident draft model and keeps its KV cache in step.

Drafting grows the tree one *level* at a time: each level is one draft
llama_decode holding every node added in that iteration, each node tagged with
the KV sequence of its branch. A branch forks from node L by copying its
parent branch's KV up to L's position (seq_cp over a position range), so each
branch's sequence always holds exactly the prefix + its own path.

A tree may start from a kept chain (tokens drafted past the last tree's leaf beside the target's pass,
edgecad.pipeline): it grows exactly as it would without it, but while its first branch follows the chain it
reuses the chain's distributions and decoded KV cells instead of decoding again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import RequestError
from .llama import Batch, Context
from .sampling import SamplingParams, distribution, sample_from
from .tree import Fallback, TokenTree, TreeParams, keep_path


@dataclass(frozen=True)
class Chain:
    """Tokens drafted past a tree's leaf while the target verified the tree (edgecad.pipeline), offered to
    `Drafter.accept`: kept when the target took the leaf's branch and then the chain's first token."""
    leaf: int      # the tree node the chain continues
    branch: int    # the draft KV sequence holding the leaf and the decoded chain
    tokens: tuple  # x1..xm; x1..x(m-1) are decoded, at positions pos(leaf)+1..
    qs: tuple      # [m] the draft distribution each token was chosen from (after the leaf, x1, ...)


def advanced(state, token: int):
    """The grammar's `state` advanced by `token` (in place), or None: no grammar, or it forbids the token there
    (nothing after it is the target's)."""
    if state is not None:
        try:
            state.accept(token)  # (it checks the token first)
        except RequestError:
            return None
    return state


@dataclass
class _Growth:
    """One tree being grown (Drafter.draft), kept until the next: drafting past its leaves (Drafter.past) needs
    its distributions and grammar states."""
    tree: TokenTree
    max_nodes: int
    max_depth: int
    break_even: Optional[float]  # branch confidence at which a node pays (alternatives below branch_p)
    dist: dict    # node -> the draft's distribution after it (decoded nodes)
    states: dict  # node -> the grammar's state after its path (edgecad.grammar.Grammar or None)
    seed: Optional[Chain] = None  # the kept chain the tree starts from (branch 1 holds its decoded tokens)
    seeded: set = field(default_factory=set)  # nodes that follow it (the node at depth d: seed.tokens[d])
    leaf: dict = field(default_factory=lambda: {1: 0})   # branch -> its newest node
    count: dict = field(default_factory=lambda: {1: 0})  # branch -> drafted tokens it owns
    active: set = field(default_factory=lambda: {1})     # branches still growing
    next_branch: int = 2    # the next draft KV sequence to fork into

    def state(self, node: int):
        """The grammar's state after the path to `node` (the root: the completion's, which has taken the root
        already), or None: no grammar, or the path holds a token the grammar forbids."""
        if node not in self.states:
            up = self.state(int(self.tree.parent[node]))
            self.states[node] = advanced(up.clone(), int(self.tree.token[node])) if up is not None else None
        return self.states[node]


class Drafter:
    """Builds token trees with the resident draft model and keeps its KV cache in step.

    As llama.cpp's common/speculative: `start(prompt)` reconciles the cache with a new prompt by longest common
    prefix; then per step `draft` -> (the target verifies) -> `accept(tree, path, bonus, chain)`. Between steps,
    sequence 0 holds the accepted tokens `ctx.tokens` (n_past of them) and `pending` are the accepted tokens after
    them (the last is the next root); or, when the target took a chain drafted past the tree, the chain is kept:
    its first token is the next root (decoded, in ctx.tokens), sequence 0 also holds its decoded tokens after it,
    and the next tree starts from it.
    """

    def __init__(self, ctx: Context, params: TreeParams, n_seq_max: int, n_batch: int):
        self.ctx, self.p = ctx, params
        self.n_seq_max = n_seq_max
        self.batch = Batch(max(n_batch, params.max_nodes + 1), n_seq_max)
        self.pending: list[int] = []
        self._seed: Optional[Chain] = None  # a kept chain: the start of the next tree
        self._g: Optional[_Growth] = None   # the last tree drafted
        self.decodes = 0
        self.seconds = 0.0       # drafting trees (the target waits)
        self.cpu = 0.0           # the drafting thread's CPU seconds meanwhile (Stats.cpu_draft)
        self.reused_tokens = 0   # kept chains' tokens the next trees started from

    def close(self) -> None:
        self.batch.close()

    def start(self, prompt: Sequence[int]) -> None:
        """A new sequence: the cache holds all of `prompt` but its last token (the first root); what it
        already held in common with it is kept."""
        self.ctx.sync(self.batch, prompt[:-1])
        self.pending, self._seed = [prompt[-1]], None

    @property
    def n_past(self) -> int:
        """Accepted tokens in sequence 0."""
        return len(self.ctx.tokens)

    @property
    def kv_end(self) -> int:
        """Last position sequence 0 holds between steps."""
        return self.n_past - 1 + (len(self._seed.tokens) - 2 if self._seed else 0)

    def _probs(self, logits: np.ndarray, sp: SamplingParams, state) -> np.ndarray:
        """The draft's distribution at a node: its own probabilities when greedy, else the sampling one, masked
        by the grammar's `state` after the node's path when the completion has one (a token it forbids is never
        drafted). Kept in float32 (a tree holds one per node): draws and the acceptance rule use the same vector,
        so exactness holds whatever the mask."""
        if state is not None:
            try:
                logits = state.mask(logits, self.p.max_width if sp.greedy else sp.top_k)
            except RequestError:  # nothing allowed after this path: the target will not take it either
                pass
        if sp.greedy:  # the raw softmax, in float32 (one per drafted node: ~0.2 ms, not ~7 ms)
            e = np.exp(logits - logits.max())
            return e / e.sum()
        return distribution(logits, sp).astype(np.float32)

    def _children(self, q: np.ndarray, k_max: int, sp: SamplingParams, rng, first: Optional[int] = None,
                  floor: Optional[float] = None) -> list[int]:
        """Child tokens of a node, in draft order. Greedy: top-1 and the alternatives >= branch_p (or >= floor,
        when lower). Sampling: as many i.i.d. draws from q as q has tokens above that (decided before
        drawing, so multi-draft rejection sampling stays exact); duplicates are kept. `first`: a draw
        from q made earlier (a kept chain's token), used as the first draw."""
        lo = min(self.p.branch_p, floor if floor is not None else 1.0)
        best = int(np.argmax(q))
        if lo > 0:  # the candidates by a mask: a full-vocabulary partition costs ~10x more
            alts = np.flatnonzero(q >= lo)
        else:
            alts = np.argpartition(q, -k_max)[-k_max:] if k_max < len(q) else np.arange(len(q))
        alts = alts[alts != best]
        alts = alts[np.argsort(-q[alts], kind="stable")][: k_max - 1]
        k = 1 + int(np.sum(q[alts] >= lo))
        if sp.greedy:
            return [best] + [int(t) for t in alts[: k - 1]]
        draws = [first] if first is not None else []
        return draws + [sample_from(q, rng) for _ in range(k - len(draws))]

    def draft(self, max_nodes: int, max_depth: int, sp: SamplingParams, rng: np.random.Generator,
              threshold: float, break_even: Optional[float] = None, grammar=None) -> TokenTree:
        """Decode what the draft has not seen, then grow a tree of at most max_nodes drafted tokens
        and max_depth levels from the root (the last accepted token). break_even: the branch confidence at
        which a node pays for its cost (FallbackThreshold.break_even): an alternative child whose branch
        confidence reaches it joins even below branch_p (IO-bound passes: wide trees). grammar: the
        completion's (in its state after the root), which masks the draft's distributions."""
        t0, cpu = time.perf_counter(), time.thread_time()
        g = self._g = self._root(max_nodes, max_depth, sp, break_even, grammar)
        tree = g.tree
        while g.active and tree.n_drafted < max_nodes:
            # one level: each branch due its fair share of the node budget (share proportional to its
            # confidence, LLMCad) gets children; then one draft decode of every new node
            total = sum(tree.conf[g.leaf[br]] for br in g.active) or 1.0
            deficit = {br: max_nodes * tree.conf[g.leaf[br]] / total - g.count[br] for br in g.active}
            order = sorted(g.active, key=lambda br: -deficit[br])
            new = []
            for br in [br for br in order if deficit[br] > 0] or order[:1]:
                if tree.n_drafted >= max_nodes:
                    break
                new += self._expand(g, br, sp, rng)
            if not new:
                break
            if self.p.fallback is Fallback.ADAPTIVE and max(tree.conf[g.leaf[br]] for br in g.active) < threshold:
                break  # the tree is unsure enough: hand over to the target
            if tree.n_drafted >= max_nodes or all(tree.depth[g.leaf[br]] >= max_depth for br in g.active):
                break
            self._decode_level(g, [c for c in new if not tree.decoded[c]], sp)
        if g.seed is not None:  # chain cells past the tree's last use of them
            used = max(tree.pos(c) for c in g.seeded if tree.decoded[c])  # (the root is)
            if tree.root_pos + len(g.seed.tokens) - 2 > used:
                self.ctx.seq_rm(1, used + 1, -1)
        self.seconds += time.perf_counter() - t0
        self.cpu += time.thread_time() - cpu
        return tree

    def _root(self, max_nodes: int, max_depth: int, sp: SamplingParams, break_even: Optional[float],
              grammar) -> _Growth:
        """A new tree at the root: the pending tokens decoded (in sequence 0 and branch 1), or a kept chain's
        first token as the root (decoded) with the chain's decoded tokens after it in branch 1."""
        seed, self._seed = self._seed, None
        if seed is None:
            tree = TokenTree(max_nodes + 1, self.pending[-1], self.n_past + len(self.pending) - 1)
        else:
            tree = TokenTree(max_nodes + 1, seed.tokens[0], self.n_past - 1)
            tree.decoded[0] = True
            self.reused_tokens += 1
        g = _Growth(tree, max_nodes, max_depth, break_even, {0: seed.qs[1]} if seed else {}, {0: grammar})
        if max_nodes <= 0 or max_depth <= 0:
            if seed is not None:
                self.ctx.seq_rm(0, tree.root_pos + 1, -1)  # sequence 0: accepted tokens only
            g.active = set()
            return g
        self.ctx.seq_cp(0, 1)  # branch 1 starts as the accepted prefix (and the kept chain)
        if seed is not None:
            self._follow(g, seed)
            return g
        b, n = self.batch, len(self.pending)
        b.clear()
        for j, t in enumerate(self.pending):
            b.add(t, self.n_past + j, (0, 1), j == n - 1)
        self.ctx.decode(b)
        self.ctx.tokens += self.pending
        self.decodes += 1
        tree.decoded[0] = True
        g.dist[0] = self._probs(self.ctx.logits(n - 1), sp, g.state(0))
        return g

    def _follow(self, g: _Growth, seed: Chain) -> None:
        """Branch 1 follows the kept chain from the root (sequence 0 keeps the accepted tokens only), when the KV
        cells it holds fit beside a full tree; else it is dropped."""
        root_pos = g.tree.root_pos
        self.ctx.seq_rm(0, root_pos + 1, -1)
        if root_pos + len(seed.tokens) - 1 + g.max_nodes <= self.ctx.n_ctx:
            g.seed, g.seeded = seed, {0}
        else:
            self.ctx.seq_rm(1, root_pos + 1, -1)

    def _expand(self, g: _Growth, br: int, sp: SamplingParams, rng: np.random.Generator) -> list[int]:
        """Children of branch br's newest node (the first continues the branch, the others fork new ones while
        KV sequences last); returns the new nodes. A branch at its depth, at an end of generation or (token
        fallback) below p_min stops."""
        tree, p, ctx, node = g.tree, self.p, self.ctx, g.leaf[br]
        if tree.depth[node] >= g.max_depth or (node and ctx.model.is_eog(int(tree.token[node]))):
            g.active.discard(br)  # (nothing follows an end of generation: no node is drafted past it)
            return []
        q = g.dist[node]
        if p.fallback is Fallback.TOKEN and q.max() < p.p_min:
            g.active.discard(br)
            return []
        d = int(tree.depth[node])
        # the kept chain's next token, a draw from q made earlier: the first child (greedy: q's top-1 as well)
        nxt = g.seed.tokens[d + 1] if node in g.seeded and d + 1 < len(g.seed.tokens) else None
        floor = g.break_even / tree.conf[node] if g.break_even is not None and tree.conf[node] > 0 else None
        # At most as many draws as can be placed (each new token takes a node and, past the first, a KV sequence),
        # decided before drawing: no draw is ever cut for lack of room, so how many are kept never depends on
        # their values, and rejection sampling over tree.draws stays exact.
        room = min(g.max_nodes - tree.n_drafted, 1 + max(0, self.n_seq_max - g.next_branch))
        toks = self._children(q, max(1, min(p.max_width, room)), sp, rng, nxt, floor)
        tree.q[node] = q
        new = []
        for t in toks:
            if t in tree.children[node]:
                tree.draws[node].append(t)  # a repeated draw: same child node
                continue
            if tree.n_drafted >= g.max_nodes:
                break
            if not tree.children[node]:
                child_branch = br  # the first child continues the branch
            elif g.next_branch < self.n_seq_max:
                child_branch, g.next_branch = g.next_branch, g.next_branch + 1
                ctx.seq_cp(br, child_branch, -1, tree.pos(node) + 1)
                g.count[child_branch] = 0
                g.active.add(child_branch)
            else:
                break
            tree.draws[node].append(t)
            c = tree.add(node, t, float(q[t]), child_branch)
            if t == nxt:  # the chain's next token, on branch 1: drafted already, and decoded up to x(m-1)
                g.seeded.add(c)
                if d + 1 <= len(g.seed.tokens) - 2:
                    tree.decoded[c] = True
                    g.dist[c] = g.seed.qs[d + 2]
                    self.reused_tokens += 1
            g.leaf[child_branch] = c
            g.count[child_branch] += 1
            new.append(c)
        return new

    def _decode_level(self, g: _Growth, fresh: list[int], sp: SamplingParams) -> None:
        """One draft decode of the new nodes, each in its branch's sequence: their children's distributions."""
        if not fresh:
            return
        tree, b = g.tree, self.batch
        b.clear()
        for c in fresh:
            b.add(int(tree.token[c]), tree.pos(c), (int(tree.branch[c]),), True)
        self.ctx.decode(b)
        self.decodes += 1
        for j, c in enumerate(fresh):
            tree.decoded[c] = True
            g.dist[c] = self._probs(self.ctx.logits(j), sp, g.state(c))

    def past(self, leaf: int) -> tuple[int, Optional[np.ndarray], object]:
        """Where drafting goes on past `leaf` of the last tree (edgecad.pipeline's chain): the KV sequence holding
        its path (the root's: branch 1, a copy of sequence 0), the draft's distribution after it (None: not decoded
        yet) and a copy of the grammar's state after its path (None: no grammar, or it forbids the path)."""
        g = self._g
        branch = int(g.tree.branch[leaf])
        if leaf == 0:  # nothing drafted: the root is in sequence 0 (accepted); the chain goes in branch 1
            self.ctx.seq_cp(0, 1)
            branch = 1
        state = g.state(leaf)
        return branch, g.dist.get(leaf), state.clone() if state is not None else None

    def decode_one(self, token: int, pos: int, branch: int, sp: SamplingParams, state) -> np.ndarray:
        """Decode `token` at `pos` in sequence `branch` (past a tree: a chain's): the draft's distribution after
        it, masked by the grammar's `state` after it."""
        self.batch.clear()
        self.batch.add(token, pos, (branch,), True)
        self.ctx.decode(self.batch)
        self.decodes += 1
        return self._probs(self.ctx.logits(0), sp, state)

    def accept(self, tree: TokenTree, path: Sequence[int], bonus: int, chain: Optional[Chain] = None) -> None:
        """The target took `path` (tree nodes) and then `bonus`: keep that in sequence 0. `chain`: drafted past a
        leaf of `tree` beside the target's pass; kept (the start of the next tree) when the target took that leaf's
        whole branch and then the chain's first token."""
        tokens = [int(tree.token[i]) for i in path] + [bonus]
        if not tree.decoded[0]:  # nothing was drafted: the pending tokens are still pending
            self.pending = self.pending + tokens
            return
        if chain and (path[-1] if path else 0) == chain.leaf and bonus == chain.tokens[0] and len(chain.tokens) >= 2:
            keep_path(self.ctx, chain.branch, tree.pos(chain.leaf) + len(chain.tokens) - 1)
            self.ctx.tokens += tokens  # the path, then x1: sequence 0 also holds x2..x(m-1)
            self.pending, self._seed = [], chain
            return
        deepest, k = 0, 0
        for j, i in enumerate(path):
            if tree.decoded[i]:
                deepest, k = i, j + 1
        keep_path(self.ctx, int(tree.branch[deepest]) if deepest else 0, tree.pos(deepest))
        self.ctx.tokens += tokens[:k]
        self.pending = tokens[k:]
