"""The compute-IO pipeline: the draft drafts on while the target's pass waits on storage.

While a paged target verifies a tree, a second thread drafts a chain past the tree's most likely leaf
(`Drafter.extend`); the C library's gate lets each of its draft layers run only while the target waits for
a layer (two models computing at once on the same cores slow both). The next tree starts from the chain when
the target took that branch (`Drafter.accept`). The memory plan turns it on where a pass would wait on storage
longer than its drafting takes (`plan.costs.waits`): 1.33x at 45 MB/s, 0.95-0.98x where compute hides the reads
(docs/results.md). The speculative step calls `verify` in place of `verify_tree`.
"""
from __future__ import annotations

import threading

import numpy as np

from .llama import Batch, Context
from .pager import Pager
from .sampling import SamplingParams
from .drafter import Drafter
from .tree import TokenTree
from .verify import verify_tree


class Pipeline:
    """Verify a tree while a chain is drafted beside the pass. The chain is drafted in a second thread; the
    target runs in the calling thread, as the tree drafting does: llama.cpp's OpenMP team belongs to the
    calling thread, and one team's threads spinning after its decode slow the other's next decode on small
    core counts."""

    def __init__(self, pager: Pager, drafter: Drafter):
        self.pager, self.drafter, self.rng, self._thread = pager, drafter, None, None

    def start(self, rng: np.random.Generator) -> None:
        """A completion begins: the chains' draws come from their own generator, seeded from the completion's."""
        self.rng = np.random.default_rng(rng.integers(1 << 63))

    def verify(self, target: Context, batch: Batch, tree: TokenTree, sp: SamplingParams, room: int, left: int,
               prefix=()):
        """verify_tree, drafting a chain beside it: (logits, leaf -> sequence). room: KV cells left after the
        root; left: tokens still wanted after the root's. The chain is useful up to the next tree's depth, in
        the draft KV cells beside the tree."""
        depth = int(tree.depth[: tree.n].max())
        chain_len = min(self.drafter.p.max_depth + 1, room - tree.n_drafted - 1, left - depth)
        if chain_len < 2:
            return verify_tree(target, batch, tree, prefix)
        done, box = threading.Event(), {}

        def chain():
            try:
                self.drafter.extend(tree, sp, self.rng, chain_len, done.is_set)
            except BaseException as e:  # re-raised in this thread
                box["err"] = e

        th = self._thread = threading.Thread(target=chain, name="edgecad-chain")
        try:
            self.pager.begin_pass()
            th.start()
            out = verify_tree(target, batch, tree, prefix)
        finally:
            done.set()
            try:
                self.pager.end_pass()  # never leave the draft gated (the decode may not have run)
            finally:
                self.join()
        if "err" in box:
            raise box["err"]
        return out

    def join(self) -> None:
        """Wait for the chain thread, if one was started: it drafts in the draft's context and passes the
        pager's gate, so it must be gone before either is freed (the engine's close joins it too, should a
        Ctrl-C have landed between its start and the join in verify)."""
        th = self._thread
        if th is not None and th.ident is not None:
            interrupted = False
            while th.is_alive():  # a Ctrl-C inside the join must not leave the thread running
                try:
                    th.join()
                except KeyboardInterrupt:
                    interrupted = True
            self._thread = None
            if interrupted:
                raise KeyboardInterrupt
        self._thread = None
