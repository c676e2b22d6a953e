"""The search for the fastest configuration inside a budget (edgecad.plan.search): pure, one frozen plan per call."""
import builtins
import dataclasses
import os

import pytest

from edgecad import Engine
from edgecad.errors import EdgecadError
from edgecad.gguf_file import read_gguf
from edgecad.plan import (CONFIGS, TARGET_PAGED, TREE_PAGED, Costs, Device, MemoryPlan, RemoteDevice, plan_memory,
                          plan_remote)
from edgecad.plan.sizes import activation_bytes

MB = 1_000_000


def _plan(target, draft, budget, **kw):
    return plan_memory(budget, read_gguf(target), read_gguf(draft) if draft else None, n_ctx=512, n_batch=512,
                       tree_nodes=32, device=Device(runtime=50 * MB), **kw)


def test_parts_add_up_and_the_fastest_fitting_config_wins(paging_pair):
    draft, target = paging_pair
    for budget in (200 * MB, 400 * MB, 10 ** 10):
        p = _plan(target, draft, budget)
        assert sum(p.parts.values()) == p.budget == budget and p.parts["spare"] >= 0
        assert p.config in {c.name for c in CONFIGS} and p.reason
        fits = {c: v for c, v in p.alternatives.items() if not isinstance(v, str)}
        assert p.config in fits and p.tokens_per_second == pytest.approx(max(fits.values()), rel=1e-3)
    # With room for everything, a target as cheap as the draft runs alone and resident.
    assert _plan(target, draft, 10 ** 10).config == "target"


def test_a_tree_that_does_not_fit_shrinks_before_giving_up(budget_pair):
    """Below the default tree's budget, the paged tree still runs: a smaller read-ahead, smaller prompt batches,
    a smaller tree, demand reads, in that order; what a smaller budget is told it needs is the fully shrunk one."""
    draft, target = budget_pair
    plans = {}
    for mb in range(60, 300, 2):
        try:
            plans[mb] = _plan(target, draft, mb * MB, configs=(TREE_PAGED,))
        except EdgecadError as e:
            if "needs" in str(e):
                smallest_error = str(e)
            else:  # large enough to hold the target: not paged, said in one line
                assert "the target fits: not paged" in str(e) and mb > min(plans), e
    first = min(plans)
    default = next(p for mb, p in sorted(plans.items()) if (p.tree_nodes, p.paging.params.depth) == (32, 2))
    small = plans[first]
    assert first * MB < default.budget
    assert (small.n_batch, small.tree_nodes, small.paging.params.depth) < (512, 32, 2)
    assert small.paging.params.depth <= 1 and small.tree_nodes <= 32 and small.n_batch <= 512
    assert sum(small.parts.values()) == small.budget and small.parts["spare"] >= 0
    need = int(smallest_error.split("needs ")[1].split(" MB")[0].replace(",", ""))
    assert first - 2 < need <= first, smallest_error


def test_prompt_batches_shrink_while_their_passes_hide_the_reads(budget_pair):
    """A paged plan halves its prompt batches (to 64) while a pass of that many tokens computes longer than it
    reads: the activations freed pin more of the target, so every decoding pass streams less, and a prompt's
    passes stay compute-bound. Where a pass would wait on its reads (an SD card), they stay at 512."""
    draft, target = budget_pair
    t, d = read_gguf(target), read_gguf(draft)
    plan = lambda costs: plan_memory(150 * MB, t, d, n_ctx=512, n_batch=512, tree_nodes=32,  # noqa: E731
                                     device=Device(runtime=50 * MB, costs=costs), configs=(TARGET_PAGED,))
    slow, fast = plan(Costs(read_bps=5e6)), plan(Costs())
    assert (slow.n_batch, fast.n_batch) == (512, 64)
    assert fast.target > slow.target and fast.paging.streamed_bytes < slow.paging.streamed_bytes
    assert fast.costs.target_pass(t.pass_bytes, 64, fast.paging.streamed_bytes) >= fast.paging.streamed_bytes / 1.2e9
    assert sum(fast.parts.values()) == fast.budget and fast.parts["spare"] >= 0


def test_a_busy_device_does_not_pipeline(budget_pair):
    """A pass whose compute hides its reads leaves no idle time to draft in: no pipeline."""
    draft, target = budget_pair
    t_info = read_gguf(target)
    busy = plan_memory(10 ** 10, t_info, read_gguf(draft), n_ctx=512, n_batch=512, tree_nodes=32,
                       device=Device(runtime=50 * MB, costs=Costs(target_byte_s=1e-8)), configs=(TREE_PAGED,),
                       target_budget=t_info.file_size // 2)
    assert busy.paged and not busy.pipeline


def test_planning_is_pure(paging_pair, monkeypatch):
    """The same inputs give the same frozen plan, and planning opens no file, reads no clock and asks no process
    or library anything (everything it needs of the device came in the Device)."""
    draft, target = paging_pair
    t, d = read_gguf(target), read_gguf(draft)
    first = plan_memory(300 * MB, t, d, n_ctx=512, n_batch=512, tree_nodes=32, device=Device(runtime=50 * MB))

    def no_io(*a, **kw):
        raise AssertionError("the plan did IO")

    for mod, name in ((builtins, "open"), (os, "stat"), (os, "open"), (os, "read")):
        monkeypatch.setattr(mod, name, no_io)
    again = plan_memory(300 * MB, t, d, n_ctx=512, n_batch=512, tree_nodes=32, device=Device(runtime=50 * MB))
    monkeypatch.undo()
    assert again == first and isinstance(again, MemoryPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.budget = 1


def _devices(*free):
    return [RemoteDevice(f"192.0.2.{i}:50052", f"RPC{i}", 0, f, f) for i, f in enumerate(free)]


def test_remote_devices_are_an_input_of_one_search(paging_pair):
    """The remote split is made from what the devices announce (values: no network here) and given to the search,
    which uses it only where the target is not held whole on this device, the plan then being this device's part."""
    draft, target = paging_pair
    t = read_gguf(target)
    reserve = activation_bytes(t, 512, 512) + 24 * MB  # each device's compute buffer
    split = plan_remote(t, _devices(reserve + t.file_size // 2), n_ctx=512, n_batch=512)
    assert split is not None and 0 < split.first < t.n_layer and split.local.n_layer == split.first
    roomy = _plan(target, None, 10 ** 10, remote=split)
    assert roomy.remote is None and roomy.target_info is not None and roomy.target_info.n_layer == t.n_layer
    whole = next(mb for mb in range(50, 500) if _fits(target, mb * MB) and not _plan(target, None, mb * MB).paged)
    tight = _plan(target, None, (whole - 1) * MB, remote=split)  # not held whole here: the devices take their part
    assert tight.remote is split and tight.target_info.n_layer == split.first
    assert not tight.paged and tight.target < t.file_size  # this device's part, held whole
    assert plan_remote(t, _devices(1000), n_ctx=512, n_batch=512) is None  # no device holds a layer


def _fits(target, budget) -> bool:
    try:
        return _plan(target, None, budget) is not None
    except EdgecadError:
        return False


def test_an_engine_plans_once(paging_pair, monkeypatch):
    """Measuring comes first, in one place; then one call of the planner."""
    import edgecad.config as config
    calls = []
    real = config.plan_memory
    monkeypatch.setattr(config, "plan_memory", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    draft, target = paging_pair
    with Engine(target, draft, memory_budget="300MB", n_ctx=512):
        pass
    assert len(calls) == 1
