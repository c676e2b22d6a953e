"""The server's overhead and its behaviour under load, on the real pair inside a memory budget.

1. The same greedy streamed completions through the Python API (in this process) and through `edgecad serve`
   (a subprocess, the official openai client): time to first token and tokens/s, side by side, and whether
   the tokens agree.
2. N concurrent streaming clients for a fixed time: requests served, errors, the server's RSS before and after.

    python scripts/eval_server.py [--memory-budget 1GB] [--prompts 3] [-n 32] [--clients 8] [--seconds 60]

Models from `edgecad models fetch` (EDGECAD_MODELS moves them); model files are dropped from the page cache
before each phase.
"""
import argparse
import subprocess
import sys
import threading
import time

import openai
import psutil

from edgecad import Engine, cgroup, registry
from edgecad.prompts import load_prompts


def api_runs(prompts, n, budget):
    out = []
    with Engine(memory_budget=budget, n_ctx=2048) as e:
        e.create_completion("warm up", max_tokens=4, temperature=0)
        for p in prompts:
            t0, first, ids = time.perf_counter(), None, None
            for chunk in e.create_completion(p, max_tokens=n, temperature=0, stream=True):
                first = first or time.perf_counter() - t0
                ids = chunk.get("edgecad", {}).get("token_ids", ids)
            out.append((first, len(ids) / (time.perf_counter() - t0), ids))
        config = e.memory_plan.config
    return out, config


def start_server(budget, clients):
    proc = subprocess.Popen([sys.executable, "-m", "edgecad.cli", "serve", "--port", "0", "--memory-budget", budget,
                             "--n-ctx", "2048", "--max-queue", str(clients)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write("  server: " + line)
        if " at http://" in line:
            url = line.split(" at ")[1].split("/v1")[0]
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain the log
            return proc, url
    raise SystemExit("the server did not start")


def server_runs(client, prompts, n):
    client.completions.create(model=registry.DEFAULT_TARGET, prompt="warm up", max_tokens=4, temperature=0)
    out = []
    for p in prompts:
        t0, first, ids = time.perf_counter(), None, None
        for chunk in client.completions.create(model=registry.DEFAULT_TARGET, prompt=p, max_tokens=n, temperature=0,
                                               stream=True):
            first = first or time.perf_counter() - t0
            ids = (chunk.model_extra.get("edgecad") or {}).get("token_ids", ids)
        out.append((first, len(ids) / (time.perf_counter() - t0), ids))
    return out


def load_test(client, prompts, clients, seconds):
    served, errors, tokens, stop = [0], [], [0], time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(i):
        while time.perf_counter() < stop:
            try:
                k = 0
                for chunk in client.completions.create(model=registry.DEFAULT_TARGET, prompt=prompts[i % len(prompts)],
                                                       max_tokens=16, temperature=0.8, stream=True):
                    k += bool(chunk.choices and chunk.choices[0].text)
                with lock:
                    served[0] += 1
                    tokens[0] += k
            except openai.APIError as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served[0], errors, tokens[0], time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-budget", default="1GB")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    prompts = [p["prompt"] for p in load_prompts(None)[:a.prompts]]
    files = [registry.resolve(registry.DEFAULT_TARGET), registry.resolve(registry.DEFAULT_DRAFT)]

    cgroup.drop_file_cache(files)
    api, config = api_runs(prompts, a.n, a.memory_budget)
    cgroup.drop_file_cache(files)
    proc, url = start_server(a.memory_budget, a.clients)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        srv = server_runs(client, prompts, a.n)
        print(f"\nreal pair, memory budget {a.memory_budget} ({config}), {len(prompts)} prompts x {a.n} tokens, greedy")
        print("| prompt | API TTFT s | server TTFT s | API tok/s | server tok/s | same tokens |")
        print("|---|---|---|---|---|---|")
        for i, (x, y) in enumerate(zip(api, srv)):
            print(f"| {i} | {x[0]:.2f} | {y[0]:.2f} | {x[1]:.2f} | {y[1]:.2f} | {x[2] == y[2]} |")
        mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        print(f"| mean | {mean(api, 0):.2f} | {mean(srv, 0):.2f} | {mean(api, 1):.2f} | {mean(srv, 1):.2f} | "
              f"server/API tok/s {mean(srv, 1) / mean(api, 1):.3f} |")

        ps = psutil.Process(proc.pid)
        rss0 = ps.memory_info().rss
        served, errors, tokens, took = load_test(client, prompts, a.clients, a.seconds)
        rss1 = ps.memory_info().rss
        print(f"\nload: {a.clients} concurrent streaming clients for {took:.0f} s: {served} requests served "
              f"({tokens} tokens, {tokens / took:.2f} tok/s in all), {len(errors)} errors"
              + (f" (first: {errors[0]})" if errors else "")
              + f"; server RSS {rss0 / 1e6:.0f} MB before, {rss1 / 1e6:.0f} MB after")
    finally:
        proc.terminate()
        print(f"server exit status after SIGTERM: {proc.wait(120)}")


if __name__ == "__main__":
    main()
