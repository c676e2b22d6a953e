"""Memory that moves, on the real pair: timelines of an answer whose cgroup limit moves while it streams.

    python scripts/eval_follow.py [--high 1.6GB] [--low 1.07GB] [-n 96] [--after 8]

down: the answer starts where the target fits resident (--high); after `--after` tokens the cgroup's soft limit
      (v1 memory.soft_limit_in_bytes, v2 memory.high) falls to --low, and 2 s later its hard limit too. Run for
      edgecad and for llama-cpp-python (default `Llama`) in the same situation; each answer's text against
      llama-cpp-python's greedy text (alone, no limit).
up:   the answer starts where the target is paged (--low); after `--after` tokens both limits rise to --high.

Each process runs alone in its memory cgroup (edgecad.cgroup), the model files dropped from the page cache
first. Prints one timeline per run (time, tokens, configuration) and the speeds before and after the move.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from edgecad import cgroup, registry
from edgecad.plan import parse_memory

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a Python function "
          "that returns the n-th Fibonacci number iteratively, with a docstring.<|im_end|>\n<|im_start|>assistant\n")
# (a prompt where the target's resident kernels (repacked) and paged ones (not) agree for 128 tokens: on 4 of 5 others
# tried they part at a near-tie within the first 50, as any two plans may: README, "What is guaranteed")

EDGECAD = r"""
import json, sys, time
from edgecad import Engine
from edgecad.errors import MemoryFloorError
target, draft, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
e = Engine(target, draft, n_ctx=2048, n_threads=2, verbose=False)
print(json.dumps({"t": time.monotonic(), "ready": e.memory_plan.config}), flush=True)
text = ""
try:
    for ch in e.create_completion(prompt, max_tokens=n, temperature=0, stream=True):
        if "edgecad" in ch:
            print(json.dumps({"t": time.monotonic(), "done": text + ch["choices"][0]["text"],
                              "moves": ch["edgecad"]["moves"], "n": ch["edgecad"]["n_tokens"]}), flush=True)
            break
        text += ch["choices"][0]["text"]
        print(json.dumps({"t": time.monotonic(), "text": text, "config": e.memory_plan.config}), flush=True)
except MemoryFloorError as err:
    print(json.dumps({"t": time.monotonic(), "floor": str(err)}), flush=True)
"""

LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
target, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = Llama(target, n_ctx=2048, n_threads=2, verbose=False)
print(json.dumps({"t": time.monotonic(), "ready": "llama-cpp-python"}), flush=True)
text = ""
for ch in m.create_completion(prompt, max_tokens=n, temperature=0, stream=True):
    text += ch["choices"][0]["text"]
    print(json.dumps({"t": time.monotonic(), "text": text, "config": "llama-cpp-python"}), flush=True)
print(json.dumps({"t": time.monotonic(), "done": text}), flush=True)
"""


def _set(cg, soft: int, hard: int = None) -> str:
    """Move the cgroup's limits; what the kernel said."""
    what = f"soft {soft / 1e9:.2f} GB" + (f", hard {hard / 1e9:.2f} GB" if hard is not None else "")
    try:
        cg.set_limits(hard, soft)
        return what
    except OSError as e:
        return f"{what}: refused ({e.strerror})"


def run(cmd: list, start: int, move_to: int, after: int, hard_delay: float, files: list) -> dict:
    """One process in a cgroup of `start` bytes; after `after` chunks its limits move to `move_to` (soft at once, hard
    `hard_delay` s later when it falls). Returns the timeline."""
    cgroup.drop_file_cache(files)
    events, lines = [], []
    with cgroup.MemoryCgroup(start, "follow") as cg:
        p = cg.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0, chunks = None, 0
        for raw in p.stdout:
            msg = json.loads(raw)
            t0 = t0 or msg["t"]
            msg["t"] -= t0
            lines.append(msg)
            if "text" in msg:
                chunks += 1
                if chunks == after:
                    down = move_to < start
                    events.append((msg["t"], _set(cg, move_to, None if down else move_to)))
                    if down:
                        def later(t=time.monotonic()):
                            time.sleep(hard_delay)
                            events.append((time.monotonic() - t + msg["t"], _set(cg, move_to, move_to)))
                        threading.Thread(target=later, daemon=True).start()
        rc = p.wait()
        err = p.stderr.read()
        time.sleep(hard_delay)
        killed = cgroup.killed_by_limit(rc, cg)
    return {"lines": lines, "events": events, "rc": rc, "killed": killed, "stderr": err[-2000:]}


def report(name: str, r: dict, reference: str) -> None:
    print(f"\n## {name}: rc {r['rc']}{' (killed by the limit)' if r['killed'] else ''}")
    for t, what in r["events"]:
        print(f"  {t:7.2f} s  limits: {what}")
    last_cfg, n = None, 0
    for m in r["lines"]:
        if "ready" in m:
            print(f"  {m['t']:7.2f} s  loaded: {m['ready']}")
        elif "text" in m:
            n += 1
            if m["config"] != last_cfg:
                print(f"  {m['t']:7.2f} s  chunk {n}: {m['config']}")
                last_cfg = m["config"]
        elif "done" in m:
            same = m["done"] == reference
            print(f"  {m['t']:7.2f} s  done: {m.get('n', '?')} tokens, same text as llama-cpp-python's greedy: {same}")
            for mv in m.get("moves", []):
                print(f"             moved at token {mv['at_token']} ({mv['move_seconds']} s): {mv['from']} -> "
                      f"{mv['to']}: {mv['why']}")
        elif "floor" in m:
            print(f"  {m['t']:7.2f} s  stopped: {m['floor']}")
    if r["rc"] != 0 and not r["killed"]:
        print("  stderr: " + r["stderr"][-600:])
    chunks = [m for m in r["lines"] if "text" in m]
    moved = any(m["config"] != chunks[0]["config"] for m in chunks)
    if moved:  # edgecad: by configuration
        halves = (("before the move", [m for m in chunks if m["config"] == chunks[0]["config"]][1:]),
                  ("after the move", [m for m in chunks if m["config"] != chunks[0]["config"]][1:]))
    else:  # llama-cpp-python: by the last limit's time
        t = r["events"][-1][0] if r["events"] else float("inf")
        halves = (("before the last limit", [m for m in chunks if m["t"] <= t][1:]),
                  ("after the last limit", [m for m in chunks if m["t"] > t][1:]))
    for label, part in halves:
        if len(part) > 1:  # (from the second chunk of each: the first one's time holds the prompt's pass or the move)
            rate = (len(part[-1]["text"]) - len(part[0]["text"])) / max(part[-1]["t"] - part[0]["t"], 1e-9)
            print(f"  {label} ({part[0]['config']}): {rate:.1f} characters/s over {part[-1]['t'] - part[0]['t']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=registry.DEFAULT_TARGET)
    ap.add_argument("--draft", default=registry.DEFAULT_DRAFT)
    ap.add_argument("--high", default="1.6GB")
    ap.add_argument("--low", default="1.07GB")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--after", type=int, default=8, help="chunks before the limit moves")
    ap.add_argument("--runs", default="down,up,llama-down")
    a = ap.parse_args()
    ok, why = cgroup.available()
    if not ok:
        sys.exit(f"eval_follow: {why}")
    target, draft = registry.resolve(a.target), registry.resolve(a.draft)
    high, low = parse_memory(a.high, 0, None), parse_memory(a.low, 0, None)
    files = [target, draft]
    ref = subprocess.run([sys.executable, "-c", LLAMA, str(target), PROMPT, str(a.n)], capture_output=True, text=True)
    reference = json.loads(ref.stdout.strip().splitlines()[-1])["done"]
    ed = [sys.executable, "-c", EDGECAD, str(target), str(draft), PROMPT, str(a.n)]
    ll = [sys.executable, "-c", LLAMA, str(target), PROMPT, str(a.n)]
    runs = {"down": ("edgecad, limit lowered", ed, high, low), "up": ("edgecad, limit raised", ed, low, high),
            "llama-down": ("llama-cpp-python, limit lowered", ll, high, low)}
    for key in a.runs.split(","):
        name, cmd, start, to = runs[key]
        report(f"{name} ({start / 1e9:.2f} -> {to / 1e9:.2f} GB after {a.after} chunks)",
               run(cmd, start, to, a.after, 2.0, files), reference)


if __name__ == "__main__":
    main()
