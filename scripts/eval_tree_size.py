"""Tree budget under paging: tok/s and tokens per pass for 16, 32 (default) and 64 nodes.

    python scripts/eval_tree_size.py      # from the checkout (models/), real pair, 40% budget, 4 prompts x 32
"""
import statistics
from edgecad import Engine, registry
from edgecad.prompts import load_prompts
from edgecad.tree import TreeParams
t, d = registry.resolve(registry.DEFAULT_TARGET), registry.resolve(registry.DEFAULT_DRAFT)
prompts = load_prompts()[::3][:4]
cfgs = {"32 nodes (default)": TreeParams(), "64 nodes, depth 24": TreeParams(max_nodes=64, max_depth=24),
        "16 nodes": TreeParams(max_nodes=16)}
res = {k: [] for k in cfgs}
for pr in prompts:
    for k, tp in cfgs.items():
        with Engine(t, d, mode="tree", target_budget="40%", n_threads=2, tree_params=tp) as e:
            res[k].append(e.create_completion(pr["prompt"], temperature=0.0, max_tokens=32)["edgecad"])
for k, sts in res.items():
    tps = [s["n_tokens"] / (s["seconds"] + s["prompt_seconds"]) for s in sts]
    n, p = sum(s["n_tokens"] for s in sts), sum(s["target_passes"] for s in sts)
    print(f"{k:<20} {statistics.median(tps):.2f} tok/s  {n/p:.2f} tok/pass  {sum(s['draft_tokens'] for s in sts)/p:.1f} nodes/pass")
