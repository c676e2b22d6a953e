"""A target pass's time against its batch size, with llama.cpp's weight repacking on (resident) and off (paged).

    python scripts/eval_batch_cost.py [MODEL] [--threads 2] [--sizes 1,2,5,9,17,33]

The tree's size should follow this curve (issue 21, "trees sized to the pass"): a tree of k nodes is verified
in one pass of k + 1 tokens. Weights are kept in the page cache (the model is read once first), so this is
compute alone: no storage.
"""
import argparse

from edgecad import registry
from edgecad.bench import pass_seconds
from edgecad.llama import Batch, Context, ContextParams, Model, ModelParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=registry.DEFAULT_TARGET)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1,2,5,9,17,33")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    path = registry.resolve(a.model)
    print(f"{path.name}, {a.threads} threads: median ms per pass (ms per token)")
    for repack in (True, False):
        with Model(path, ModelParams(use_mmap=True, use_extra_bufts=repack)) as m, \
                Context(m, ContextParams(n_ctx=1024, n_batch=max(sizes), n_threads=a.threads)) as ctx, \
                Batch(max(sizes)) as b:
            toks = m.tokenize("def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n")
            ctx.prefill(b, toks)
            row = []
            for k in sizes:
                ms = pass_seconds(ctx, b, k, a.repeat) * 1e3
                row.append(f"{k}: {ms:.0f} ({ms / k:.0f})")
            print(f"repacking {'on ' if repack else 'off'}  " + ", ".join(row))


if __name__ == "__main__":
    main()
