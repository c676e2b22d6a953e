"""A model's decoding speed on each device of this llama.cpp build (the CPU, and its GPU when it has one):
the draft alone, as a resident target-only engine, greedy; and the same tokens on both.

    GGML_VK_VISIBLE_DEVICES=0 python scripts/eval_devices.py --model qwen2.5-coder-0.5b -n 32
"""
import argparse

from edgecad import Engine, devices


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--prompt", default="def quicksort(xs):")
    a = ap.parse_args()
    gpu = devices.gpu()
    runs = [("cpu", 0)] + ([("auto", -1)] if gpu else [])
    out = {}
    for backend, layers in runs:
        with Engine(a.model, mode="target", backend=backend, target_gpu_layers=layers, memory_budget=None,
                    n_ctx=512) as e:
            e.create_completion(a.prompt, max_tokens=2, temperature=0.0)  # warm-up
            st = e.create_completion(a.prompt, max_tokens=a.n, temperature=0.0)["edgecad"]
        name = "CPU" if backend == "cpu" else f"{gpu.name} ({gpu.description})"
        out[backend] = st["token_ids"]
        print(f"{name}: {st['n_tokens'] / st['seconds']:.2f} tok/s generating, prompt {st['prompt_seconds']:.2f} s")
    if len(out) == 2:
        same = sum(x == y for x, y in zip(out["cpu"], out["auto"]))
        print(f"same greedy tokens: {same}/{len(out['cpu'])}")


if __name__ == "__main__":
    main()
