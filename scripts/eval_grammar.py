"""What a grammar costs: the real pair inside a memory budget, chat prompts that ask for JSON, greedy, with and
without JSON mode (response_format json_object): tokens/s, tokens per pass, accepted drafted tokens per pass.

    python scripts/eval_grammar.py [--memory-budget 1GB] [--mode tree] [-n 48]

`--limits` measures what edgecad/gbnf.py's bounds stand on, on the tiny target (a minute, no download): the depth
of nested groups and the length of a rule chain at which llama.cpp's grammar parser crashes, on the main thread,
on a Python thread with the default stack and on one with 128 KiB (each try in a subprocess, calling
llama_sampler_init_grammar directly, without the check), then the time and memory of grammars at the bounds.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time

from edgecad import Engine, cgroup, registry

PROMPTS = [
    "Give a JSON object describing a book: title, author, year.",
    "Return JSON with the fields name and age for a fictional person.",
    "List three fruits as a JSON object mapping each fruit to its color.",
]


def grammar_text(kind: str, n: int) -> str:
    if kind == "nest":  # root ::= ((((...("a")...))))
        return "root ::= " + "(" * n + '"a"' + ")" * n
    if kind == "chain":  # root ::= r0, r0 ::= r1, ...: llama.cpp's left-recursion check recurses along it
        return "root ::= r0\n" + "".join(f"r{i:x} ::= r{i + 1:x}\n" for i in range(n)) + f'r{n:x} ::= "a"\n'
    raise ValueError(kind)


def stack_bytes() -> int:
    """The calling thread's real stack size (glibc, musl: pthread_getattr_np)."""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_ulong
    libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    attr, size = ctypes.create_string_buffer(256), ctypes.c_size_t()
    libc.pthread_getattr_np(libc.pthread_self(), attr)
    libc.pthread_attr_getstacksize(attr, ctypes.byref(size))
    return size.value


def probe(model: str, kind: str, n: int, stack: str) -> None:
    """In a subprocess: llama.cpp parses grammar_text(kind, n) on the main thread (stack "main"), on a Python
    thread with the default stack ("0") or with that many bytes. A crash is the answer."""
    import llama_cpp as C

    from edgecad.llama import Model
    m, text = Model(model), grammar_text(kind, n).encode()

    def run():
        ok = bool(C.llama_sampler_init_grammar(m.vocab, text, b"root"))
        print(f"parsed={ok} stack={stack_bytes()}")
    if stack == "main":
        return run()
    threading.stack_size(int(stack))
    t = threading.Thread(target=run)
    t.start()
    t.join()


def survives(model, kind, n, stack) -> bool:
    r = subprocess.run([sys.executable, *(["-S"] if sys.flags.no_site else []), __file__, "--probe", model, kind,
                        str(n), stack], capture_output=True, text=True)
    if r.returncode > 0:  # an error, not a crash
        raise RuntimeError(r.stderr[-2000:])
    return r.returncode == 0


def crash_depth(model, kind, stack, hi=200_000) -> tuple[int, int]:
    """(largest n that parses, smallest that crashes), to 0.5%."""
    lo = 1
    if survives(model, kind, hi, stack):
        return hi, None
    while hi - lo > max(1, lo // 200):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if survives(model, kind, mid, stack) else (lo, mid)
    return lo, hi


def limits() -> None:
    import numpy as np
    import llama_cpp as C

    from edgecad import gbnf, tiny
    from edgecad.grammar import Grammar
    from edgecad.llama import Model
    model = str(tiny.write_pair(tempfile.mkdtemp())[1])
    print(f"threading.stack_size() = {threading.stack_size()}; real stacks: main thread {stack_bytes()} bytes, "
          "a Python thread ", end="")
    t = threading.Thread(target=lambda: print(stack_bytes(), "bytes"))
    t.start()
    t.join()
    for kind in ("nest", "chain"):
        for stack in ("main", "0", str(128 * 1024)):
            ok, crash = crash_depth(model, kind, stack)
            print(f"{kind:5} stack {stack:>6}: parses at {ok}, crashes at {crash}", flush=True)
    E = gbnf.MAX_ELEMENTS
    deep = "root ::= " + "(" * gbnf.MAX_NESTING + '"a"' + ') "b"' * gbnf.MAX_NESTING  # a stack as deep
    at_bounds = {
        "nesting at the bound": grammar_text("nest", gbnf.MAX_NESTING),
        "rule chain at the bound": grammar_text("chain", gbnf.MAX_RULES - 3),
        "elements: one literal": 'root ::= "' + "a" * (E - 10) + '"',
        "elements: x{2000}": 'root ::= "' + "a" * (E // 2000 - 1) + '"{2000}',
        "rules: x{0,1990} x4": "root ::= " + " ".join(f'"{c}"{{0,1990}}' for c in "abcd"),
        "as deep a stack": deep,
        "as deep a stack, elements": deep + '\nx ::= "' + "a" * (E - 4 * gbnf.MAX_NESTING - 20) + '"',
    }
    m = Model(model)
    for name, text in at_bounds.items():
        t = time.perf_counter()
        gbnf.check(text)
        t_check = time.perf_counter() - t
        g = Grammar(m, text)
        t_init = time.perf_counter() - t - t_check
        t = time.perf_counter()
        C.llama_sampler_free(C.llama_sampler_clone(g._ptr))
        t_clone = time.perf_counter() - t
        t = time.perf_counter()
        g.allowed(np.arange(m.n_vocab, dtype=np.int32))
        print(f"{name:26} {gbnf.measure(text)}: check {t_check * 1e3:.1f} ms, parse {t_init * 1e3:.1f} ms, clone "
              f"{t_clone * 1e3:.1f} ms, mask {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
        g.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-budget", default="1GB")
    ap.add_argument("--mode", default="tree")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--limits", action="store_true", help="measure the grammar check's bounds (tiny model)")
    ap.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe:
        return probe(a.probe[0], a.probe[1], int(a.probe[2]), a.probe[3])
    if a.limits:
        return limits()
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
