"""Token trees, the drafter (on the real tiny draft model) and the fallback threshold."""
import numpy as np
import pytest

from edgecad.errors import EdgecadError
from edgecad.llama import Batch, Context, ContextParams, Model
from edgecad.sampling import SamplingParams
from edgecad.drafter import Drafter
from edgecad.fallback import FallbackThreshold
from edgecad.tree import MODE_PARAMS, Acceptance, Fallback, TokenTree, TreeParams


# ---------------------------------------------------------------------------- threshold

def test_threshold_halves_when_the_best_branch_is_fully_accepted():
    f = FallbackThreshold(TreeParams(threshold_init=0.4, cost_aware=False))
    f.update(n_drafted=5, n_accepted=5)
    assert f.value == pytest.approx(0.2)
    f.update(3, 3)
    assert f.value == pytest.approx(0.1)
    for _ in range(10):
        f.update(4, 4)
    assert f.value == pytest.approx(0.02)  # threshold_min


def test_threshold_is_the_fraction_wrong_otherwise():
    f = FallbackThreshold(TreeParams(threshold_init=0.1, cost_aware=False))
    f.update(n_drafted=4, n_accepted=1)
    assert f.value == pytest.approx(0.75)
    f.update(10, 8)
    assert f.value == pytest.approx(0.2)
    f.update(6, 0)
    assert f.value == pytest.approx(0.9)  # threshold_max caps "all wrong"
    f.update(0, 0)  # nothing drafted: nothing learnt
    assert f.value == pytest.approx(0.9)
    assert f.summary()["updates"] == 3 and f.summary()["max"] == pytest.approx(0.9)


def test_cost_aware_threshold_follows_the_break_even():
    p = TreeParams(threshold_init=0.5)
    f = FallbackThreshold(p)
    assert f.current() == 0.5  # no measurements yet
    # steps cost 0.6 s + 2 ms per drafted node (a paged target), each yields 3 tokens
    for n in (4, 8, 16, 32, 8):
        f.observe_step(n, 0.6 + 0.002 * n, 3)
    assert f.node_seconds() == pytest.approx(0.002)
    rate = 15 / sum(0.6 + 0.002 * n for n in (4, 8, 16, 32, 8))
    assert f.current() == pytest.approx(max(p.threshold_min, 0.002 * rate))  # far below 0.5: draft deeper
    # in memory, nodes cost 30 ms each and steps yield 10 tokens (32 tok/s): break-even 0.97 > 0.5
    g = FallbackThreshold(p)
    for n in (4, 8, 16):
        g.observe_step(n, 0.03 + 0.03 * n, 10)
    assert g.current() == 0.5
    assert FallbackThreshold(TreeParams(threshold_init=0.5, cost_aware=False)).current() == 0.5


def test_cost_aware_threshold_is_calibrated_by_measured_acceptance():
    """A draft whose confidence is twice its real yield halves what a node is worth: the break-even doubles."""
    p = TreeParams(threshold_init=0.5)
    f = FallbackThreshold(p)
    for n in (4, 8, 16, 32, 8):
        f.observe_step(n, 0.6 + 0.002 * n, 3, conf_sum=4.0, accepted=2)
    assert f.calibration() == pytest.approx(0.5)
    rate = 15 / sum(0.6 + 0.002 * n for n in (4, 8, 16, 32, 8))
    assert f.current() == pytest.approx(max(p.threshold_min, 0.002 * rate / 0.5))


# ---------------------------------------------------------------------------- tree

def test_token_tree_bookkeeping():
    t = TokenTree(8, root_token=5, root_pos=10)
    a = t.add(0, 7, 0.5, 1)
    b = t.add(a, 8, 0.5, 1)
    c = t.add(0, 9, 0.2, 2)
    assert t.n_drafted == 3 and t.path(b) == [a, b] and t.path(0) == []
    assert t.pos(b) == 12 and t.conf[b] == pytest.approx(0.25)
    assert sorted(t.leaves()) == [b, c] and t.children[0] == {7: a, 9: c}


@pytest.fixture(scope="module")
def draft_ctx(tiny_draft):
    with Model(tiny_draft) as m, Context(m, ContextParams(n_ctx=512, n_seq_max=33)) as ctx:
        yield m, ctx


@pytest.mark.parametrize("greedy", [True, False])
def test_drafter_builds_a_consistent_tree(draft_ctx, greedy):
    m, ctx = draft_ctx
    p = TreeParams(max_nodes=24, max_depth=6, max_width=3, branch_p=0.05, threshold_init=0.0, cost_aware=False)
    sp = SamplingParams() if greedy else SamplingParams(temperature=1.0, top_k=20, top_p=1.0)
    d = Drafter(ctx, p, n_seq_max=33, n_batch=64)
    prompt = m.tokenize("hello the world")
    d.start(prompt)
    tree = d.draft(24, 6, sp, np.random.default_rng(0), threshold=0.0)
    assert 1 <= tree.n_drafted <= 24 and tree.depth[: tree.n].max() <= 6
    assert len(tree.leaves()) > 1  # it branched
    for i in range(1, tree.n):
        par = tree.parent[i]
        assert len(tree.children[par]) <= 3
        assert tree.conf[i] == pytest.approx(tree.conf[par] * tree.prob[i])
        assert tree.children[par][int(tree.token[i])] == i
    for node in range(tree.n):  # every draw has its child node
        assert all(x in tree.children[node] for x in tree.draws[node])
    # each branch's KV sequence holds the prefix and exactly its path up to its newest decoded node
    for br in set(tree.branch[1: tree.n].tolist()):
        nodes = [i for i in range(1, tree.n) if tree.branch[i] == br and tree.decoded[i]]
        if nodes:
            assert ctx.seq_pos_min(br) == 0 and ctx.seq_pos_max(br) == max(tree.pos(i) for i in nodes)
    # accepting nothing leaves sequence 0 = prefix + root, and no branch sequence
    d.accept(tree, [], bonus=42)
    assert d.pending == [42] and d.n_past == len(prompt)
    assert ctx.seq_pos_max(0) == len(prompt) - 1
    assert all(ctx.seq_pos_max(s) == -1 for s in range(1, 33))
    d.close()


def test_greedy_children_are_top1_and_confident_alternatives(draft_ctx):
    m, ctx = draft_ctx
    p = TreeParams(max_nodes=3, max_depth=1, max_width=3, branch_p=0.0, cost_aware=False)
    d = Drafter(ctx, p, n_seq_max=33, n_batch=64)
    prompt = m.tokenize("abc")
    d.start(prompt)
    tree = d.draft(3, 1, SamplingParams(), np.random.default_rng(0), threshold=0.0)
    probs = tree.prob[1: tree.n]
    assert tree.n_drafted == 3 and list(probs) == sorted(probs, reverse=True)
    d.close()
    with Batch(16) as b:  # an independent decode of the prompt: the children are the draft's top 3 at the root
        top3 = np.argsort(-ctx.prefill(b, prompt, logits=True))[:3]
    assert tree.token[1: tree.n].tolist() == top3.tolist()


@pytest.mark.parametrize("greedy", [True, False])
def test_alternatives_join_by_their_break_even(draft_ctx, greedy):
    """branch_p near 1 keeps a chain; a break-even confidence (IO-bound passes) lets alternatives whose branch
    confidence reaches it join. Sampling: how many draws a node gets is decided before drawing (from q and the
    node's confidence), so the same for every seed: multi-draft rejection sampling stays exact."""
    m, ctx = draft_ctx
    p = TreeParams(max_nodes=16, max_depth=1, max_width=8, branch_p=0.99, threshold_init=0.0)
    sp = SamplingParams() if greedy else SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    prompt = m.tokenize("hello the world")
    d = Drafter(ctx, p, n_seq_max=33, n_batch=64)
    widths = {}
    for floor in (None, 1e-3):
        for seed in range(3):
            d.start(prompt)
            tree = d.draft(16, 1, sp, np.random.default_rng(seed), threshold=0.0, break_even=floor)
            q = tree.q[0]
            want = 1 + int(np.sum(np.sort(q)[::-1][1:8] >= (floor if floor is not None else 0.99)))
            assert len(tree.draws[0]) == want  # (greedy: distinct tokens, one node each)
            if greedy:
                assert tree.n_drafted == want and all(tree.conf[i] >= floor for i in range(2, tree.n) if floor)
            widths.setdefault(floor, set()).add(len(tree.draws[0]))
            d.accept(tree, [], bonus=int(tree.token[0]))
    assert widths[None] == {1} and min(widths[1e-3]) > 1, widths
    d.close()


def test_mode_parameters():
    assert MODE_PARAMS["linear"].max_width == 1 and MODE_PARAMS["linear"].max_nodes == 16
    assert MODE_PARAMS["linear"].p_min == 0.75 and MODE_PARAMS["bild"].p_min == 0.6
    assert MODE_PARAMS["bild"].max_nodes == 10 and MODE_PARAMS["bild"].rollback_ce == 5.0
    assert MODE_PARAMS["tree"].acceptance is Acceptance.EXACT and MODE_PARAMS["bild"].acceptance is Acceptance.BILD
    assert MODE_PARAMS["tree"].fallback is Fallback.ADAPTIVE and MODE_PARAMS["linear"].fallback is Fallback.TOKEN


def test_tree_params_take_a_variant_by_its_name():
    """A variant's string (user code's, from before the enums) is its member; an unknown one is refused, naming
    the allowed values."""
    p = TreeParams(fallback="token", acceptance="bild")
    assert p.fallback is Fallback.TOKEN and p.acceptance is Acceptance.BILD
    assert p.fallback == "token" and f"{p.fallback} {p.acceptance}" == "token bild"  # (as doctor prints it)
    assert p == TreeParams(fallback=Fallback.TOKEN, acceptance=Acceptance.BILD)
    with pytest.raises(EdgecadError, match=r"TreeParams.fallback 'tokens': choose one of 'adaptive', 'token'"):
        TreeParams(fallback="tokens")
    with pytest.raises(EdgecadError, match=r"TreeParams.acceptance 'lossless': choose one of 'exact', 'bild'"):
        TreeParams(acceptance="lossless")
