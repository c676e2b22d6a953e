"""The whole-engine memory budget and the automatic configuration, on the tiny pair (real llama.cpp)."""
import json
import subprocess
import sys

import pytest

from edgecad import Engine, cgroup
from edgecad.errors import EdgecadError
from edgecad.gguf_file import read_gguf
from edgecad.memory import CONFIGS, Costs, kv_bytes, observe, parse_memory, plan_memory

MB = 1_000_000
CAN_CGROUP, WHY_NOT = cgroup.available()


def test_parse_memory():
    assert parse_memory(123, 0) == 123
    assert parse_memory("1.5GB", 0) == 1_500_000_000 and parse_memory("900MiB", 0) == 900 << 20
    assert parse_memory("50%", 3000) == 1500
    assert 0 < parse_memory("auto", 0)
    for bad in ("lots", "-5%", "0", "0%", "nan%", "12 parsecs"):
        with pytest.raises(EdgecadError, match="budget"):
            parse_memory(bad, 1000)


def test_kv_bytes_follow_the_context(tiny_target):
    info = read_gguf(tiny_target)
    assert kv_bytes(info, 512) == 2 * kv_bytes(info, 256) > 0
    assert kv_bytes(info, 300) == kv_bytes(info, 512)  # llama.cpp pads the cells to 256


def _plan(target, draft, budget, **kw):
    return plan_memory(budget, read_gguf(target), read_gguf(draft) if draft else None, n_ctx=512, n_batch=512,
                       tree_nodes=32, costs=Costs(), runtime=50 * MB, **kw)


def test_parts_add_up_and_the_fastest_fitting_config_wins(paging_pair):
    draft, target = paging_pair
    for budget in (200 * MB, 400 * MB, 10 ** 10):
        p = _plan(target, draft, budget)
        assert sum(p.parts.values()) == p.budget == budget and p.parts["spare"] >= 0
        assert p.config in CONFIGS and p.reason
        fits = {c: v for c, v in p.alternatives.items() if not isinstance(v, str)}
        assert p.config in fits and p.tokens_per_second == pytest.approx(max(fits.values()), rel=1e-3)
    # With room for everything, a target as cheap as the draft runs alone and resident.
    assert _plan(target, draft, 10 ** 10).config == "target"


def test_budget_too_small_names_the_smallest(paging_pair):
    draft, target = paging_pair
    with pytest.raises(EdgecadError, match=r"memory budget 10 MB cannot run .* the smallest configuration needs "
                                           r"[\d,]+ MB; give a larger memory_budget or a smaller n_ctx"):
        Engine(target, draft, memory_budget="10MB", n_ctx=512)


def test_engine_reports_its_configuration(paging_pair, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGECAD_CACHE", str(tmp_path))
    draft, target = paging_pair
    with Engine(target, draft, memory_budget="2GB", n_ctx=512) as e:
        st = e.create_completion("abc", temperature=0.0, max_tokens=8)["edgecad"]
    assert st["config"] == e.memory_plan.config and st["config_reason"]
    assert st["budget_bytes"] == 2 * 10 ** 9 and sum(st["memory_plan"].values()) == st["budget_bytes"]
    cached = json.loads((tmp_path / "costs.json").read_text())
    assert len(cached) == 1  # the completion's costs were written for the next engine


def test_observe_learns_from_a_paged_tree(paging_pair):
    draft, target = paging_pair
    p = _plan(target, draft, 10 ** 10, configs=("tree",))
    st = {"target_passes": 10, "n_tokens": 50, "draft_tokens": 100, "seconds_draft": 0.5,
          "target_compute_seconds": 1.0, "io_busy_seconds": 0.0, "bytes_read": 0}
    c = observe(Costs(), p, st, read_gguf(target).file_size, read_gguf(draft).file_size)
    assert c.observed == 1 and c.tree_tokens == pytest.approx(5.0) and c.tree_nodes == pytest.approx(10.0)


@pytest.mark.skipif(not CAN_CGROUP, reason=f"no memory cgroup: {WHY_NOT}")
def test_generation_inside_a_cgroup_of_the_plans_size(paging_pair, tmp_path):
    """The engine, alone in a cgroup exactly as large as its budget, runs to the end and is not killed;
    with memory_budget='auto' it reads the cgroup's limit."""
    draft, target = paging_pair
    budget = 400 * MB
    code = ("import json, sys; from edgecad import Engine\n"
            f"e = Engine({str(target)!r}, {str(draft)!r}, memory_budget='auto', n_ctx=512)\n"
            "st = e.create_completion('Once upon a time', temperature=0.0, max_tokens=24)['edgecad']\n"
            "print(json.dumps({'budget': st['budget_bytes'], 'config': st['config'], 'n': st['n_tokens']}))\n")
    with cgroup.MemoryCgroup(budget, "test") as cg:
        r = cg.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   cwd=tmp_path, timeout=300)
        killed = cgroup.killed_by_limit(r.returncode, cg)
        peak = cg.peak
    assert not killed and r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 24 and 0 < out["budget"] <= budget and 0 < peak <= budget
