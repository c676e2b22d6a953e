"""The cost model and its learning (edgecad.plan.costs)."""
import json
from dataclasses import asdict, replace

import pytest

from edgecad.gguf_file import read_gguf
from edgecad.plan import (CONFIGS, TARGET, TARGET_PAGED, TREE_PAGED, Costs, Device, costs_from_dict, observe,
                          plan_memory)
from edgecad.plan.costs import BOUNDS, HISTORY, STARVED, STEP

from test_search import _plan

MB = 1_000_000


def _observe(plan, stats, t_bytes, d_bytes):
    streamed = plan.paging.streamed_bytes if plan.paging is not None else 0
    return observe(Costs(), stats, speculative=plan.speculative, streamed=streamed, target_bytes=t_bytes,
                   draft_bytes=d_bytes)


def test_observe_learns_each_cost_from_the_pass_that_shows_it(budget_pair):
    """A tree's passes calibrate the acceptance and the batch slope; 1-token passes the compute speed (resident)
    or the paged overhead per streamed byte (paged)."""
    draft, target = budget_pair
    t_bytes, d_bytes = read_gguf(target).file_size, read_gguf(draft).file_size
    p = _plan(target, draft, 10 ** 10, configs=(TREE_PAGED,), target_budget=t_bytes // 2)
    assert p.paged and p.config == "tree-paged"
    one = Costs().target_byte_s * t_bytes  # a resident 1-token pass
    st = {"target_passes": 10, "n_tokens": 50, "draft_tokens": 100, "seconds_draft": 0.05 * 100 * d_bytes / 1e9,
          "target_compute_seconds": 10 * one * (1 + 0.3 * 10), "io_busy_seconds": 0.0, "bytes_read": 0}
    c = _observe(p, st, t_bytes, d_bytes)
    assert c.observed == 1 and c.tree_tokens == pytest.approx(5.0) and c.tree_nodes == pytest.approx(10.0)
    assert c.draft_node_s == pytest.approx(0.05)
    assert c.batch_slope == pytest.approx(0.3)  # no paged overhead measured yet
    assert c.target_pass(t_bytes, 11, p.paging.streamed_bytes) == pytest.approx(one * (1 + 0.3 * 10))
    assert (c.target_byte_s, c.paged_byte_s) == (Costs().target_byte_s, Costs().paged_byte_s)

    tp = _plan(target, None, 10 ** 10, configs=(TARGET_PAGED,), target_budget=t_bytes // 2)
    one_token = {"mode": "target", "target_passes": 11, "prompt_passes": 1, "n_tokens": 11,
                 "target_compute_seconds": 10 * 2 * one}
    c = _observe(tp, one_token, t_bytes, d_bytes)  # twice a resident pass: the rest is the paged overhead
    assert c.paged_byte_s == pytest.approx(one / tp.paging.streamed_bytes) and c.batch_slope == Costs().batch_slope
    r = _observe(_plan(target, None, 10 ** 10, configs=(TARGET,)), one_token, t_bytes, d_bytes)
    assert r.target_byte_s == pytest.approx(2 * Costs().target_byte_s) and r.paged_byte_s == Costs().paged_byte_s


def test_costs_are_values():
    """A completion's correction is a new Costs: the plan that was made from the old ones keeps them."""
    old = Costs()
    stats = {"mode": "target", "target_passes": 5, "prompt_passes": 1, "n_tokens": 4, "target_compute_seconds": 1.0}
    new = observe(old, stats, speculative=False, streamed=0, target_bytes=10 ** 9, draft_bytes=0)
    assert new is not old and new.observed == 1 and old == Costs()
    with pytest.raises(AttributeError):
        old.read_bps = 1.0


# A busy minute. Measured: after a few completions beside other processes the cache held a drafting cost 20x the
# pair's and a batch slope of 1.07, and every later engine planned the F16 target without its tree.

def test_a_prompt_s_pass_with_a_shrunk_tree_teaches_nothing_of_the_tree(budget_pair):
    """The prompt's pass drafts a tree shrunk to the room its prompt tokens leave (decode.first_pass_cut): the tree's
    acceptance, size, drafting cost and batch slope are the timed passes' own, however small that first tree was."""
    draft, target = budget_pair
    t_bytes, d_bytes = read_gguf(target).file_size, read_gguf(draft).file_size
    p = _plan(target, draft, 10 ** 10, configs=(TREE_PAGED,), target_budget=t_bytes // 2)
    one = Costs().target_byte_s * t_bytes
    learnt = []
    for first_nodes, first_tokens in ((10, 5), (1, 2), (0, 1)):  # a whole first tree, a shrunk one, none
        st = {"mode": "tree", "target_passes": 21, "prompt_passes": 1, "n_tokens": 100 + first_tokens,
              "draft_tokens": 200 + first_nodes, "prompt_draft_tokens": first_nodes,
              "prompt_pass_tokens": first_tokens, "seconds_draft": 0.05 * 200 * d_bytes / 1e9,
              "target_compute_seconds": 20 * one * (1 + 0.3 * 10), "io_busy_seconds": 0.0, "bytes_read": 0}
        c = _observe(p, st, t_bytes, d_bytes)
        learnt.append((c.tree_tokens, c.tree_nodes, c.draft_node_s, c.batch_slope))
    assert learnt[0] == pytest.approx((5.0, 10.0, 0.05, 0.3))
    assert learnt[1] == learnt[2] == learnt[0]


def _tree_stats(t_bytes, d_bytes, *, slope=0.3, node_s=0.05, cpu_share=1.0, draft_share=1.0, slower=1.0):
    """A tree completion's stats (20 timed passes of 10 nodes, 5 tokens each): its target passes compute with
    `slope` at the prior's 1-token pass, its drafting takes `node_s` per node per GB, both `slower` times longer
    (a busy device), while their computing thread was on a core `cpu_share` / `draft_share` of the time."""
    one = Costs().target_byte_s * t_bytes
    compute, draft = slower * 20 * one * (1 + slope * 10), slower * node_s * 200 * d_bytes / 1e9
    return {"mode": "tree", "target_passes": 21, "prompt_passes": 1, "n_tokens": 105, "draft_tokens": 210,
            "prompt_draft_tokens": 10, "prompt_pass_tokens": 5,
            "seconds_draft": draft, "target_compute_seconds": compute, "cpu_target_seconds": cpu_share * compute,
            "cpu_draft_seconds": draft_share * draft, "io_busy_seconds": 0.0, "bytes_read": 0}


def _tree_plan(target, draft, costs):
    return plan_memory(10 ** 10, read_gguf(target), read_gguf(draft), n_ctx=512, n_batch=512, tree_nodes=32,
                       device=Device(runtime=50 * MB, costs=costs), configs=CONFIGS)


def test_costs_taught_by_starved_passes_do_not_change_the_plan(budget_pair):
    """Completions whose passes or drafting ran on a core less than STARVED of their time (other processes had the
    cores) count, but teach nothing: the costs and the plan stay what they were. The same measurements from a
    completion that had its cores would have changed both."""
    draft, target = budget_pair
    t_bytes, d_bytes = read_gguf(target).file_size, read_gguf(draft).file_size
    learnt = Costs()
    for _ in range(3):  # a calm start: the tree's own costs, learnt
        learnt = observe(learnt, _tree_stats(t_bytes, d_bytes), speculative=True, streamed=0, target_bytes=t_bytes,
                         draft_bytes=d_bytes)
    before = _tree_plan(target, draft, learnt)
    busy = dict(slower=20.0, slope=1.07)
    shares = [dict(cpu_share=0.3), dict(draft_share=0.5), dict(cpu_share=0.7, draft_share=0.2),
              dict(cpu_share=STARVED - 0.01)]
    costs = learnt
    for share in shares:
        costs = observe(costs, _tree_stats(t_bytes, d_bytes, **busy, **share), speculative=True, streamed=0,
                        target_bytes=t_bytes, draft_bytes=d_bytes)
    assert (costs.observed, costs.starved) == (learnt.observed + len(shares), len(shares))
    assert replace(costs, observed=learnt.observed, starved=0) == learnt
    after = _tree_plan(target, draft, costs)
    assert (after.config, after.tokens_per_second, after.tree_nodes) == (before.config, before.tokens_per_second,
                                                                         before.tree_nodes)
    # had the same minute had its cores, it would have taught the plan (within its bounds)
    taught = learnt
    for _ in shares:
        taught = observe(taught, _tree_stats(t_bytes, d_bytes, **busy), speculative=True, streamed=0,
                         target_bytes=t_bytes, draft_bytes=d_bytes)
    assert taught.starved == 0 and taught.draft_node_s > learnt.draft_node_s and taught.batch_slope > learnt.batch_slope
    assert before.config == "tree" and _tree_plan(target, draft, taught).config == "target"  # (the tree dropped)


def test_a_few_wild_outliers_move_a_cost_only_within_its_bound():
    """Each learnt cost follows the median of its last HISTORY observations, moving by at most STEP per completion
    and never outside its BOUNDS: a few wild observations (not starved: a throttled core, a page-fault storm)
    cannot carry it off."""
    def seen(costs, byte_s):  # a resident target-only completion: 10 timed 1-token passes of 1 GB
        return observe(costs, {"mode": "target", "target_passes": 11, "prompt_passes": 1, "n_tokens": 11,
                               "target_compute_seconds": 10 * byte_s * 1e9}, speculative=False, streamed=0,
                       target_bytes=10 ** 9, draft_bytes=0)
    prior = Costs().target_byte_s
    first = seen(Costs(), 100 * prior)
    assert first.target_byte_s == pytest.approx(STEP * prior)  # one wild first observation: one STEP
    c = Costs()
    for _ in range(5):
        c = seen(c, 2 * prior)
    assert c.target_byte_s == pytest.approx(2 * prior)
    for _ in range(HISTORY // 2):  # fewer than half of what it keeps: the median stays with the others
        c = seen(c, 100 * prior)
        assert c.target_byte_s == pytest.approx(2 * prior)
    assert len(c.samples("target_byte_s")) == HISTORY
    for _ in range(20):  # a device that stays that slow is learnt, within the cost's plausible range
        c = seen(c, 1e6 * prior)
    assert c.target_byte_s == BOUNDS["target_byte_s"][1] and max(c.samples("target_byte_s")) <= c.target_byte_s


def test_cached_costs_are_checked():
    """What the cache holds is checked as anything from outside: wrong types and values that are not finite are
    the priors, costs outside their bounds are clamped into them, observations of unknown costs dropped; an entry
    from before the learning was robust (no history) is the priors but for its measured read speed."""
    good = observe(Costs(read_bps=2e9, read_measured=True), {"mode": "target", "target_passes": 5, "prompt_passes": 1,
                   "n_tokens": 5, "target_compute_seconds": 4 * 1e-10 * 1e9}, speculative=False, streamed=0,
                   target_bytes=10 ** 9, draft_bytes=0)
    assert costs_from_dict(json.loads(json.dumps(asdict(good)))) == good
    bad = costs_from_dict({"read_bps": "fast", "target_byte_s": float("nan"), "batch_slope": 1e9, "tree_nodes": -3,
                           "observed": True, "starved": 2.5, "read_measured": 1, "evil": 1, "draft_node_s": 10 ** 400,
                           "history": [["batch_slope", [0.3, "x", 1e9, None, 10 ** 400]], ["evil", [1.0]], "junk",
                                       None, [["list"], [1.0]], ["tree_nodes", 3]]})
    prior = Costs()
    assert (bad.read_bps, bad.target_byte_s, bad.draft_node_s, bad.observed, bad.read_measured) == (
        prior.read_bps, prior.target_byte_s, prior.draft_node_s, 0, False)
    assert bad.batch_slope == BOUNDS["batch_slope"][1] and bad.tree_nodes == BOUNDS["tree_nodes"][0]
    assert bad.starved == 2 and bad.history == (("batch_slope", (0.3, BOUNDS["batch_slope"][1])),)
    for junk in (None, [], "costs", 3, {"history": 5}, {"history": {"batch_slope": [1]}}):
        assert costs_from_dict(junk) == prior
    polluted = {"read_bps": 2.19e9, "target_byte_s": 1.06e-10, "batch_slope": 4.57, "draft_node_s": 2.75,
                "observed": 28, "read_measured": True}  # this machine's cache for the real pair, before
    assert costs_from_dict(polluted) == Costs(read_bps=2.19e9, read_measured=True)
