"""Bytes read from storage and seconds at load, with llama.cpp's whole-file read at load (EDGECAD_LOAD_GUARD=0)
and without it (the default: the pager reads what the plan keeps), model files dropped from the page cache
first; each load in a fresh process. Also the target's page-cache residency right after the load (mincore).

    python scripts/eval_load.py --target-budget 40% --storage native sd
    python scripts/eval_load.py --target qwen2.5-coder-1.5b-f16 --memory-budget 2GB --storage native sd
"""
import argparse
import json
import os
import subprocess
import sys


def one(args: dict) -> dict:
    from edgecad import Engine, registry
    from edgecad.native import file_resident
    from edgecad.plan import PagerParams
    paths = [registry.resolve(args["target"]), registry.resolve(args["draft"])]
    for p in paths:  # drop the model files from the page cache (clean pages: no root needed)
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    kw = dict(memory_budget=args["memory_budget"]) if args["memory_budget"] else dict(target_budget=args["target_budget"])
    with Engine(paths[0], paths[1], pager=PagerParams(storage=args["storage"]), n_ctx=512, **kw) as eng:
        return {"load_seconds": eng.load_seconds, "load_bytes_read": eng.load_bytes_read,
                "lazy": eng.lazy_load.applied, "config": eng.memory_plan.config,
                "target_resident_after_load": file_resident(paths[0]),
                "kept_bytes": eng.budget_plan.pinned_bytes if eng.budget_plan else None}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--target-budget", default="40%")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--storage", nargs="+", default=["native", "sd"])
    a = ap.parse_args()
    print("| storage | load | MB read at load | load s | target MB cached after load | config |")
    print("|---|---|---|---|---|---|")
    for storage in a.storage:
        for guard in ("0", "1"):
            spec = dict(target=a.target, draft=a.draft, target_budget=a.target_budget,
                        memory_budget=a.memory_budget, storage=storage)
            env = dict(os.environ, EDGECAD_LOAD_GUARD=guard)
            r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, capture_output=True,
                               text=True, check=True)
            w = json.loads(r.stdout.strip().splitlines()[-1])
            name = "lazy (edgecad)" if w["lazy"] else "whole file (llama.cpp)"
            print(f"| {storage} | {name} | {w['load_bytes_read'] / 1e6:.0f} | {w['load_seconds']:.1f} | "
                  f"{w['target_resident_after_load'] / 1e6:.0f} | {w['config']} |", flush=True)


if __name__ == "__main__":
    main()
