"""Speculative modes on the real pair, in memory: tokens per target pass and greedy fidelity.

    python scripts/eval_speculative.py [-n 128] [--modes tree linear bild] [--prompts builtin]

Every prompt is run by every mode in turn (interleaved, so noise hits all alike). Fidelity
is teacher-forced: one target pass over prompt + output, each token compared with the
target's argmax there (near-ties apart). "identical" is the share of prompts whose output
equals target mode's token for token.
"""
import argparse
import time

from edgecad import Engine, registry
from edgecad.fidelity import Fidelity, teacher_forced
from edgecad.llama import Batch
from edgecad.prompts import load_prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["tree", "linear", "bild"])
    ap.add_argument("--prompts", default="builtin")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    target, draft = registry.resolve(registry.DEFAULT_TARGET), registry.resolve(registry.DEFAULT_DRAFT)
    ref = Engine(target, n_ctx=4096, n_threads=a.threads, memory_budget=None)
    batch = Batch(4096)  # the teacher-forced passes
    engines = {m: Engine(target, draft, mode=m, n_ctx=4096, n_threads=a.threads, memory_budget=None) for m in a.modes}
    agg = {m: {"tokens": 0, "passes": 0, "nodes": 0, "seconds": 0.0, "identical": 0, "fid": Fidelity()}
           for m in ["target", *a.modes]}
    prompts = load_prompts(a.prompts)
    for pr in prompts:
        toks = ref.tokenize(pr["prompt"])
        base = None
        for m in ["target", *a.modes]:
            eng = ref if m == "target" else engines[m]
            t = time.perf_counter()
            st = eng.create_completion(pr["prompt"], temperature=0.0, max_tokens=a.n)["edgecad"]
            g = agg[m]
            g["seconds"] += time.perf_counter() - t
            g["tokens"] += st["n_tokens"]
            g["passes"] += st["target_passes"]
            g["nodes"] += st["draft_tokens"]
            base = st["token_ids"] if m == "target" else base
            g["identical"] += st["token_ids"] == base
            g["fid"] += teacher_forced(ref.target_context, batch, toks, st["token_ids"])
        print(pr["id"], {m: round(agg[m]["tokens"] / agg[m]["passes"], 2) for m in agg}, flush=True)
    print(f"\n{len(prompts)} prompts, {a.n} tokens each, in memory, {a.threads} threads")
    print(f"{'mode':<8} {'tok/pass':>8} {'nodes/pass':>10} {'tok/s':>7} {'identical':>9} {'fidelity':>9} {'near-ties':>9}")
    for m, g in agg.items():
        f = g["fid"]
        print(f"{m:<8} {g['tokens'] / g['passes']:>8.2f} {g['nodes'] / g['passes']:>10.1f} "
              f"{g['tokens'] / g['seconds']:>7.1f} {g['identical']:>5}/{len(prompts):<3} {f.fraction:>9.4f} "
              f"{f.near_ties:>9}")
    tp = {m: agg[m]["tokens"] / agg[m]["passes"] for m in agg}
    if "tree" in tp and "linear" in tp:
        print(f"tree / linear tokens per pass: {tp['tree'] / tp['linear']:.2f}x")


if __name__ == "__main__":
    main()
