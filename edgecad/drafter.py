"""The drafter: builds token trees with the resident draft model and keeps its KV cache in step.

Drafting grows the tree one *level* at a time: each level is one draft
llama_decode holding every node added in that iteration, each node tagged with
the KV sequence of its branch. A branch forks from node L by copying its
parent branch's KV up to L's position (seq_cp over a position range), so each
branch's sequence always holds exactly the prefix + its own path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import RequestError
from .llama import Batch, Context
from .sampling import SamplingParams, distribution, sample_from
from .tree import TokenTree, TreeParams, keep_path


@dataclass
class Chain:
    """Tokens drafted past a tree's most likely leaf while the target verified the tree (Drafter.extend)."""
    leaf: int      # the tree node the chain continues
    branch: int    # the draft KV sequence holding the leaf and the decoded chain
    tokens: list   # x1..xm; x1..x(m-1) are decoded, at positions pos(leaf)+1..
    qs: list       # [m] the draft distribution each token was chosen from (after the leaf, x1, ...)


@dataclass
class _Growth:
    """One tree being grown (Drafter.draft)."""
    tree: TokenTree
    seed: Optional[Chain]   # the kept chain the tree starts from, if any
    max_nodes: int
    max_depth: int
    seeded: dict = field(default_factory=dict)  # tree node -> its index in seed.tokens, while branch 1 follows it
    seed_end: int = 0       # the last chain cell in branch 1
    leaf: dict = field(default_factory=lambda: {1: 0})   # branch -> its newest node
    count: dict = field(default_factory=lambda: {1: 0})  # branch -> drafted tokens it owns
    active: set = field(default_factory=lambda: {1})     # branches still growing
    next_branch: int = 2    # the next draft KV sequence to fork into
    break_even: Optional[float] = None  # branch confidence at which a node pays (alternatives below branch_p)


class Drafter:
    """Builds token trees with the resident draft model and keeps its KV cache in step.

    The drafter owns its cache: `start(prompt)`, then per step `draft` -> (the target verifies) ->
    `accept(tree, path, bonus)`. Between steps, sequence 0 holds the accepted tokens `ctx.tokens`
    (n_past of them) and `pending` are the accepted tokens after them (the last is the next root); or,
    when the target accepted a chain pre-drafted by `extend`, `seed` is that chain: its first token is
    the next root (decoded, in ctx.tokens) and sequence 0 also holds the chain's decoded tokens after
    it. `start` reconciles the cache with a new prompt by longest common prefix.
    """

    def __init__(self, ctx: Context, params: TreeParams, n_seq_max: int, n_batch: int):
        self.ctx, self.p = ctx, params
        self.n_seq_max = n_seq_max
        self.batch = Batch(max(n_batch, params.max_nodes + 1), n_seq_max)
        self.pending: list[int] = []
        self.seed: Optional[Chain] = None   # a kept chain: the start of the next tree
        self.chain: Optional[Chain] = None  # the chain drafted beside the current tree's verification
        self._dist: dict[int, np.ndarray] = {}  # node -> draft distribution after it, for the current tree
        self._tree: Optional[TokenTree] = None  # the tree being drafted
        self._states: dict = {}  # node -> the grammar's state after its path (edgecad.llama.Grammar or None)
        self.decodes = 0
        self.seconds = 0.0         # drafting trees (the target waits)
        self.seconds_extend = 0.0  # drafting chains beside target passes (overlapped)
        self.chain_tokens = 0      # tokens drafted into chains
        self.reused_tokens = 0     # chain tokens the next tree started from

    def close(self) -> None:
        self.batch.close()

    def start(self, prompt: Sequence[int]) -> None:
        """A new sequence: the cache holds all of `prompt` but its last token (the first root); what it
        already held in common with it is kept."""
        self.ctx.sync(self.batch, prompt[:-1])
        self.pending, self.seed, self.chain = [prompt[-1]], None, None

    @property
    def n_past(self) -> int:
        """Accepted tokens in sequence 0."""
        return len(self.ctx.tokens)

    @property
    def kv_end(self) -> int:
        """Last position sequence 0 holds between steps."""
        return self.n_past - 1 + (len(self.seed.tokens) - 2 if self.seed else 0)

    def _probs(self, logits: np.ndarray, sp: SamplingParams, node: int = -1, state=None) -> np.ndarray:
        """The draft's distribution at a node: its own probabilities when greedy, else the sampling one, masked
        by the grammar after the node's path when the completion has one (a token it forbids is never drafted;
        `state`: the grammar's state, when the node is a chain's, past the tree). Kept in float32 (a tree holds
        one per node): draws and the acceptance rule use the same vector, so exactness holds whatever the mask."""
        if node >= 0:
            state = self._state(node)
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

    def _state(self, node: int):
        """The grammar's state after the path to `node` (the root: the completion's, which has taken the root
        already), or None: no grammar, or the path holds a token the grammar forbids."""
        if node not in self._states:
            tree, parent = self._tree, int(self._tree.parent[node])
            up = self._state(parent) if parent >= 0 else None
            state = up.clone() if up is not None else None
            if state is not None:
                try:
                    state.accept(int(tree.token[node]))  # (it checks the token first)
                except RequestError:  # the grammar forbids it here: nothing after it is the target's
                    state = None
            self._states[node] = state
        return self._states[node]

    def draft(self, max_nodes: int, max_depth: int, sp: SamplingParams, rng: np.random.Generator,
              threshold: float, break_even: Optional[float] = None, grammar=None) -> TokenTree:
        """Decode what the draft has not seen, then grow a tree of at most max_nodes drafted tokens
        and max_depth levels from the root (the last accepted token). break_even: the branch confidence at
        which a node pays for its cost (FallbackThreshold.break_even): an alternative child whose branch
        confidence reaches it joins even below branch_p (IO-bound passes: wide trees). With a kept chain
        (`seed`), the tree grows exactly as it would without it, but a child that is the chain's next token
        on branch 1 reuses the chain's decode instead of decoding again. grammar: the completion's (in its
        state after the root), which masks the draft's distributions."""
        t0 = time.perf_counter()
        self._states = {0: grammar}
        g = self._root(max_nodes, max_depth, sp)
        g.break_even = break_even
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
            if self.p.fallback == "adaptive" and max(tree.conf[g.leaf[br]] for br in g.active) < threshold:
                break  # the tree is unsure enough: hand over to the target
            if tree.n_drafted >= max_nodes or all(tree.depth[g.leaf[br]] >= max_depth for br in g.active):
                break
            self._decode_level(tree, [c for c in new if not tree.decoded[c]], sp)
        if g.seed is not None:  # chain cells past the tree's last use of them
            used = max((tree.pos(c) for c in g.seeded if tree.decoded[c]), default=tree.root_pos)
            if g.seed_end > used:
                self.ctx.seq_rm(1, used + 1, -1)
        self.seconds += time.perf_counter() - t0
        return tree

    def _root(self, max_nodes: int, max_depth: int, sp: SamplingParams) -> "_Growth":
        """A new tree at the root: the pending tokens decoded (in sequence 0 and branch 1), or a kept chain's
        first token as the root with its decoded tokens in branch 1."""
        ctx, seed = self.ctx, self.seed
        self.seed = None
        if seed is None:
            tree = TokenTree(max_nodes + 1, self.pending[-1], self.n_past + len(self.pending) - 1)
        else:  # the chain's first token is the root; its decoded tokens follow in sequence 0
            tree = TokenTree(max_nodes + 1, seed.tokens[0], self.n_past - 1)
            tree.decoded[0] = True
            self.reused_tokens += 1
        self._dist = {0: seed.qs[1]} if seed is not None else {}
        self._tree = tree
        g = _Growth(tree, seed, max_nodes, max_depth)
        if max_nodes <= 0 or max_depth <= 0:
            if seed is not None:
                ctx.seq_rm(0, tree.root_pos + 1, -1)
            g.active = set()
            return g
        ctx.seq_cp(0, 1)  # branch 1 starts as the accepted prefix (and the kept chain)
        if seed is None:
            b = self.batch
            b.clear()
            for j, t in enumerate(self.pending):
                b.add(t, self.n_past + j, (0, 1), j == len(self.pending) - 1)
            ctx.decode(b)
            ctx.tokens += self.pending
            self.decodes += 1
            tree.decoded[0] = True
            self._dist[0] = self._probs(ctx.logits(len(self.pending) - 1), sp, 0)
        else:
            ctx.seq_rm(0, tree.root_pos + 1, -1)  # sequence 0: accepted tokens only
            if tree.root_pos + len(seed.tokens) - 1 + max_nodes <= ctx.n_ctx:
                g.seeded[0] = 0
            else:  # no KV cells for the chain beside a full tree: drop it
                ctx.seq_rm(1, tree.root_pos + 1, -1)
        g.seed_end = tree.root_pos + (len(seed.tokens) - 2 if g.seeded else 0)  # last chain cell in branch 1
        return g

    def _expand(self, g: "_Growth", br: int, sp: SamplingParams, rng: np.random.Generator) -> list[int]:
        """Children of branch br's newest node (the first continues the branch, the others fork new ones while
        KV sequences last); returns the new nodes. A branch at its depth, at an end of generation or (token
        fallback) below p_min stops."""
        tree, p, ctx, node = g.tree, self.p, self.ctx, g.leaf[br]
        if tree.depth[node] >= g.max_depth or (node and ctx.model.is_eog(int(tree.token[node]))):
            g.active.discard(br)  # (nothing follows an end of generation: no node is drafted past it)
            return []
        q = self._dist[node]
        if p.fallback == "token" and q.max() < p.p_min:
            g.active.discard(br)
            return []
        i = g.seeded.get(node)
        nxt = g.seed.tokens[i + 1] if i is not None and i + 1 < len(g.seed.tokens) else None
        floor = g.break_even / tree.conf[node] if g.break_even is not None and tree.conf[node] > 0 else None
        # At most as many draws as can be placed (each new token takes a node and, past the first, a KV sequence),
        # decided before drawing: no draw is ever cut for lack of room, so how many are kept never depends on
        # their values, and rejection sampling over tree.draws stays exact.
        room = min(g.max_nodes - tree.n_drafted, 1 + max(0, self.n_seq_max - g.next_branch))
        toks = self._children(q, max(1, min(p.max_width, room)), sp, rng, nxt, floor)
        tree.q[node] = q
        if nxt is not None and toks[0] != nxt:  # the chain stops here: drop its cells past `node`
            ctx.seq_rm(1, tree.pos(node) + 1, -1)
            g.seed_end = tree.pos(node)
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
            if t == nxt and child_branch == 1:  # the chain's next token: already drafted
                g.seeded[c] = i + 1
                if tree.pos(c) <= g.seed_end:  # and decoded
                    tree.decoded[c] = True
                    self._dist[c] = g.seed.qs[i + 2]
                    self.reused_tokens += 1
            g.leaf[child_branch] = c
            g.count[child_branch] += 1
            new.append(c)
        return new

    def _decode_level(self, tree: TokenTree, fresh: list[int], sp: SamplingParams) -> None:
        """One draft decode of the new nodes, each in its branch's sequence: their children's distributions."""
        if not fresh:
            return
        b = self.batch
        b.clear()
        for c in fresh:
            b.add(int(tree.token[c]), tree.pos(c), (int(tree.branch[c]),), True)
        self.ctx.decode(b)
        self.decodes += 1
        for j, c in enumerate(fresh):
            tree.decoded[c] = True
            self._dist[c] = self._probs(self.ctx.logits(j), sp, c)

    def extend(self, tree: TokenTree, sp: SamplingParams, rng: np.random.Generator, max_len: int,
               done: Callable[[], bool]) -> None:
        """While the target verifies `tree` (until done()), draft on past its most likely leaf: a chain
        of the draft's top-1 (greedy) or of single draws (sampling), one token per decode. `accept`
        keeps it as the start of the next tree when the target takes that whole branch and its bonus
        token is the chain's first (a draw of x(i+1) from q(. | ..., xi) is a valid single draft
        draw at that node, so the sampling acceptance stays exact). With a grammar, each distribution is
        masked by its state after the leaf's path and the chain so far, as the tree's own nodes are: a kept
        chain's tokens and distributions become the next tree's nodes and theirs."""

        self.chain = None
        if max_len < 2 or not tree.decoded[0]:
            return
        t0 = time.perf_counter()
        leaf = max(tree.leaves(), key=lambda i: tree.conf[i])
        br, pos, tok = int(tree.branch[leaf]), tree.pos(leaf), int(tree.token[leaf])
        if leaf == 0:  # nothing drafted: the root is in sequence 0 (accepted); draft the chain in branch 1
            self.ctx.seq_cp(0, 1)
            br = 1
        q = self._dist.get(leaf)  # known when the leaf is decoded
        state = self._state(leaf)  # the grammar after the leaf's path (None: none, or it forbids that path)
        state = state.clone() if state is not None else None  # (advanced along the chain)
        chain = Chain(leaf, br, [], [])
        while len(chain.tokens) < max_len and not done():
            if q is None:  # decode `tok` (the leaf, then each chain token) at `pos` in the branch
                self.batch.clear()
                self.batch.add(tok, pos, (br,), True)
                self.ctx.decode(self.batch)
                self.decodes += 1
                tree.decoded[leaf] = True
                q = self._probs(self.ctx.logits(0), sp, state=state)
            tok = int(np.argmax(q)) if sp.greedy else sample_from(q, rng)
            chain.tokens.append(tok)
            chain.qs.append(q)
            pos, q = pos + 1, None
            if state is not None:
                try:
                    state.accept(tok)
                except RequestError:  # nothing allowed was left to mask with: what follows is not the target's
                    state = None
        if chain.tokens:
            self.chain = chain
            self.chain_tokens += len(chain.tokens)
        self.seconds_extend += time.perf_counter() - t0

    def accept(self, tree: TokenTree, path: Sequence[int], bonus: int) -> None:
        """The target took `path` (tree nodes) and then `bonus`: keep that in sequence 0."""
        tokens = [int(tree.token[i]) for i in path] + [bonus]
        chain, self.chain = self.chain, None
        if not tree.decoded[0]:  # nothing was drafted: the pending tokens are still pending
            self.pending = self.pending + tokens
            return
        if chain and (path[-1] if path else 0) == chain.leaf and bonus == chain.tokens[0] and len(chain.tokens) >= 2:
            # the target took the chain's branch and its first token: keep the decoded chain
            keep_path(self.ctx, chain.branch, tree.pos(chain.leaf) + len(chain.tokens) - 1)
            self.ctx.tokens += tokens  # the path, then x1: sequence 0 also holds x2.. (the seed)
            self.pending, self.seed = [], chain
            return
        deepest, k = 0, 0
        for j, i in enumerate(path):
            if tree.decoded[i]:
                deepest, k = i, j + 1
        keep_path(self.ctx, int(tree.branch[deepest]) if deepest else 0, tree.pos(deepest))
        self.ctx.tokens += tokens[:k]
        self.pending = tokens[k:]


