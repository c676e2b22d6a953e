"""Greedy token ids of every mode on the real pair, resident and paged, and the comparison of two such runs.

    python scripts/compare_tokens.py --out before.json      # 12 built-in prompts x 32 tokens, each mode, twice
    python scripts/compare_tokens.py --out after.json
    python scripts/compare_tokens.py --compare before.json after.json

A run records, for each mode (target, tree, linear, bild) resident (memory_budget=None) and paged
(target_budget 40%), each prompt's greedy token ids. The comparison counts identical outputs; where two part,
it says whether the target's top-2 logits there are a near-tie (within NEAR_TIE_EPS: batched and one-token
numerics may order them differently, README "What is guaranteed") or a clear difference (a change in behaviour).
"""
import argparse
import json
import sys

from edgecad import Engine, registry
from edgecad.fidelity import NEAR_TIE_EPS, top2_gap
from edgecad.llama import Batch
from edgecad.prompts import load_prompts

MODES = ("target", "tree", "linear", "bild")
RESIDENCY = {"resident": dict(memory_budget=None), "paged-40%": dict(target_budget="40%")}


def run(n: int, threads: int) -> dict:
    target, draft = registry.resolve(registry.DEFAULT_TARGET), registry.resolve(registry.DEFAULT_DRAFT)
    prompts = load_prompts()
    out = {}
    for res, kw in RESIDENCY.items():
        for mode in MODES:
            with Engine(target, draft if mode != "target" else None, mode=mode, n_ctx=2048, n_threads=threads,
                        **kw) as e:
                rows = [e.create_completion(p["prompt"], max_tokens=n, temperature=0.0)["edgecad"] for p in prompts]
            out[f"{mode}/{res}"] = {p["id"]: r["token_ids"] for p, r in zip(prompts, rows)}
            print(f"{mode}/{res}: {sum(r['n_tokens'] for r in rows)} tokens, config {rows[0]['config']}",
                  file=sys.stderr)
    return out


def compare(a: dict, b: dict, threads: int) -> int:
    target = registry.resolve(registry.DEFAULT_TARGET)
    prompts = {p["id"]: p["prompt"] for p in load_prompts()}
    clear = 0
    with Engine(target, mode="target", n_ctx=2048, n_threads=threads, memory_budget=None) as judge, \
            Batch(2048) as batch:
        for key in a:
            same, ties, diffs = 0, 0, []
            for pid, ids in a[key].items():
                other = b[key][pid]
                if ids == other:
                    same += 1
                    continue
                k = next((i for i, (x, y) in enumerate(zip(ids, other)) if x != y), min(len(ids), len(other)))
                toks = judge.tokenize(prompts[pid], special=True) + ids[:k]
                gap = top2_gap(judge.target_context.prefill(batch, toks, logits=True))
                if gap < NEAR_TIE_EPS:
                    ties += 1
                else:
                    diffs.append(f"{pid} at token {k} (top-2 gap {gap:.2f})")
            clear += len(diffs)
            print(f"{key:18} {same}/{len(a[key])} identical, {ties} part at a near-tie, {len(diffs)} clearly"
                  + (": " + "; ".join(diffs) if diffs else ""))
    return 1 if clear else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="run every mode and write the token ids here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two runs")
    ap.add_argument("-n", type=int, default=32, help="tokens per prompt (default 32)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.compare:
        before, after = (json.load(open(f)) for f in a.compare)
        return compare(before, after, a.threads)
    if not a.out:
        ap.error("give --out FILE or --compare BEFORE AFTER")
    with open(a.out, "w") as f:
        json.dump(run(a.n, a.threads), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
