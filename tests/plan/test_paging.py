"""The target's paging plan (edgecad.plan.paging)."""
import pytest

from edgecad.errors import EdgecadError
from edgecad.gguf_file import read_gguf
from edgecad.measure import read_ahead_bytes
from edgecad.plan import PagerParams, plan_budget

from helpers import budget_for

SMALL = dict(embd_allowance=64 << 10)  # the tiny embeddings are 68 KB


def test_plan(paging_pair):
    _, target = paging_pair
    info = read_gguf(target)
    p, ra = PagerParams(**SMALL), read_ahead_bytes(target)
    plan = plan_budget(info, budget_for(target, p, pinned_layers=3), p, readahead=ra)
    assert plan.pinned_layers == [0, 1, 2] and plan.streamed_layers == list(range(3, 16))
    assert {n for n, _, _ in plan.pinned} == {"output.weight", "output_norm.weight"}
    assert [n for n, _, _ in plan.evict_each_pass] == ["token_embd.weight"]
    assert "streamed layers 13" in plan.describe()
    with pytest.raises(EdgecadError, match=r"below the minimum of [\d.]+ MB"):
        plan_budget(info, plan.minimum - 1, p, readahead=ra)
    assert plan_budget(info, info.file_size, p, readahead=ra).resident_all


def test_the_kernel_readahead_is_reserved_where_layers_are_large_enough(paging_pair):
    """The storage's readahead (an input: measured by edgecad.measure) is kept in the window when a layer is at
    least twice as large and the layers go through the page cache; smaller layers are read exactly
    (docs/paging.md), and the owned residency's direct reads never read ahead."""
    _, target = paging_pair
    info = read_gguf(target)
    largest = max(l.n_bytes for l in info.layers())
    cache = PagerParams(memory="cache")
    exact = plan_budget(info, 10 ** 9, cache, readahead=2 * largest)
    some = plan_budget(info, 10 ** 9, cache, readahead=4096)
    assert exact.readahead_bytes == 0 and some.readahead_bytes == 4096
    assert some.window_bytes == exact.window_bytes + 4096 and some.minimum == exact.minimum + 4096
    owned = plan_budget(info, 10 ** 9, PagerParams(), readahead=4096)
    assert owned.readahead_bytes == 0 and owned.window_bytes == exact.window_bytes


def test_storage_profiles_and_bad_params():
    assert PagerParams(storage="sd").bytes_per_second == 45e6
    assert PagerParams(storage="sd", throttle_bps=1e6).bytes_per_second == 1e6
    assert PagerParams(io="demand").window_layers == PagerParams().lag + 1
    with pytest.raises(EdgecadError, match="storage profile"):
        PagerParams(storage="floppy")
    with pytest.raises(EdgecadError, match="IO mode"):
        PagerParams(io="psychic")
