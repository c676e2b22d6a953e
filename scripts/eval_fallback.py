"""The fallback rule: LLMCad's adaptive threshold alone vs with the cost-aware cap, on the real pair.

    python scripts/eval_fallback.py [--budget 40%] [-n 32] [--prompts 4]

Tree mode, greedy, paged and in memory; the two rules alternate per prompt. Reports tokens/s,
tokens per target pass and tree nodes per pass.
"""
import argparse
import statistics

from edgecad import Engine, registry
from edgecad.prompts import load_prompts
from edgecad.tree import TreeParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="40%")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    a = ap.parse_args()
    target, draft = registry.resolve(registry.DEFAULT_TARGET), registry.resolve(registry.DEFAULT_DRAFT)
    prompts = load_prompts()[:: max(1, 12 // a.prompts)][: a.prompts]
    for budget in (a.budget, None):
        res = {True: [], False: []}
        for pr in prompts:
            for cost_aware in (True, False):
                with Engine(target, draft, mode="tree", target_budget=budget, memory_budget=None, n_threads=2,
                            tree_params=TreeParams(cost_aware=cost_aware)) as e:
                    res[cost_aware].append(e.create_completion(pr["prompt"], temperature=0.0, max_tokens=a.n)["edgecad"])
        for cost_aware, sts in res.items():
            tps = [s["n_tokens"] / (s["seconds"] + s["prompt_seconds"]) for s in sts]
            n, passes = sum(s["n_tokens"] for s in sts), sum(s["target_passes"] for s in sts)
            print(f"budget {budget or 'none':>5}  cost_aware={cost_aware!s:<5}  {statistics.median(tps):6.2f} tok/s  "
                  f"{n / passes:5.2f} tok/pass  {sum(s['draft_tokens'] for s in sts) / passes:5.1f} nodes/pass  "
                  f"final threshold {statistics.median(s['fallback']['final'] for s in sts):.3f}")


if __name__ == "__main__":
    main()
