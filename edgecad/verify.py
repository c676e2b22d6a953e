"""The target side of speculative decoding: verify a whole token tree in one pass, then accept.

Tree attention with llama.cpp's sequences: every leaf gets a sequence id (1..L),
every node is tagged with the ids of all leaves below it and positioned at its
depth, and the accepted prefix (sequence 0) is copied into each leaf sequence.
Per-sequence causal masking then lets each node see exactly its ancestors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .llama import Batch, Context
from .sampling import RAW, SamplingParams, distribution, processed, sample_from
from .tree import Acceptance, TokenTree, TreeParams, keep_path


@dataclass
class Verdict:
    """What the target made of one tree: one speculative step's result."""
    path: list        # accepted tree nodes from the root's child down (the root excluded)
    bonus: int        # the target's own token after the path
    divergent: int = 0    # bild: accepted drafted tokens that differ from the target's argmax
    seconds: float = 0.0  # the target's pass
    ties: tuple = ()      # per emitted token (path, then bonus): the target's top-2 logits there were a near-tie
    rows: Optional[np.ndarray] = None  # per emitted token: the target's logits row that gave it (when asked)
    cpu: float = 0.0      # the calling thread's CPU seconds during the pass (Stats.cpu_target)


def leaf_sequences(tree: TokenTree) -> tuple[list[list[int]], dict[int, int]]:
    """Per node, the sequence ids of the leaves below it; and leaf node -> its sequence id."""
    seqs: list[list[int]] = [[] for _ in range(tree.n)]
    leaf_seq = {}
    for s, leaf in enumerate(tree.leaves(), start=1):
        leaf_seq[leaf] = s
        i = leaf
        while i >= 0:
            seqs[i].append(s)
            i = int(tree.parent[i])
    return seqs, leaf_seq


def verify_tree(ctx: Context, batch: Batch, tree: TokenTree, prefix=()) -> tuple[np.ndarray, dict[int, int]]:
    """One target llama_decode of the root and every node; logits per node (a view), leaf -> seq id.
    prefix: accepted tokens before the root that sequence 0 does not hold yet (the end of a prompt), decoded
    in the same pass (a paged target streams its weights once for both); sequence 0 then holds them."""
    seqs, leaf_seq = leaf_sequences(tree)
    for s in range(1, len(leaf_seq) + 1):
        ctx.seq_cp(0, s)
    batch.clear()
    start = tree.root_pos - len(prefix)
    assert start == len(ctx.tokens), (start, len(ctx.tokens))
    for j, t in enumerate(prefix):  # seen by every branch
        batch.add(int(t), start + j, [0] + seqs[0], False)
    batch.add(int(tree.token[0]), tree.root_pos, [0] + seqs[0], True)
    for i in range(1, tree.n):
        batch.add(int(tree.token[i]), tree.pos(i), seqs[i], True)
    ctx.decode(batch)
    ctx.tokens += [int(t) for t in prefix]
    return ctx.logits_all(tree.n), leaf_seq


def keep_accepted(ctx: Context, tree: TokenTree, leaf_seq: dict, path: list) -> None:
    """Cut the target's KV to the accepted path: any leaf below the path's last node has a sequence
    holding that path; it becomes sequence 0, up to the last accepted node (root and path committed)."""
    last = path[-1] if path else 0
    leaf = last
    while tree.children[leaf]:
        leaf = next(iter(tree.children[leaf].values()))
    keep_path(ctx, leaf_seq[leaf] if path else 0, tree.pos(last))
    ctx.tokens += [int(tree.token[i]) for i in [0, *path]]


def node_logits(tree: TokenTree, logits: np.ndarray, node: int, recent, sp: SamplingParams,
                grammar=None) -> np.ndarray:
    """The target's logits after `node` as the sampler sees them (sampling.processed), with that node's own
    history: the tokens generated before the root, then the path down to the node (the grammar, when there is
    one, is in the state after that history: the acceptance walks advance it along the path they take)."""
    history = recent if node == 0 else list(recent) + [int(tree.token[i]) for i in tree.path(node)]
    return processed(logits[node], history, sp, grammar)


def _step(tree: TokenTree, child: int, grammar) -> int:
    """Move the walk to `child` (a token the processed logits allowed): the grammar follows."""
    if grammar is not None:
        grammar.accept(int(tree.token[child]))
    return child


def accept_greedy(tree: TokenTree, logits: np.ndarray, sp: SamplingParams, recent=(),
                  grammar=None) -> tuple[list[int], int]:
    """Walk from the root taking the child equal to the target's argmax; the last argmax is the bonus."""
    path, node = [], 0
    while True:
        t = int(np.argmax(node_logits(tree, logits, node, recent, sp, grammar)))
        child = tree.children[node].get(t)
        if child is None:
            return path, t
        path.append(child)
        node = _step(tree, child, grammar)


def accept_sampling(tree: TokenTree, logits: np.ndarray, sp: SamplingParams,
                    rng: np.random.Generator, recent=(), grammar=None) -> tuple[list[int], int]:
    """Multi-draft rejection sampling (SpecInfer). At a node with target distribution p and
    children drawn i.i.d. from the draft distribution q: accept draw x with probability
    min(1, p(x)/q(x)); on rejection p <- normalize(max(0, p - q)) and try the next draw; if
    every draw is rejected, sample the residual p. Each node's output is then exactly p."""
    path, node = [], 0
    while True:
        p = distribution(node_logits(tree, logits, node, recent, sp, grammar), sp)
        q = tree.q[node]
        if tree.draws[node]:  # (the drafter keeps q in float32; its draws came from q / sum(q))
            q = q.astype(np.float64)
            q /= q.sum()
        for x in tree.draws[node]:
            if rng.random() * q[x] < p[x]:  # accept with probability min(1, p(x)/q(x))
                child = tree.children[node][x]
                path.append(child)
                node = _step(tree, child, grammar)
                break
            r = np.maximum(p - q, 0.0)
            p = r / r.sum() if r.sum() > 0 else p
        else:
            return path, sample_from(p, rng)


def accept_bild(tree: TokenTree, logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator,
                rollback_ce: float, recent=(), grammar=None) -> tuple[list[int], int, int]:
    """Big Little Decoder on a chain: keep each drafted token unless the target's cross-entropy on
    it, -log p_target(token), exceeds rollback_ce; at the first such token, roll back and take the
    target's own choice. Returns (path, next token, drafted tokens kept that differ from the
    target's argmax) -- BiLD is not lossless, and the last number says by how much."""
    path, node, divergent = [], 0, 0
    while tree.children[node]:
        (child,) = tree.children[node].values()
        x = int(tree.token[child])
        p = distribution(node_logits(tree, logits, node, recent, replace(sp, temperature=1.0, top_k=0), grammar), RAW)
        if p[x] < np.exp(-rollback_ce):  # cross-entropy -log p(x) above the threshold
            break
        divergent += int(np.argmax(p) != x)
        path.append(child)
        node = _step(tree, child, grammar)
    lg = node_logits(tree, logits, node, recent, sp, grammar)
    nxt = int(np.argmax(lg)) if sp.greedy else sample_from(distribution(lg, sp), rng)
    return path, nxt, divergent


# An acceptance rule: (tree, the target's logits per node, rng, tokens generated before the root, the grammar in
# its state at the root or None) -> (accepted path, bonus token, accepted drafted tokens that differ from the
# target's argmax); the grammar is left in its state after the path. A new rule is a new function here and one
# line in acceptance_for.

def acceptance_for(params: TreeParams, sp: SamplingParams):
    """The rule of a mode's parameters and a completion's sampling: BiLD's rollback, else greedy matching
    (greedy) or multi-draft rejection sampling (sampled): both exact."""
    if params.acceptance is Acceptance.BILD:
        return lambda tree, logits, rng, recent, g: accept_bild(tree, logits, sp, rng, params.rollback_ce, recent, g)
    if sp.greedy:
        return lambda tree, logits, rng, recent, g: (*accept_greedy(tree, logits, sp, recent, g), 0)
    return lambda tree, logits, rng, recent, g: (*accept_sampling(tree, logits, sp, rng, recent, g), 0)
