"""`edgecad doctor`: what this device can do, and what edgecad would run on it.

Cores, memory (the process's cgroup limit too), the storage read speed of the models' directory
(measured), the llama.cpp backends and devices of this build, the plan the automatic configuration
makes for a model pair inside a budget, with its predicted speed, and the costs this device learnt for the
pair (which it can forget: `reset`).
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Optional

from . import cgroup, devices, registry
from .errors import EdgecadError
from .follow import signals
from .gguf_file import read_gguf
from .llama import default_threads
from .config import resolve
from .measure import READ_SAMPLE, auto_budget, load_costs, measure_read, reset_costs
from .native import can_page, capabilities, owned_supported
from .pager import mincore_sees
from .plan import MB, Costs, parse_memory
from .plan.costs import HISTORY, STARVED
from .tree import MODE_PARAMS


def _mount(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path`, from /proc/mounts."""
    best = ("", "?")
    try:
        for line in open("/proc/mounts"):
            dev, mnt, fs = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[0]):
                best = (mnt, fs)
    except OSError:
        pass
    return best


COSTS = {  # the learnt costs doctor shows: what each one is (edgecad.plan.costs.Costs)
    "read_bps": "bytes/s read from the models' storage",
    "target_byte_s": "seconds of a resident 1-token target pass per byte",
    "batch_slope": "a k-token pass costs 1 + slope x (k - 1) 1-token passes",
    "paged_byte_s": "seconds a paged pass computes longer per streamed byte",
    "draft_node_s": "seconds of drafting per node per GB of draft",
    "tree_nodes": "drafted nodes per pass",
    "tree_tokens": "tokens per pass of a tree",
}


def report(target=None, draft=None, memory_budget="auto", n_ctx: int = 4096, measure: bool = True,
           out=sys.stdout, explain=str, reset: Optional[str] = None) -> None:
    """The report for `target` (default: the registry's default pair) with `draft` (None: the target alone, as
    an engine runs it); explain: an error as the caller names its arguments (the CLI: its flags); reset: "pair"
    forgets the costs this device learnt for the pair first, "all" every learnt cost."""
    say = lambda k, v: out.write(f"{k:<13} {v}\n")
    _device(say, explain)
    if reset == "all":
        _reset(say, reset_costs, "every learnt cost")

    if target is None:
        target, draft = registry.DEFAULT_TARGET, draft or registry.DEFAULT_DRAFT
    try:
        t_path = registry.resolve(target)
        d_path = registry.resolve(draft) if draft is not None else None
    except EdgecadError as e:
        say("models", explain(str(e)))
        return
    t, d = read_gguf(t_path), read_gguf(d_path) if d_path is not None else None
    mnt, fs = _mount(t_path.resolve().parent)
    say("models", f"target {t_path.name} ({t.file_size / MB:,.0f} MB), "
                  + (f"draft {d_path.name} ({d.file_size / MB:,.0f} MB)" if d else "no draft (the target alone)")
                  + f" in {t_path.parent} ({fs} on {mnt or '?'})")
    if fs.startswith("fuse") or str(t_path.resolve()).startswith(("/storage/emulated", "/sdcard")):
        say("  warning", "a FUSE-mounted shared folder reads slowly and cannot be paged well: keep models on "
                         "internal storage (e.g. Termux's $HOME)")
    if not mincore_sees(t_path):
        say("  warning", f"this user neither owns nor may write {t_path.name}, so the kernel hides which of its "
                         "pages are in RAM (mincore): a paged target's resident figures are not reported "
                         "(peak_resident_target_bytes None); the budget still holds")
    n_threads = default_threads()
    if reset == "pair":
        _reset(say, lambda: reset_costs(t, d, n_threads), "the costs this device learnt for this pair")
    costs = load_costs(t, d, n_threads)
    if measure:
        sys.stderr.write(f"measuring the read speed of {t_path.parent} ({min(READ_SAMPLE, t.file_size) / MB:,.0f} "
                         "MB, dropped from the page cache first)...\n")
        costs = measure_read(costs, t, d, n_threads)  # the engine's own calibration, done once
    say("storage", f"{costs.read_bps / 1e9:.2f} GB/s sequential read"
                   + (" (measured)" if costs.read_measured else " (a prior: run without --no-measure)"))
    parse_memory(memory_budget, t.file_size + (d.file_size if d else 0), auto_budget)  # a malformed budget: the command's error
    tree = MODE_PARAMS["tree"]
    try:
        plan = resolve(t_path, d_path, memory_budget=memory_budget, n_ctx=n_ctx, n_threads=n_threads,
                       calibrate=False).plan  # (measured above, or not at all with --no-measure)
    except EdgecadError as e:
        say("plan", explain(str(e)))
        return
    for i, line in enumerate(plan.describe().splitlines()):
        say("plan" if i == 0 else "", line.strip() if i == 0 else line)
    if plan.speculative:
        say("tree", f"up to {tree.max_nodes} nodes, depth {tree.max_depth}, {tree.max_width} branches per node, "
                    f"{tree.fallback} fallback threshold from {tree.threshold_init} in [{tree.threshold_min}, "
                    f"{tree.threshold_max}]")
    basis = "measured on this device" if costs.history else "priors (corrected after every completion)"
    say("expected", f"{plan.tokens_per_second:.2f} tokens/s ({plan.config}; costs: {basis})")
    _costs(say, costs, [k for k in COSTS if d is not None or k in ("read_bps", "target_byte_s", "paged_byte_s")])


def _costs(say, costs: Costs, names: list) -> None:
    """The learnt costs: each one's value, what it is, and what it follows (observations, a measurement, the
    prior); how many completions taught them and how many were starved."""
    starved = (f", {costs.starved} of them starved of CPU (on a core under {STARVED:.0%} of their time: they "
               "taught nothing)" if costs.starved else "")
    say("costs", f"learnt from {costs.observed} completions{starved}; `edgecad doctor --reset-costs` forgets them")
    for name in names:
        n = len(costs.samples(name))
        if n:
            basis = f"learnt from the last {n} observations" if n == HISTORY else \
                f"learnt from {n} observation{'s' * (n > 1)}"
        else:
            basis = "measured" if name == "read_bps" and costs.read_measured else "prior"
        say("", f"  {name:<14} {getattr(costs, name):<10.4g} {COSTS[name]} ({basis})")


def _reset(say, forget, what: str) -> None:
    """Forget learnt costs (measure.reset_costs), said in one line."""
    try:
        path, n = forget()
    except OSError as e:
        say("reset", f"could not forget {what}: {e.strerror or e} ({e.filename}); remove that file by hand")
        return
    say("reset", f"forgot {what}: {n} entr{'y' if n == 1 else 'ies'} removed from {path}" if n else
        f"nothing learnt to forget in {path}")


def _device(say, explain) -> None:
    """The report's lines on this device, whatever the models: machine, memory, native library, backends,
    placement."""
    import psutil
    import llama_cpp

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say("machine", f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} cores ({cpus} usable), "
                   f"Python {platform.python_version()}, llama-cpp-python {getattr(llama_cpp, '__version__', '?')}")
    vm, limit = psutil.virtual_memory(), cgroup.limit()
    say("memory", f"{vm.total / 1e9:.1f} GB RAM, {vm.available / 1e9:.1f} GB available; cgroup limit "
                  + (f"{limit / 1e9:.2f} GB" if limit else "none") + "; " + explain("memory_budget='auto'")
                  + f" = {auto_budget() / 1e9:.2f} GB")
    say("signals", "a running engine follows " + signals() + " (Engine(follow_memory=...))")
    say("native", ", ".join(f"{k.replace('_', ' ')} {'yes' if v else 'no'}" for k, v in capabilities().items())
        + ("" if can_page() else ": a model that does not fit cannot be paged here"))
    say("paging", "streamed layers in memory edgecad owns, read with direct IO (PagerParams(memory='owned'))"
        if owned_supported() else "streamed layers through the page cache: this llama.cpp's tensor layout is not "
        "the one edgecad knows (reinstall edgecad against this llama-cpp-python)")
    devs = devices.devices()
    gpu = devices.gpu()
    say("backends", ", ".join(devices.backends()) + "; devices: "
        + ", ".join(f"{d.name} ({d.description}, {d.kind})" for d in devs))
    say("placement", f"draft on {gpu.name}, target on the CPU" if gpu else
        "draft and target on the CPU (no GPU backend in this llama.cpp: docs/devices.md)")
