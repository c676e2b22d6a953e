"""What an engine learns of its device across runs (the learnt costs, edgecad.plan.costs): a busy device does not
teach it wrong. Real llama.cpp on the tiny models, starved by a real cgroup's CPU quota."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from edgecad import Engine, cgroup
from edgecad.config import replan, resolve
from edgecad.errors import EdgecadError
from edgecad.gguf_file import read_gguf
from edgecad.measure import device, load_costs, save_costs
from edgecad.plan import TARGET_PAGED, TREE_PAGED, Costs, costs_from_dict, doubts, plan_memory
from edgecad.plan.costs import STARVED
from edgecad.plan.doubt import measured

STARVED_CHILD = """
import json, os, sys
from edgecad import Engine
target, draft, procs = sys.argv[1:4]
with Engine(target, draft, mode="tree", memory_budget=None, n_ctx=512) as e:
    with open(procs, "w") as f:  # from here on, a third of a core: as beside busy processes
        f.write(str(os.getpid()))
    sts = [e.create_completion(p, temperature=0.0, max_tokens=32)["edgecad"] for p in ("Once upon a time", "hello")]
keys = ("target_passes", "prompt_passes", "target_compute_seconds", "cpu_target_seconds", "seconds_draft",
        "cpu_draft_seconds")
print(json.dumps([{k: s[k] for k in keys} for s in sts]))
"""


def _quota():
    try:
        return cgroup.CpuQuota(0.3, name="starved"), ""
    except OSError as e:
        return None, (f"cannot make a CPU cgroup ({e.strerror or e}): run as root, or where the cgroup v2 cpu "
                      "controller is delegated to you")


def test_completions_starved_of_cpu_teach_the_plan_nothing(tiny_pair, private_cost_cache):
    """An engine whose process a CPU quota throttles to a third of a core mid-run (a busy minute): its completions
    measure their computing thread on a core a fraction of their passes' and drafting's time, count as starved,
    and leave every learnt cost, and so the next engine's plan, as they were."""
    quota, why = _quota()
    if quota is None:
        pytest.skip(why)
    draft, target = tiny_pair
    fresh = resolve(target, draft, mode="tree", memory_budget=None, n_ctx=512, calibrate=False).plan
    with quota:
        r = subprocess.run([sys.executable, "-c", STARVED_CHILD, str(target), str(draft),
                            str(quota.path / "cgroup.procs")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for st in json.loads(r.stdout.strip().splitlines()[-1]):
        assert st["target_passes"] - st["prompt_passes"] >= 2, st  # (enough passes to teach)
        assert 0 < st["cpu_target_seconds"] < STARVED * st["target_compute_seconds"], st
        assert st["cpu_draft_seconds"] < STARVED * st["seconds_draft"], st
    (entry,) = json.loads((private_cost_cache / "costs.json").read_text()).values()
    costs = costs_from_dict(entry)
    assert (costs.observed, costs.starved, costs.history) == (2, 2, ())
    assert costs == Costs(observed=2, starved=2, read_bps=costs.read_bps, read_measured=costs.read_measured)
    after = resolve(target, draft, mode="tree", memory_budget=None, n_ctx=512, calibrate=False).plan
    assert (after.config, after.tokens_per_second, after.tree_nodes) == (fresh.config, fresh.tokens_per_second,
                                                                         fresh.tree_nodes)


def test_a_phase_that_waits_on_another_device_is_not_judged_by_its_cpu_time(tiny_pair, private_cost_cache):
    """The drafting on a GPU (or the target's passes on a GPU or remote devices) leaves its thread waiting, with
    little CPU time while nothing starves it: measure.learn judges only the other phase, so such completions still
    teach (with the same stats counted as starved when the draft computes on the CPU)."""
    from edgecad.measure import learn
    draft, target = tiny_pair
    cfg = resolve(target, draft, mode="tree", memory_budget=None, n_ctx=512, calibrate=False)
    st = {"mode": "tree", "target_passes": 10, "prompt_passes": 1, "n_tokens": 40, "draft_tokens": 80,
          "seconds_draft": 0.5, "cpu_draft_seconds": 0.01,  # (a GPU computed: the thread waited)
          "target_compute_seconds": 1.0, "cpu_target_seconds": 1.0, "io_busy_seconds": 0.0, "bytes_read": 0}
    on_cpu = learn(Costs(), st, cfg.plan, cfg.local_info, cfg.draft_info, 2)
    on_gpu = learn(Costs(), st, cfg.plan, cfg.local_info, cfg.draft_info, 2, gpu=(False, True))
    assert (on_cpu.starved, on_cpu.history) == (1, ())
    assert on_gpu.starved == 0 and on_gpu.history


def test_a_doubted_choice_is_checked_by_running_its_rival_once(budget_pair, private_cost_cache):
    """This device measured the paged tree's costs (a poor acceptance) but never the target alone, predicted within
    DOUBT of it: the engine's second completion runs the target alone, which measures its costs, the third runs
    whichever the costs then predict faster, and no later completion checks again. Every token is the target's."""
    draft, target = budget_pair
    t, d, n = read_gguf(target), read_gguf(draft), 2
    with Engine(target, mode="target", memory_budget=None, n_ctx=512, n_threads=n) as ref:
        want = ref.create_completion("Once upon a time", max_tokens=24, temperature=0)["edgecad"]["token_ids"]
    seen = {"tree_tokens": 2.5, "tree_nodes": 4.0, "batch_slope": 0.45, "draft_node_s": 0.035}  # (3 observations
    save_costs(Costs(**seen, history=tuple((k, (v,) * 3) for k, v in sorted(seen.items())),  # each: one more
                     read_bps=1e9, read_measured=True), t, d, n)  # barely moves their median; the storage as if
    dev = device(t, d, n, may_page=True)  # measured, so the plan is the same on any disk; measured here as the
    doubted = []                          # engine below measures it, in this process
    base = dev.runtime // 1_000_000
    for mb in range(base + 60, base + 180, 2):
        try:
            tree, alone = (plan_memory(mb * 1_000_000, t, d, n_ctx=512, n_batch=512, tree_nodes=32, device=dev,
                                       configs=(c,)) for c in (TREE_PAGED, TARGET_PAGED))
        except EdgecadError:  # (too small for one, or the target fits: not paged)
            continue
        if tree.tokens_per_second > alone.tokens_per_second and doubts(tree, alone):
            doubted.append(mb * 1_000_000)
    assert len(doubted) >= 5, "no range of budgets where the measured tree doubts the target alone"
    budget = doubted[len(doubted) // 2]
    runs = []
    with Engine(target, draft, memory_budget=budget, n_ctx=512, n_threads=n) as e:
        assert e.memory_plan.config == "tree-paged"
        for i in range(4):
            if i == 2:  # what the costs measured so far predict fastest at this budget
                costs = load_costs(t, d, n)
                assert measured(costs, TARGET_PAGED) or costs.starved, costs  # (a starved completion teaches nothing)
                best = replan(replace(e.config, device=replace(e.config.device, costs=costs)), budget).plan.config
            moved = len(e.moves)
            st = e.create_completion("Once upon a time", max_tokens=24, temperature=0)["edgecad"]
            runs.append((st["config"], len(e.moves)))
            assert st["token_ids"] == want, (i, st["config"])
            assert st["moves_before"] == e.moves[moved:] and not st["moves"]  # (between completions: it teaches)
        assert runs[:2] == [("tree-paged", 0), ("target-paged", 1)]
        assert e.moves[0]["why"].startswith("checking target-paged") and e.moves[0]["to"].startswith("target-paged")
        assert runs[2][0] == best and runs[3] == runs[2]  # (kept, or moved back once: never checked again)
