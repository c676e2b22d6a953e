"""Time to first token of each turn of a chat, with and without prefix reuse (the KV caches kept between
turns, or cleared before each one), under a memory budget.

    python scripts/eval_chat.py --memory-budget 1GB --turns 3
"""
import argparse
import time

from edgecad import Engine

QUESTIONS = ["Write a Python function that checks whether a number is prime.",
             "Now make it faster for large numbers.",
             "Add a docstring and two doctests.",
             "Explain the complexity in one sentence."]


def chat(eng: Engine, turns: int, reuse: bool, max_tokens: int) -> list[dict]:
    messages, out = [], []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        if not reuse:
            for ctx in (eng.target_context, eng.draft_context):
                if ctx is not None:
                    ctx.clear()
        t0, first, parts, last = time.perf_counter(), None, [], None
        for chunk in eng.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stream=True):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta and first is None:
                first = time.perf_counter() - t0
            parts.append(delta or "")
            last = chunk
        st = last["edgecad"]
        out.append({"ttft": first, "total": time.perf_counter() - t0, "prompt_tokens": st["prompt_tokens"],
                    "reused": st["prompt_tokens_reused"], "prompt_seconds": st["prompt_seconds"]})
        messages.append({"role": "assistant", "content": "".join(parts)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--memory-budget", default="1GB")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("-n", type=int, default=48)
    a = ap.parse_args()
    with Engine(a.target, a.draft, memory_budget=a.memory_budget, n_ctx=2048) as eng:
        print(f"configuration: {eng.memory_plan.config} ({eng.memory_plan.reason})")
        for reuse in (True, False):
            for i, t in enumerate(chat(eng, a.turns, reuse, a.n), 1):
                print(f"reuse={reuse!s:<5} turn {i}: first token after {t['ttft']:.2f} s (prompt {t['prompt_tokens']} "
                      f"tokens, {t['reused']} reused, prefill {t['prompt_seconds']:.2f} s), answer in {t['total']:.2f} s")


if __name__ == "__main__":
    main()
