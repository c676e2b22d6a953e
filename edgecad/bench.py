"""`edgecad bench`: every baseline side by side, in one run, with fidelity and the IO floor.

Rows are interleaved per prompt (prompt 1: every row, prompt 2: every row, ...) so machine
noise hits all rows alike. Each row loads its own engine for each prompt, with the model files
dropped from the page cache first, and closes it before the next row: two engines paging one file
would keep each other's pages mapped. Load time is reported per row, not counted in tok/s (under
--storage, what the load reads takes the emulated storage's time). After all rows, one resident
target scores every output teacher-forced. The tables and plots of a result: edgecad.bench_report.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

from . import cgroup, registry
from .bench_report import limits_table, markdown, pass_table, plot, plot_limits, text_table
from .engine import Engine
from .llama import Batch
from .errors import EdgecadError
from .fidelity import NEAR_TIE_EPS, Fidelity, teacher_forced
from .gguf_file import read_gguf
from .measure import auto_budget, paging_plan, read_bandwidth, storage_bytes_read
from .plan import PagerParams, parse_budget, parse_memory
from .progress import Progress
from .prompts import load_prompts
from .rpc import require
from .rpc.harness import ServerProcess


@dataclass(frozen=True)
class Row:
    name: str
    mode: str                 # Engine mode
    paged: bool               # under the budget
    io: str = "prefetch"      # pager IO mode when paged
    pipeline: bool = False    # draft while the paged target waits on storage (Engine(pipeline=...))
    memory: str = "owned"     # where streamed layers live when paged (PagerParams.memory)


ROWS = {r.name: r for r in [
    Row("target", "target", False),
    Row("target-paged", "target", True, "demand"),
    Row("target-prefetch", "target", True, "prefetch"),
    Row("linear-paged", "linear", True),
    Row("bild-paged", "bild", True),
    Row("edgecad-paged", "tree", True),
    Row("edgecad-paged-pipeline", "tree", True, pipeline=True),
    Row("target-paged-cache", "target", True, "demand", memory="cache"),  # the page cache's residency, to compare
    Row("edgecad-paged-cache", "tree", True, memory="cache"),
    Row("edgecad", "tree", False),
]}
LOSSLESS = {"target", "tree", "linear"}


class _PeakRSS:
    """Samples this process's RSS in a thread while a row runs."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._proc = psutil.Process()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def machine() -> dict:
    import llama_cpp
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "llama_cpp_python": getattr(llama_cpp, "__version__", "?")}


def run_bench(target, draft, *, modes=None, budget="40%", storage="native", prompts=None, n_prompts=None,
              max_tokens=64, repeat=1, temperature=0.0, n_threads=None, progress=True) -> dict:
    unknown = set(modes or ()) - set(ROWS)
    if unknown:
        raise EdgecadError(f"unknown bench rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    target, draft = registry.resolve(target), registry.resolve(draft)
    rows = [ROWS[m] for m in (modes or [m for m in ROWS if not m.endswith("-cache")])]  # (the fallback: on request)
    info = read_gguf(target)
    budget_bytes = parse_budget(budget, info.file_size, auto_budget)
    plans = {io: paging_plan(info, budget_bytes, PagerParams(io=io, storage=storage)) for io in ("demand", "prefetch")}
    prompt_set = load_prompts(prompts)[:n_prompts]
    seq_bw = statistics.median(read_bandwidth(target) for _ in range(3))
    throttle = PagerParams(storage=storage).bytes_per_second
    floor_bw = min(seq_bw, throttle) if throttle else seq_bw  # the storage being emulated caps the floor

    runs = _run_rows(target, draft, rows, prompt_set, budget_bytes=budget_bytes, storage=storage, max_tokens=max_tokens,
                     repeat=repeat, temperature=temperature, n_threads=n_threads, progress=progress)
    fid, compute_floor = _judge(target, runs, n_threads)
    out_rows = [_row(r, runs[r.name], fid[r.name], plans, floor_bw, compute_floor) for r in rows]
    by = {row["mode"]: row for row in out_rows}
    for row in out_rows:
        for base, key in (("target-paged", "speedup_vs_target_paged"), ("target", "speedup_vs_target")):
            row[key] = row["tokens_per_second"] / by[base]["tokens_per_second"] if base in by else None
    speedups = {}
    for a, b in [("edgecad-paged", "target-paged"), ("edgecad-paged-pipeline", "edgecad-paged"),
                 ("target-paged", "target-paged-cache"), ("edgecad-paged", "edgecad-paged-cache"),
                 ("edgecad-paged", "target-prefetch"),
                 ("edgecad-paged", "linear-paged"), ("edgecad-paged", "bild-paged"), ("edgecad", "target")]:
        if a in by and b in by:
            speedups[f"{a}/{b}"] = by[a]["tokens_per_second"] / by[b]["tokens_per_second"]
    return {
        "machine": machine(),
        "config": {"target": str(target), "draft": str(draft), "budget": budget, "budget_bytes": budget_bytes,
                   "storage": storage, "sequential_read_bytes_per_second": seq_bw,
                   "floor_read_bytes_per_second": floor_bw, "prompts": prompts or "builtin",
                   "n_prompts": len(prompt_set), "max_tokens": max_tokens, "repeat": repeat,
                   "temperature": temperature, "n_threads": n_threads, "near_tie_eps": NEAR_TIE_EPS,
                   "streamed_bytes_per_pass": {io: p.streamed_bytes for io, p in plans.items()},
                   "tokens_per_second": "generated tokens / (prompt + generation seconds), median over prompts",
                   "seconds_per_token_keys": "seconds_draft, seconds_target_compute, seconds_io_wait are per token"},
        "rows": out_rows,
        "speedups": speedups,
    }


def _run_rows(target, draft, rows, prompt_set, *, budget_bytes, storage, max_tokens, repeat, temperature, n_threads,
              progress) -> dict:
    """Every row on every prompt, rows interleaved per prompt (noise hits all alike), each engine loaded with the
    model files dropped from the page cache: row name -> the completions' stats."""
    runs = {r.name: [] for r in rows}
    bar = Progress(len(prompt_set) * repeat * len(rows), "bench", "") if progress else None
    for rep in range(repeat):
        for pr in prompt_set:
            for r in rows:
                if bar:
                    bar.update(0, note=f"{pr['id']} {r.name}")
                kw = (dict(target_budget=budget_bytes, pager=PagerParams(io=r.io, storage=storage, memory=r.memory))
                      if r.paged
                      else dict(memory_budget=None, pager=PagerParams(storage=storage)))
                _drop([target, draft])
                with Engine(target, draft if r.mode != "target" else None, mode=r.mode, n_threads=n_threads,
                            n_ctx=2048, seed=rep, pipeline=r.pipeline, **kw) as eng, _PeakRSS() as rss:
                    out = eng.create_completion(pr["prompt"], max_tokens=max_tokens, temperature=temperature,
                                                seed=rep)
                st = out["edgecad"]
                st["peak_rss_bytes"] = rss.peak
                st["load_seconds"], st["load_bytes_read"] = eng.load_seconds, eng.load_bytes_read
                st["prompt"] = pr["prompt"]
                runs[r.name].append(st)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return runs


def _judge(target, runs: dict, n_threads) -> tuple[dict, Callable[[int], float]]:
    """One resident target scores every output, teacher-forced (row name -> Fidelity), and measures the compute
    floor of a pass: seconds of a resident pass over k tokens (root + k - 1 nodes), median of 3."""
    fid = {name: Fidelity() for name in runs}
    with Engine(target, n_ctx=2048, n_threads=n_threads, memory_budget=None) as judge, Batch(512) as batch:
        for name, sts in runs.items():
            for st in sts:
                fid[name] += teacher_forced(judge.target_context, batch, judge.tokenize(st["prompt"], special=True),
                                            st["token_ids"])
        ctx, ks = judge.target_context, sorted({_pass_size(st) for sts in runs.values() for st in sts})
        ctx.prefill(batch, [1] * 64)  # a context for the passes to attend over
        floor = {k: pass_seconds(ctx, batch, k) for k in ks}
        ctx.clear()
    return fid, lambda k: floor[k] if k in floor else floor[min(floor, key=lambda x: abs(x - k))]


def _pass_size(st: dict) -> int:
    """Tokens in one of a completion's target passes, on average: the root and the drafted nodes."""
    return round(st["tree_nodes_per_pass"]) + 1


def pass_seconds(ctx, batch: Batch, k: int, repeat: int = 3) -> float:
    """Median seconds of a pass over k tokens with logits for each, after what sequence 0 holds (left as it was):
    what a tree of k - 1 nodes costs to verify (also scripts/eval_batch_cost.py)."""
    pos, ts = len(ctx.tokens), []
    for _ in range(repeat):
        batch.clear()
        for j in range(k):
            batch.add(ctx.tokens[j % pos] if pos else 1, pos + j, (0,), True)
        t0 = time.perf_counter()
        ctx.decode(batch)
        ts.append(time.perf_counter() - t0)
        ctx.seq_rm(0, pos, -1)
    return statistics.median(ts)


def _row(r, sts: list, fid: Fidelity, plans: dict, floor_bw: float, compute_floor) -> dict:
    """A row of the table from its completions' stats. compute_floor(k): seconds of a resident pass over k tokens."""
    tps = [s["n_tokens"] / (s["seconds"] + s["prompt_seconds"]) for s in sts]
    n_tok = sum(s["n_tokens"] for s in sts)
    passes = sum(s["target_passes"] for s in sts)
    per_pass = n_tok / passes
    row = {
        "mode": r.name, "engine_mode": r.mode, "paged": r.paged, "io": r.io if r.paged else None,
        "lossless": r.mode in LOSSLESS,
        "tokens_per_second": statistics.median(tps), "tokens_per_second_min": min(tps),
        "tokens_per_second_max": max(tps), "tokens": n_tok, "target_passes": passes,
        "mean_accepted_per_pass": per_pass,
        "peak_resident_target_bytes": max((s["peak_resident_target_bytes"] or 0) for s in sts) if r.paged else None,
        "peak_rss_bytes": max(s["peak_rss_bytes"] for s in sts),
        # loading the engine (models, pinned layers), files dropped from the page cache first; median
        "load_seconds": statistics.median(s["load_seconds"] for s in sts),
        "load_bytes_read": (statistics.median(s["load_bytes_read"] for s in sts)
                            if all(s["load_bytes_read"] is not None for s in sts) else None),
        "bytes_read_per_token": sum(s["bytes_read"] for s in sts) / n_tok if r.paged else None,
        "io_floor_seconds_per_token": None, "floor_multiple": None,
        "fidelity": fid.fraction, "near_ties": fid.near_ties, "fidelity_mismatches": fid.mismatch_clear,
        "max_mismatch_gap": fid.max_mismatch_gap,
        # seconds per generated token, summed over prompts
        "seconds_draft": sum(s["seconds_draft"] for s in sts) / n_tok,
        "seconds_target_compute": sum(s["target_compute_seconds"] for s in sts) / n_tok,
        "seconds_io_wait": sum(s["io_wait_seconds"] for s in sts) / n_tok if r.paged else None,
        # the pipeline: chain drafting beside target passes (overlapped with them), and what it gave
        "seconds_chain": sum(s["seconds_chain"] for s in sts) / n_tok,
        "chain_tokens": sum(s["chain_tokens"] for s in sts),
        "reused_tokens": sum(s["reused_tokens"] for s in sts),
        # the pager's IO thread: bytes read per second it was busy (reads, evictions, throttle sleeps)
        "pager_read_bytes_per_second": (sum(s["bytes_read"] for s in sts) / busy
                                        if r.paged and (busy := sum(s["io_busy_seconds"] for s in sts)) else None),
    }
    if r.paged:
        floor = plans[r.io].streamed_bytes / floor_bw / per_pass
        row["io_floor_seconds_per_token"] = floor
        row["floor_multiple"] = (1 / row["tokens_per_second"]) / floor
    row.update(_pass_split(sts, plans[r.io].streamed_bytes / floor_bw if r.paged else 0.0, compute_floor))
    return row


def _pass_split(sts: list, io_floor: float, compute_floor) -> dict:
    """Where a generating pass's seconds go (means over the row's passes): waiting on IO, target compute, drafting,
    and the unaccounted rest; `overlap` is the IO thread's busy time hidden under compute and drafting. The floor of
    a pass is max(IO floor: its streamed bytes at the storage's sequential rate, compute floor: a resident pass of
    the same size); `pass_floor_multiple` is how far above it the row runs."""
    # the prompt's pass (target mode's first; a tree's first when it decoded the prompt's end) is timed in
    # prompt_seconds: the generating passes are the others
    passes = sum(s["target_passes"] - s["prompt_passes"] for s in sts)
    if passes <= 0:
        return {"pass_seconds": None, "pass_floor_multiple": None}
    mean = lambda key: sum(s[key] for s in sts) / passes
    sec, io, compute, draft = mean("seconds"), mean("io_wait_seconds"), mean("target_compute_seconds"), mean("seconds_draft")
    floor_c = statistics.mean(compute_floor(_pass_size(s)) for s in sts)
    floor = max(io_floor, floor_c)
    return {"pass_seconds": sec, "pass_io_wait": io, "pass_compute": compute, "pass_draft": draft,
            "pass_overlap": max(0.0, mean("io_busy_seconds") - io), "pass_rest": sec - io - compute - draft,
            "pass_io_floor": io_floor, "pass_compute_floor": floor_c, "pass_floor": floor,
            "pass_floor_multiple": sec / floor if floor > 0 else None}


def quick_models(directory: Optional[str] = None) -> tuple[Path, Path]:
    """The tiny pair with a 16-layer target, for `--quick` (seconds, on real llama.cpp)."""
    from . import tiny
    d = Path(directory or tempfile.mkdtemp(prefix="edgecad-quick-"))
    return tiny.write_pair(d, target=tiny.TinySpec(n_layer=16, layer_scale=0.15, seed=1))


def main_bench(a) -> int:
    target, draft, n_prompts, max_tokens, budget = a.target, a.draft, a.n_prompts, a.max_tokens, a.target_budget
    modes = [m for x in a.modes for m in x.split(",") if m] if a.modes else None
    if a.quick:  # the tiny pair, a few prompts: seconds, on real llama.cpp (CI)
        draft, target = quick_models()
        n_prompts, max_tokens, budget = 3, min(max_tokens, 24), "50%"
    if a.memory_limit:
        limits = [parse_memory(x, 0, auto_budget) for x in a.memory_limit.split(",") if x.strip()]
        result = run_limits(target, draft, limits, rows=modes, prompts=a.prompts, n_prompts=n_prompts or 3,
                            max_tokens=max_tokens, n_threads=a.threads, n_ctx=a.n_ctx, progress=not a.no_progress)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
        print(limits_table(result))
        if a.plot:
            plot_limits(result, a.plot)
            print(f"plot written to {a.plot}", file=sys.stderr)
        return 0
    result = run_bench(target, draft, modes=modes, budget=budget, storage=a.storage, prompts=a.prompts,
                       n_prompts=n_prompts, max_tokens=max_tokens, repeat=a.repeat, temperature=a.temperature,
                       n_threads=a.threads, progress=not a.no_progress)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(markdown(result) if a.markdown else text_table(result))
    print("\nseconds per pass (means), against the floor max(IO floor, compute floor of a resident pass as large):")
    print(pass_table(result))
    print("\n" + ", ".join(f"{k}: {v:.2f}x" for k, v in result["speedups"].items()))
    seq = result["config"]["sequential_read_bytes_per_second"]
    rates = [f"{r['mode']} {r['pager_read_bytes_per_second'] / 1e9:.2f}" for r in result["rows"]
             if r["pager_read_bytes_per_second"]]
    if rates:
        print(f"pager read GB/s: {', '.join(rates)}; the storage's sequential read (ec_read_bandwidth): {seq / 1e9:.2f}")
    if a.plot:
        plot(result, a.plot)
        print(f"plot written to {a.plot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- equal device memory

LIMIT_ROWS = {  # row -> what its process runs inside the memory cgroup
    "llama-cpp-python": "llama_cpp.Llama with default settings (the peer)",
    "target-paged": "edgecad, target only (mode='target'), memory_budget='auto'",
    "tree-paged": "edgecad, draft + tree (mode='tree'), memory_budget='auto'",
    "edgecad": "edgecad's automatic configuration, memory_budget='auto'",
    "edgecad-cache": "edgecad, memory_budget='auto', streamed layers through the page cache "
                     "(PagerParams(memory='cache'): the residency before the owned one, to compare)",
    "edgecad-2dev": "edgecad's automatic configuration with a second device of the same memory: an `edgecad "
                    "rpc-server` in a cgroup of its own on loopback (remote=[...]; needs the RPC build)",
    "edgecad-2dev-cached": "edgecad-2dev, its server's cache (--cache) filled by a load before: the weights are not "
                           "sent again",
}


def _worker(spec: dict) -> dict:
    """One row in this process (inside the cgroup): load, then each prompt; tok/s includes the prompt."""
    t0, read0 = time.perf_counter(), storage_bytes_read()
    row, runs, info = spec["row"], [], {}
    if row == "llama-cpp-python":
        import llama_cpp
        llm = llama_cpp.Llama(model_path=spec["target"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"],
                              verbose=False)
        load = time.perf_counter() - t0
        load_read = storage_bytes_read(since=read0)
        reset = cgroup.reset_own_peak()  # the peak from here on: generating, not loading
        for pr in spec["prompts"]:
            t = time.perf_counter()
            out = llm.create_completion(pr, max_tokens=spec["max_tokens"], temperature=0.0)
            runs.append({"seconds": time.perf_counter() - t, "tokens": out["usage"]["completion_tokens"],
                         "text": out["choices"][0]["text"]})
        llm.close()
    else:
        mode = {"target-paged": "target", "tree-paged": "tree"}.get(row)
        pager = PagerParams(memory="cache") if row == "edgecad-cache" else None
        with Engine(spec["target"], spec["draft"] if mode != "target" else None, mode=mode, memory_budget="auto",
                    n_ctx=spec["n_ctx"], n_threads=spec["n_threads"], remote=spec.get("remote"), pager=pager) as eng:
            load, load_read = time.perf_counter() - t0, eng.load_bytes_read
            info = eng.memory_plan.as_dict()
            reset = cgroup.reset_own_peak()
            for pr in spec["prompts"]:
                t = time.perf_counter()
                out = eng.create_completion(pr, max_tokens=spec["max_tokens"], temperature=0.0)
                st = out["edgecad"]
                passes = max(1, st["target_passes"] - st["prompt_passes"])
                runs.append({"seconds": time.perf_counter() - t, "tokens": st["n_tokens"], "config": st["config"],
                             "text": out["choices"][0]["text"], "tokens_per_pass": st["mean_accepted_per_pass"],
                             "peak_resident_target_bytes": st["peak_resident_target_bytes"],
                             "read_per_pass": st["bytes_read"] / passes,
                             "network_per_pass": st.get("network_bytes", 0) / max(1, st["target_passes"])})
    hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    return {"load_seconds": load, "load_bytes_read": load_read, "runs": runs, "plan": info,
            "peak_generating_bytes": cgroup.own_peak() if reset else None,
            "peak_rss_bytes": hwm[0] if hwm else None}  # the process's own peak (the cgroup's counts the page cache)


_said_warm = []


def _drop(paths: list) -> None:
    """Drop the model files from the page cache before a row, and say once when pages of them stay (another process
    maps them: its pages cannot be dropped): rows would then not start cold, and a memory cgroup would not be
    charged for those pages (measured: llama-cpp-python read 727 of 1,117 MB at load and ran 2.2x as fast at 1 GB
    while a stopped process held the target mapped)."""
    left = cgroup.drop_file_cache(paths)
    if left and left > 16e6 and not _said_warm:
        _said_warm.append(True)
        print(f"edgecad bench: warning: {left / 1e6:,.0f} MB of the model files stay in the page cache after "
              "dropping them (another process maps them: stop it): rows do not start cold", file=sys.stderr)


def run_limits(target, draft, limits, *, rows=None, prompts=None, n_prompts=3, max_tokens=24, n_threads=None,
               n_ctx=512, progress=True, timeout=3600) -> dict:
    """Each row in its own process, alone in a memory cgroup of each size, model files dropped from the
    page cache first. Without cgroups, says so in one line and runs every row without a limit."""

    rows = list(rows or [r for r in LIMIT_ROWS if not r.endswith("-cache")])
    unknown = set(rows) - set(LIMIT_ROWS)
    if unknown:
        raise EdgecadError(f"unknown rows {sorted(unknown)} for --memory-limit: choose from {', '.join(LIMIT_ROWS)}")
    target, draft = registry.resolve(target), registry.resolve(draft)
    ok, why = cgroup.available()
    if not ok:
        print(f"edgecad bench: {why}; running every row without a memory limit", file=sys.stderr)
        limits = [None]
    texts = [p["prompt"] for p in load_prompts(prompts)[:n_prompts]]
    results = []
    bar = Progress(len(limits) * len(rows), "bench", "") if progress else None
    for limit in limits:
        for row in rows:
            if bar:
                bar.update(0, note=f"{row} @ {limit / 1e6:,.0f} MB" if limit else row)
            spec = {"row": row, "target": str(target), "draft": str(draft), "prompts": texts,
                    "max_tokens": max_tokens, "n_threads": n_threads or os.cpu_count(), "n_ctx": n_ctx}
            with _second_device(row, limit, spec) as server:
                _drop([target, draft])
                res = _limit_row(spec, limit, timeout)
                res["server_peak_bytes"] = server.peak if server else None
            results.append(res)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    peers = {r["limit_bytes"]: r for r in results if r["row"] == "llama-cpp-python"}
    for r in results:
        p = peers.get(r["limit_bytes"], {})
        tps, peer_texts = p.get("tokens_per_second"), p.get("texts")
        r["x_peer"] = r["tokens_per_second"] / tps if tps and r["tokens_per_second"] else None
        r["same_text_as_peer"] = (sum(a == b for a, b in zip(peer_texts, r["texts"]))
                                  if peer_texts and r.get("texts") else None)
    return {"machine": machine(),
            "config": {"target": str(target), "draft": str(draft), "limits": limits, "rows": rows,
                       "rows_meaning": {k: LIMIT_ROWS[k] for k in rows}, "n_prompts": len(texts),
                       "max_tokens": max_tokens, "n_ctx": n_ctx, "n_threads": n_threads,
                       "cgroups": ok, "tokens_per_second": "completion tokens / (prompt + generation seconds), "
                       "median over prompts; load not counted"},
            "results": results}


@contextmanager
def _second_device(row: str, limit: Optional[int], spec: dict):
    """For the 2dev rows: an `edgecad rpc-server` alone in a memory cgroup of `limit` on loopback, in spec["remote"]
    (with a cache its warm-up load filled, for -cached); yields its cgroup (None for other rows)."""
    if not row.startswith("edgecad-2dev"):
        yield None
        return
    require()
    cache = tempfile.mkdtemp(prefix="edgecad-rpc-cache-") if row.endswith("cached") else None
    try:
        with ServerProcess(limit, cache=cache) as server:
            spec["remote"] = [server.endpoint]
            if cache:  # a first load fills the server's cache
                _limit_row({**spec, "prompts": spec["prompts"][:1], "max_tokens": 1}, limit, 3600)
            yield server.cg
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def _limit_row(spec: dict, limit: Optional[int], timeout: float) -> dict:
    """One row's process (`python -m edgecad.bench --worker SPEC`) alone in a memory cgroup of `limit` bytes (None:
    no limit): its speed, peak memory, configuration and texts, or why it did not finish."""
    cmd = [sys.executable, "-m", "edgecad.bench", "--worker", json.dumps(spec)]
    # cwd elsewhere: from a source checkout, `-m edgecad.bench` would import the unbuilt sources
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    try:
        if limit:
            with cgroup.MemoryCgroup(limit) as cg:
                r = cg.run(cmd, timeout=timeout, **kw)
                peak, killed = cg.peak, cgroup.killed_by_limit(r.returncode, cg)
        else:
            r = subprocess.run(cmd, timeout=timeout, **kw)
            peak, killed = None, False
    except subprocess.TimeoutExpired:
        r, peak, killed = subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout} s"), None, False
    except (OSError, subprocess.SubprocessError) as e:
        raise EdgecadError(f"cannot run a bench row in a memory cgroup ({e}): run without --memory-limit, "
                           "or as a user who may create and join cgroups") from None
    res = {"limit_bytes": limit, "row": spec["row"], "peak_bytes": peak, "killed": killed, "returncode": r.returncode}
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["?"])[-1][:300].replace("edgecad: error: ", "")
        res.update(tokens_per_second=None, error="killed by the memory limit" if killed else why)
        return res
    w = json.loads(r.stdout.strip().splitlines()[-1])
    tps = [x["tokens"] / x["seconds"] for x in w["runs"] if x["seconds"] > 0]
    ran = [x["config"] for x in w["runs"] if x.get("config")]  # (a doubted choice's check runs its rival once)
    res.update(peak_generating_bytes=w["peak_generating_bytes"], peak_rss_bytes=w["peak_rss_bytes"],
               tokens_per_second=statistics.median(tps), tokens_per_second_min=min(tps),
               tokens_per_second_max=max(tps), load_seconds=w["load_seconds"],
               load_bytes_read=w["load_bytes_read"],
               config=" / ".join(ran) if len(set(ran)) > 1 else w["plan"].get("config", "llama.cpp defaults"),
               plan=w["plan"],
               completions=[{"config": x.get("config"), "tokens_per_second": x["tokens"] / x["seconds"]}
                            for x in w["runs"] if x["seconds"] > 0],
               texts=[x["text"] for x in w["runs"]],
               tokens_per_pass=statistics.mean(x.get("tokens_per_pass") or 1.0 for x in w["runs"]),
               read_per_pass=statistics.mean(x.get("read_per_pass") or 0 for x in w["runs"]),
               network_per_pass=statistics.mean(x.get("network_per_pass") or 0 for x in w["runs"]))
    return res


if __name__ == "__main__":  # the bench's row worker: python -m edgecad.bench --worker JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            print(json.dumps(_worker(json.loads(sys.argv[2]))))
        except EdgecadError as e:
            sys.stderr.write(f"edgecad: error: {e}\n")
            sys.exit(1)
