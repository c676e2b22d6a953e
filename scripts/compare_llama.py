"""Target-only greedy speed: edgecad's wrapper vs llama-cpp-python's Llama, interleaved in one run.

    python scripts/compare_llama.py [--models qwen2.5-coder-0.5b qwen2.5-coder-1.5b] [-n 64] [--repeat 3]

Both load the same GGUF with the same threads, context and weight repacking; each
prompt is run by both alternately so machine noise hits both alike. Tokens/s is
completion tokens / wall time of create_completion (prompt included), median
over prompts and repeats. Greedy token ids must be identical.
"""
import argparse
import itertools
import statistics
import time

from llama_cpp import Llama

from edgecad import Engine, registry

PROMPTS = [
    "def quicksort(xs):",
    "Explain what a hash map is in two sentences.",
    "Write a haiku about the sea.",
    "import numpy as np\n\n# compute the moving average of an array\ndef moving_average(a, n):",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=[registry.DEFAULT_DRAFT, registry.DEFAULT_TARGET])
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    for name in a.models:
        path = registry.resolve(name)
        eng = Engine(path, n_ctx=4096, n_threads=a.threads, memory_budget=None)
        ref = Llama(str(path), n_ctx=4096, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
        ours, theirs, same = [], [], 0
        for _, prompt in itertools.product(range(a.repeat), PROMPTS):
            t = time.perf_counter()
            r = eng.create_completion(prompt, temperature=0.0, max_tokens=a.n)
            ours.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t))
            ref.reset()
            t = time.perf_counter()
            toks = ref.tokenize(prompt.encode(), add_bos=False, special=True)
            ids = []
            for tok in ref.generate(toks, temp=0.0):
                ids.append(tok)
                if len(ids) == len(r["edgecad"]["token_ids"]):
                    break
            theirs.append(len(ids) / (time.perf_counter() - t))
            same += ids == r["edgecad"]["token_ids"]
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"{name}: edgecad {mo:.1f} tok/s [{min(ours):.1f}-{max(ours):.1f}], "
              f"llama-cpp-python {mt:.1f} tok/s [{min(theirs):.1f}-{max(theirs):.1f}], ratio {mo / mt:.3f}, "
              f"identical greedy ids {same}/{len(ours)}")
        eng.close()
        del ref


if __name__ == "__main__":
    main()
