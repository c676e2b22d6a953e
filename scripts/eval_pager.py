"""The pager on the real target: residency, bytes read, bandwidth, speed, exactness. One run.

    python scripts/eval_pager.py [--budget 40%] [-n 32] [--storage native]

Phases run one after another in one process (two engines on one file would keep each other's
pages mapped, so evictions could not work): a plain sequential read of the file after
eviction, then target-only greedy decoding unbudgeted, paged with `demand` IO, and paged
with `prefetch` IO. Outputs must be identical token for token.
"""
import argparse
import statistics
import time

from edgecad import Engine, registry
from edgecad.measure import read_bandwidth
from edgecad.plan import PagerParams

PROMPTS = ["def quicksort(xs):\n", "Explain how a hash map works.", "Once upon a time, a little robot",
           "-- the ten biggest customers\nSELECT"]


def run(label, n, **kw):
    path = registry.resolve(registry.DEFAULT_TARGET)
    t = time.perf_counter()
    e = Engine(path, n_ctx=2048, n_threads=2, **kw)
    load = time.perf_counter() - t
    out, tps, peak, read, wait, busy, passes = [], [], 0, 0, 0.0, 0.0, 0
    for p in PROMPTS:
        st = e.create_completion(p, temperature=0.0, max_tokens=n)["edgecad"]
        out.append(st["token_ids"])
        tps.append(st["n_tokens"] / (st["seconds"] + st["prompt_seconds"]))
        peak = max(peak, st["peak_resident_target_bytes"] or 0)
        read += st["bytes_read"]
        wait += st["io_wait_seconds"]
        busy += st["io_busy_seconds"]
        passes += st["target_passes"]
    plan = e.budget_plan
    e.close()
    return {"label": label, "load_s": load, "tps": statistics.median(tps), "tps_min": min(tps), "tps_max": max(tps),
            "peak": peak, "budget": plan.budget if plan else None, "read_per_pass": read / passes,
            "io_wait_per_pass": wait / passes, "read_bw": read / busy if busy else 0.0, "out": out, "streamed": plan.streamed_bytes if plan else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="40%")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--storage", default="native")
    a = ap.parse_args()
    path = registry.resolve(registry.DEFAULT_TARGET)
    bw = statistics.median(read_bandwidth(path) for _ in range(3))
    rows = [run("unbudgeted", a.n, memory_budget=None),
            run("demand", a.n, target_budget=a.budget, pager=PagerParams(io="demand", storage=a.storage)),
            run("prefetch", a.n, target_budget=a.budget, pager=PagerParams(io="prefetch", storage=a.storage))]
    print(f"sequential read after eviction: {bw / 1e9:.2f} GB/s; budget {a.budget}, storage {a.storage}, "
          f"{len(PROMPTS)} prompts x {a.n} tokens, target mode, 2 threads")
    base = rows[0]
    for r in rows:
        line = f"{r['label']:<11} load {r['load_s']:5.1f}s  {r['tps']:6.2f} tok/s [{r['tps_min']:.2f}-{r['tps_max']:.2f}]"
        if r["budget"]:
            line += (f"  peak {r['peak'] / 1e6:7.1f} MB = {r['peak'] / r['budget']:.3f} x budget"
                     f"  read/pass {r['read_per_pass'] / 1e6:6.1f} MB  io wait/pass {r['io_wait_per_pass'] * 1e3:6.1f} ms"
                     f"  read {r['read_bw'] / 1e9:.2f} GB/s = {r['read_bw'] / bw:.2f} x sequential")
        line += f"  identical {sum(o == b for o, b in zip(r['out'], base['out']))}/{len(PROMPTS)}"
        print(line)


if __name__ == "__main__":
    main()
