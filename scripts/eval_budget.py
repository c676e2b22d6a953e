"""What the process really holds against its plan, one configuration per run (the process alone, no cgroup).

    python scripts/eval_budget.py qwen2.5-coder-1.5b qwen2.5-coder-0.5b --memory-budget 1.5GB [--mode tree]

Loads the engine inside the budget, runs one greedy completion and prints, as JSON, the configuration, the
plan's split (MB) and the process's VmHWM / VmRSS / RssAnon / RssFile (MB) before the load, after it and after
the completion. The peak (VmHWM) must stay within the budget: edgecad holds it, not the kernel.
"""
import argparse
import json

import edgecad


def status() -> dict:
    """This process's memory from /proc/self/status, in MB."""
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) * 1024 // 10 ** 6
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("draft", nargs="?", default=None)
    ap.add_argument("--memory-budget", required=True)
    ap.add_argument("--mode", default=None)
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    before = status()
    with edgecad.Engine(a.target, a.draft, memory_budget=a.memory_budget, mode=a.mode, n_threads=a.threads) as e:
        loaded, p = status(), e.memory_plan
        out = e.create_completion("def quicksort(xs):", max_tokens=a.n, temperature=0)
        print(json.dumps({"config": p.config, "budget_MB": p.budget // 10 ** 6,
                          "parts_MB": {k: v // 10 ** 6 for k, v in p.parts.items()}, "before": before,
                          "loaded": loaded, "after": status(),
                          "within_budget": status()["VmHWM"] <= p.budget // 10 ** 6,
                          "tokens_per_second": round(out["edgecad"]["tokens_per_second"], 2)}))


if __name__ == "__main__":
    main()
