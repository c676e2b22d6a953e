"""The cost model and its learning (edgecad.plan.costs)."""
import pytest

from edgecad.gguf_file import read_gguf
from edgecad.plan import TARGET, TARGET_PAGED, TREE_PAGED, Costs, observe

from test_search import _plan


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
    st = {"target_passes": 10, "n_tokens": 50, "draft_tokens": 100, "seconds_draft": 0.5,
          "target_compute_seconds": 2.0, "io_busy_seconds": 0.0, "bytes_read": 0}
    c = _observe(p, st, t_bytes, d_bytes)
    assert c.observed == 1 and c.tree_tokens == pytest.approx(5.0) and c.tree_nodes == pytest.approx(10.0)
    one = Costs().target_byte_s * t_bytes
    assert c.batch_slope == pytest.approx((0.2 / one - 1) / 10)  # no paged overhead measured yet
    assert c.target_pass(t_bytes, 11, p.paging.streamed_bytes) == pytest.approx(0.2)
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
