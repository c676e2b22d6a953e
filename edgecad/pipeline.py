"""The compute-IO pipeline: the draft drafts on while the target's pass waits on storage.

While a paged target verifies a tree, a second thread drafts a chain past the tree's most likely leaf
(`draft_chain`); the C library's gate lets each of its draft layers run only while the target waits for
a layer (two models computing at once on the same cores slow both). The chain is offered to `Drafter.accept`,
which keeps it when the target took that branch: the next tree starts from it. The memory plan turns it on where
a pass would wait on storage longer than its drafting takes (`plan.costs.waits`): 1.33x at 45 MB/s, 0.95-0.98x
where compute hides the reads (docs/results.md). The speculative step calls `verify` in place of `verify_tree`.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np

from .llama import Batch, Context
from .pager import Pager
from .sampling import SamplingParams, sample_from
from .drafter import Chain, Drafter, advanced
from .tree import TokenTree
from .verify import verify_tree


def draft_chain(drafter: Drafter, tree: TokenTree, sp: SamplingParams, rng: np.random.Generator, max_len: int,
                done: Callable[[], bool]) -> Optional[Chain]:
    """Draft on past the most likely leaf of `tree` (the drafter's last) until done(): a chain of at most max_len
    tokens, the draft's top-1 (greedy) or single draws (sampling), one token per decode. `Drafter.accept` keeps
    it as the start of the next tree when the target takes that whole branch and its bonus token is the chain's
    first (a draw of x(i+1) from q(. | ..., xi) is a valid single draft draw at that node, so the sampling
    acceptance stays exact). With a grammar, each distribution is masked by its state after the leaf's path and
    the chain so far, as the tree's own nodes are: a kept chain's tokens and distributions become the next
    tree's nodes and theirs."""
    if max_len < 2 or not tree.decoded[0]:
        return None
    leaf = max(tree.leaves(), key=lambda i: tree.conf[i])
    branch, q, state = drafter.past(leaf)  # (q: None until the leaf is decoded; state: a copy, advanced here)
    pos, tok = tree.pos(leaf), int(tree.token[leaf])
    tokens, qs = [], []
    while len(tokens) < max_len and not done():
        if q is None:  # decode `tok` (the leaf, then each chain token) at `pos` in the branch
            q = drafter.decode_one(tok, pos, branch, sp, state)
            tree.decoded[leaf] = True  # (the drafter keeps the leaf's cell when the target takes its branch)
        tok = int(np.argmax(q)) if sp.greedy else sample_from(q, rng)
        tokens.append(tok)
        qs.append(q)
        pos, q = pos + 1, None
        state = advanced(state, tok)
    return Chain(leaf, branch, tuple(tokens), tuple(qs)) if tokens else None


class Pipeline:
    """Verify a tree while a chain is drafted beside the pass. The chain is drafted in a second thread; the
    target runs in the calling thread, as the tree drafting does: llama.cpp's OpenMP team belongs to the
    calling thread, and one team's threads spinning after its decode slow the other's next decode on small
    core counts."""

    def __init__(self, pager: Pager, drafter: Drafter):
        self.pager, self.drafter, self.rng, self._thread = pager, drafter, None, None
        self._done = self._finished = None  # the running chain's events: told to stop, and stopped
        self.seconds = 0.0  # drafting chains beside target passes (overlapped with them)
        self.tokens = 0     # tokens drafted into chains

    def start(self, rng: np.random.Generator) -> None:
        """A completion begins: the chains' draws come from their own generator, seeded from the completion's."""
        self.rng = np.random.default_rng(rng.integers(1 << 63))

    def verify(self, target: Context, batch: Batch, tree: TokenTree, sp: SamplingParams, room: int, left: int,
               prefix=()) -> tuple[np.ndarray, dict, Optional[Chain]]:
        """verify_tree, drafting a chain beside it: (logits, leaf -> sequence, the chain or None). room: KV cells
        left after the root; left: tokens still wanted after the root's. The chain is useful up to the next tree's
        depth, in the draft KV cells beside the tree."""
        depth = int(tree.depth[: tree.n].max())
        chain_len = min(self.drafter.p.max_depth + 1, room - tree.n_drafted - 1, left - depth)
        if chain_len < 2:
            return (*verify_tree(target, batch, tree, prefix), None)
        done, finished, box = threading.Event(), threading.Event(), {}
        self._done, self._finished = done, finished

        def chain():
            try:
                if done.is_set():  # (started late, after the pass was cut short: the draft is the caller's again)
                    return
                t0 = time.perf_counter()
                box["chain"] = c = draft_chain(self.drafter, tree, sp, self.rng, chain_len, done.is_set)
                self.seconds += time.perf_counter() - t0
                self.tokens += len(c.tokens) if c else 0
            except BaseException as e:  # re-raised in this thread
                box["err"] = e
            finally:
                finished.set()  # (the draft's context is the caller's again)

        th = self._thread = threading.Thread(target=chain, name="edgecad-chain")
        try:
            self.pager.begin_pass()
            th.start()
            out = verify_tree(target, batch, tree, prefix)
        finally:
            self.settle()
        if "err" in box:
            raise box["err"]
        return (*out, box.get("chain"))

    def settle(self) -> None:
        """The chain told to stop, the draft ungated (never left gated: the decode may not have run), the chain's
        thread done with the draft: at the end of every verify, and before the draft's context is used again or
        freed (the decoder's start and close), should a Ctrl-C have landed in verify's finally and left it not
        waited for. Nothing to do once it was."""
        if self._thread is None:
            return
        self._done.set()
        try:
            self.pager.end_pass()
        finally:
            self._join()

    def _join(self) -> None:
        """Wait for the chain thread, if one was started, to be done with the draft: it drafts in the draft's
        context and passes the pager's gate, so it must be done before either is used again or freed. It says so
        itself (`finished`), not Thread.join: a Ctrl-C inside Thread.join can mark a thread that still runs as
        stopped (CPython 3.11's _wait_for_tstate_lock releases the running thread's lock when an interrupt cuts
        its acquire short), and a second decode in the draft's context crashes llama.cpp. A thread not yet
        bootstrapped (no ident: a Ctrl-C inside Thread.start) finds its chain told to stop and returns."""
        th, interrupted = self._thread, False
        if th is not None and th.ident is not None:
            while not self._finished.is_set():  # (a Ctrl-C inside the wait must not leave the chain drafting)
                try:
                    self._finished.wait(0.01)
                except KeyboardInterrupt:
                    interrupted = True
        self._thread = None
        if interrupted:
            raise KeyboardInterrupt
