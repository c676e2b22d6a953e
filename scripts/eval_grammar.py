"""What a grammar costs: the real pair inside a memory budget, chat prompts that ask for JSON, greedy, with and
without JSON mode (response_format json_object): tokens/s, tokens per pass, accepted drafted tokens per pass.

    python scripts/eval_grammar.py [--memory-budget 1GB] [--mode tree] [-n 48]
"""
import argparse
import json

from edgecad import Engine, cgroup, registry

PROMPTS = [
    "Give a JSON object describing a book: title, author, year.",
    "Return JSON with the fields name and age for a fictional person.",
    "List three fruits as a JSON object mapping each fruit to its color.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-budget", default="1GB")
    ap.add_argument("--mode", default="tree")
    ap.add_argument("-n", type=int, default=48)
    a = ap.parse_args()
    cgroup.drop_file_cache([registry.resolve(registry.DEFAULT_TARGET), registry.resolve(registry.DEFAULT_DRAFT)])
    rows = {"plain": [], "json": []}
    with Engine(mode=a.mode, memory_budget=a.memory_budget, n_ctx=2048) as e:
        e.create_completion("warm up", max_tokens=4, temperature=0)
        for p in PROMPTS:  # interleaved: the machine's speed drifts
            for name, fmt in (("plain", None), ("json", {"type": "json_object"})):
                r = e.create_chat_completion([{"role": "user", "content": p}], max_tokens=a.n, temperature=0,
                                             response_format=fmt)
                st = r["edgecad"]
                ok = ""
                if name == "json" and r["choices"][0]["finish_reason"] == "stop":
                    ok = "parses" if isinstance(json.loads(r["choices"][0]["message"]["content"]), dict) else "NO"
                rows[name].append(st)
                print(f"{name:5} {st['n_tokens']:3} tokens {st['tokens_per_second']:5.2f} tok/s "
                      f"{st['mean_accepted_per_pass']:.2f} tok/pass {st['accepted_tokens'] / st['target_passes']:.2f} "
                      f"accepted/pass {st['config']} {ok}", flush=True)
        config = e.memory_plan.config
    print(f"\n{config}, budget {a.memory_budget}, {len(PROMPTS)} prompts x {a.n} tokens, greedy")
    for name, sts in rows.items():
        n, s = sum(x["n_tokens"] for x in sts), sum(x["seconds"] for x in sts)
        passes, acc = sum(x["target_passes"] for x in sts), sum(x["accepted_tokens"] for x in sts)
        per = lambda k: sum(x[k] for x in sts) / passes  # noqa: E731
        print(f"{name:5}: {n / s:.2f} tok/s, {n / passes:.2f} tokens per pass, {acc / passes:.2f} accepted drafted "
              f"per pass, {per('draft_tokens'):.1f} nodes per tree; per pass: {s / passes:.3f} s, drafting {per('seconds_draft'):.3f} s, target "
              f"{per('seconds_target'):.3f} s (IO wait {per('io_wait_seconds'):.3f} s), the rest (acceptance, "
              f"grammar, text) {s / passes - per('seconds_draft') - per('seconds_target'):.3f} s")


if __name__ == "__main__":
    main()
