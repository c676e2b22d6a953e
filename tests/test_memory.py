"""The whole-engine memory budget and the automatic configuration, on the tiny pair (real llama.cpp)."""
import json
import subprocess
import sys

import pytest

from edgecad import Engine, cgroup
from edgecad.errors import EdgecadError
from edgecad.gguf_file import read_gguf
from edgecad.measure import read_ahead_bytes
from edgecad.plan import CONFIGS, Device, plan_memory

MB = 1_000_000
CAN_CGROUP, WHY_NOT = cgroup.available()


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


def test_io_bound_passes_verify_larger_trees(budget_pair):
    """A pass that reads for long (slow storage) verifies a larger tree, wider and deeper too, as long as the budget
    holds it, and drafts beside the pass (the pipeline); on fast storage the tree keeps the mode's size and the
    pipeline is off; a fixed tree_params is the caller's."""
    from edgecad.config import resolve
    from edgecad.plan import PagerParams
    draft, target = budget_pair
    kw = dict(mode="tree", target_budget="50%", n_ctx=1024, calibrate=False)
    slow = resolve(target, draft, pager=PagerParams(throttle_bps=20e6), **kw)
    fast = resolve(target, draft, **kw)
    assert slow.plan.tree_nodes > 32 and slow.tree_params.max_nodes == slow.plan.tree_nodes
    assert slow.tree_params.max_width > fast.tree_params.max_width
    assert slow.tree_params.max_depth > fast.tree_params.max_depth
    assert fast.tree_params.max_nodes <= 32
    assert slow.plan.pipeline  # a pass that waits on storage drafts beside it; one whose compute hides its reads not:
    dists = (slow.plan.tree_nodes + 1) * read_gguf(target).vocab_size * 4  # the tree's distributions, and a chain's
    assert slow.plan.compute >= 2 * dists and sum(slow.plan.parts.values()) == slow.plan.budget
    from edgecad.tree import TreeParams
    mine = resolve(target, draft, pager=PagerParams(throttle_bps=20e6), tree_params=TreeParams(max_nodes=8), **kw)
    assert mine.tree_params.max_nodes == 8


@pytest.mark.skipif(not CAN_CGROUP, reason=f"no memory cgroup: {WHY_NOT}")
def test_auto_budget_reads_the_cgroup_limit(budget_pair, tmp_path):
    """With memory_budget='auto' the engine reads its cgroup's limit, keeps its margin under it, and holds the
    budget it chose itself (its own peak RSS, not the cgroup's: inside the cgroup the kernel would hold that), so
    the cgroup never reaches its limit (memory.events counts each time it does). The limit makes the plan page
    the target: the pager then fills its share, and its page cache is charged to the cgroup too."""
    draft, target = budget_pair
    limit = _paging_budget(target, draft) + 32 * MB  # (auto keeps max(32 MB, 2%) under the limit)
    code = ("import json, sys; from edgecad import Engine\n"
            f"e = Engine({str(target)!r}, {str(draft)!r}, memory_budget='auto', n_ctx=512)\n"
            "st = e.create_completion('Once upon a time', temperature=0.0, max_tokens=24)['edgecad']\n"
            "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print(json.dumps({'budget': st['budget_bytes'], 'config': st['config'], 'n': st['n_tokens'], "
            "'max_rss': hwm}))\n")
    with cgroup.MemoryCgroup(limit, "test") as cg:
        r = cg.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   cwd=tmp_path, timeout=300)
        killed = cgroup.killed_by_limit(r.returncode, cg)
        at_limit = cg.events.get("max", 0)
    assert not killed and r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["config"].endswith("paged"), out
    assert out["n"] == 24 and 0 < out["budget"] <= limit - 32 * MB  # (the margin: at least 32 MB)
    assert out["max_rss"] <= out["budget"], out
    assert at_limit == 0, f"the cgroup reached its limit {at_limit} times: {out}"


def _runtime() -> int:
    """What an engine measures as its runtime part: a bare process's RSS once edgecad is imported."""
    rss = subprocess.run([sys.executable, "-c", "import edgecad.engine; from edgecad.measure import process_rss; "
                          "print(process_rss())"], capture_output=True, text=True, check=True)
    return int(rss.stdout)


def _device(target, runtime: int) -> Device:
    """What an engine measures of this device, with the learnt costs at their priors."""
    return Device(runtime=runtime, readahead=read_ahead_bytes(target))


def _paging_budget(target, draft) -> int:
    """A budget halfway between the smallest that pages the target and the smallest that holds it resident."""
    t_info, d_info, runtime = read_gguf(target), read_gguf(draft), _runtime()
    config = {}
    for mb in range(60, 300):
        try:
            config[mb] = plan_memory(mb * MB, t_info, d_info, n_ctx=512, n_batch=512, tree_nodes=32,
                                     device=_device(target, runtime)).kind
        except EdgecadError:
            config[mb] = None
    paged = min(mb for mb, c in config.items() if c and c.paged)
    resident = min(mb for mb, c in config.items() if c and not c.paged)
    return (paged + resident) // 2 * MB


BUDGET_CHILD = """
import json, sys
from edgecad import Engine
target, draft, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Engine(target, draft, memory_budget=budget, n_ctx=512, verbose=True) as e:
    print("LOADED", file=sys.stderr, flush=True)  # (llama.cpp's buffers before this are the first plan's)
    sts = [e.create_completion(p, temperature=0.0, max_tokens=24)["edgecad"] for p in ("hello the world", "Once upon a time")]
    print(json.dumps({"config": sts[0]["config"], "parts": sts[0]["memory_plan"], "n": [s["n_tokens"] for s in sts],
                      "peak_target": [s["peak_resident_target_bytes"] or 0 for s in sts],
                      "target_budget": [s["target_budget_bytes"] for s in sts],  # (the second may run a doubted
                                                                                # choice's rival: plan.doubt)
                      "max_rss": [int(l.split()[1]) * 1024 for l in open("/proc/self/status")  # peak RSS of this
                                  if l.startswith("VmHWM:")][0]}))  # program (ru_maxrss counts the parent's at fork)
"""


def _llama_buffers(log: str, what: str) -> float:
    """Bytes of the buffers llama.cpp reported in its log ("CPU KV buffer size = 4.00 MiB")."""
    import re
    return sum(float(m) for m in re.findall(rf"{what} buffer size = +([\d.]+) MiB", log)) * (1 << 20)


def test_a_whole_engine_budget_that_pages_the_target_holds_inside_a_cgroup_of_its_size(budget_pair):
    """memory_budget B a little below what a resident target needs: the plan pages the target, and
    - alone (no cgroup), the process's peak RSS stays within B: edgecad holds the budget, not the kernel;
    - in a memory cgroup of exactly B (where one can be made), it runs to the end and is not killed;
    - the plan's parts match what llama.cpp and the pager report: the runtime within 10 MB of a bare process's
      RSS; the KV caches within 5%; the compute part
      covers llama.cpp's compute and output buffers, over by at most its fixed 24 MB allowance per context plus 8 MB; the
      target's peak residency within its share."""
    draft, target = budget_pair
    runtime = _runtime()
    budget = _paging_budget(target, draft)
    cmd = [sys.executable, "-c", BUDGET_CHILD, str(target), str(draft), str(budget)]
    alone = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    out = json.loads(alone.stdout.strip().splitlines()[-1])
    assert out["config"].endswith("paged") and out["n"] == [24, 24]
    assert sum(out["parts"].values()) == budget
    assert abs(out["parts"]["runtime"] - runtime) <= 10 * MB  # the process before any model, as measured here
    assert out["max_rss"] <= budget, f"peak RSS {out['max_rss'] / MB:.1f} MB over the {budget / MB:.0f} MB budget: {out}"
    assert all(0 < peak <= share + 64 * 4096 for peak, share in zip(out["peak_target"], out["target_budget"])), out
    loaded = alone.stderr.split("LOADED")[0]  # (the buffers of the plan loaded first)
    kv = _llama_buffers(loaded, "KV")
    assert kv > 0 and abs(out["parts"]["kv_caches"] - kv) <= 0.05 * kv, (out["parts"], kv)
    compute = _llama_buffers(loaded, "compute") + _llama_buffers(loaded, "output")
    contexts = 2 if out["config"].startswith("tree") else 1  # the fixed allowance is per context
    assert compute > 0 and compute <= out["parts"]["compute_buffers"] <= compute + contexts * 24 * MB + 8 * MB, (
        out["parts"], compute)
    if not CAN_CGROUP:
        pytest.skip(f"the budget held alone; no memory cgroup to run it inside one: {WHY_NOT}")
    with cgroup.MemoryCgroup(budget, "test") as cg:
        r = cg.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
        killed = cgroup.killed_by_limit(r.returncode, cg)
    assert not killed and r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == [24, 24]


EVERY_USE_CHILD = """
import json, sys
from edgecad import Engine
target, draft, budget, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
hwm = lambda: [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
with Engine(target, draft if mode != "target" else None, memory_budget=budget, n_ctx=256, mode=mode) as e:
    config, parts = e.memory_plan.config, e.memory_plan.parts
    n = sum(1 for _ in e.create_completion("hello the world", max_tokens=24, stream=True, temperature=0.8, seed=1))
    chat = [{"role": "user", "content": "hello"}]
    for turn in range(3):
        r = e.create_chat_completion(chat, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3)
        chat += [r["choices"][0]["message"], {"role": "user", "content": "the world " * (turn + 1)}]
    e.create_completion("x", grammar='root ::= [a-z ]+', max_tokens=16, temperature=0)
    full = e.create_completion("Once upon a time", max_tokens=-1, temperature=0, logprobs=2)["edgecad"]
    print(json.dumps({"config": config, "parts": parts, "max_rss": hwm(), "filled": full["n_tokens"]}))
"""


def _smallest_budget(config: str, target, draft, runtime: int) -> int:
    """The smallest budget (in MB steps) at which the plan runs `config`."""
    t, d = read_gguf(target), read_gguf(draft)
    for mb in range(40, 1000):
        try:
            if plan_memory(mb * MB, t, d, n_ctx=256, n_batch=512, tree_nodes=32, device=_device(target, runtime),
                           configs=(config,)).kind == config:
                return mb * MB
        except EdgecadError:
            pass
    raise AssertionError(f"{config} never fits under 1 GB")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_configuration_holds_its_budget_through_every_use(quantized_budget_pair, config):
    """Each configuration at a budget just inside its plan, the process alone (no cgroup: the budget is edgecad's
    to hold, not the kernel's): its peak RSS stays within the budget while it streams, samples, chats over turns
    with logprobs, follows a grammar and fills its context. The target and draft are quantized (llama.cpp repacks
    resident Q4_0 weights into memory of its own)."""
    draft, target = quantized_budget_pair
    budget = _smallest_budget(config, target, draft, _runtime()) + 3 * MB  # (the child measures its own)
    mode = "tree" if config.speculative else "target"
    r = subprocess.run([sys.executable, "-c", EVERY_USE_CHILD, str(target), str(draft), str(budget), mode],
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["config"] == config.name, out
    assert out["filled"] > 100, out  # (the context of 256 held the prompt and the rest)
    assert out["max_rss"] <= budget, (f"{config}: peak RSS {out['max_rss'] / MB:.1f} MB over its "
                                      f"{budget / MB:.0f} MB budget: {out['parts']}")
