"""A choice the plan doubts (edgecad.plan.doubt): the draft used or not, decided on costs never measured."""
from dataclasses import replace

from edgecad.gguf_file import read_gguf
from edgecad.plan import TARGET, TARGET_PAGED, TREE_PAGED, Costs, Device, doubts, plan_memory
from edgecad.plan.doubt import DOUBT, measured, teaches

MB = 1_000_000
TREE_MEASURED = Costs(tree_tokens=2.0, tree_nodes=4.0, history=(("tree_nodes", (4.0,)), ("tree_tokens", (2.0,))))


def _plans(pair, budget, costs, chosen, rival):
    draft, target = pair
    t, d = read_gguf(target), read_gguf(draft)
    dev = Device(runtime=60 * MB, costs=costs)
    return [plan_memory(budget, t, d, n_ctx=512, n_batch=512, tree_nodes=32, device=dev, configs=(c,))
            for c in (chosen, rival)]


def test_a_rival_within_doubt_on_costs_never_measured_is_doubted(budget_pair):
    """The paged tree measured a poor acceptance: the target alone, never measured, is predicted within DOUBT of
    it, so the choice is doubted; once the target alone measured its costs, or predicted beyond DOUBT, it is not."""
    tree, alone = _plans(budget_pair, 150 * MB, TREE_MEASURED, TREE_PAGED, TARGET_PAGED)
    assert tree.tokens_per_second > alone.tokens_per_second > tree.tokens_per_second / DOUBT
    why = doubts(tree, alone)
    assert why is not None and why.startswith("checking target-paged") and "paged_byte_s" in why
    both = replace(TREE_MEASURED, history=TREE_MEASURED.history + (("paged_byte_s", (1e-11,)),))
    assert measured(both, TARGET_PAGED) and not measured(TREE_MEASURED, TARGET_PAGED)
    assert doubts(*_plans(budget_pair, 150 * MB, both, TREE_PAGED, TARGET_PAGED)) is None
    tree, alone = _plans(budget_pair, 150 * MB, Costs(), TREE_PAGED, TARGET_PAGED)  # priors: the tree far ahead
    assert alone.tokens_per_second * DOUBT < tree.tokens_per_second and doubts(tree, alone) is None


def test_only_the_draft_s_use_is_doubted(budget_pair):
    """Resident or paged is the memory's to say, not a guess: the target resident against paged is no doubt."""
    resident, paged = _plans(budget_pair, 190 * MB, Costs(), TARGET, TARGET_PAGED)
    assert not measured(Costs(), TARGET_PAGED) and doubts(resident, paged) is None
    assert set(teaches(TREE_PAGED)) == {"tree_tokens", "tree_nodes", "draft_node_s", "batch_slope"}
