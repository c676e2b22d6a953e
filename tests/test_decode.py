"""edgecad.decode's pure parts (the decoders themselves run on real models in test_engine and test_pager)."""
import pytest

from edgecad.decode import first_pass_cut


@pytest.mark.parametrize("n_head, held, capacity, nodes, cut", [
    (10, 0, 64, 32, 0),      # all of it beside a whole tree
    (38, 0, 64, 32, 0),      # all of it beside a tree shrunk to 25 nodes, not a pass of its own
    (63, 0, 64, 32, 0),      # the root alone fills the batch: a tree of no node, still one pass
    (64, 0, 64, 32, 33),     # two passes either way: the second carries 31 beside a whole tree
    (100, 0, 64, 32, 64),    # two passes: a full batch, then 36 beside 27 nodes
    (100, 90, 64, 32, 90),   # held: only the new ten, beside a whole tree
    (100, 100, 64, 32, 100), # all held: the first pass is the tree's
    (0, 0, 64, 32, 0),       # a one-token prompt: its token is the root
    (10, 0, 16, 32, 0),      # a batch smaller than a tree: ten beside a tree of five
    (3, 0, 1, 0, 3),         # batches of one: three passes, then the root's
])
def test_a_prompt_takes_the_fewest_passes_and_the_first_tree_the_room_left(n_head, held, capacity, nodes, cut):
    got = first_pass_cut(n_head, held, capacity, nodes)
    assert got == cut
    n = n_head - held
    passes = -(-(got - held) // capacity) + 1
    assert passes == -(-(n + 1) // capacity)  # no fewer passes carry the head and the root
    assert n_head - got <= capacity - 1  # the rest fits beside the root
