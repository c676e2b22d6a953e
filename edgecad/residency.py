"""Where the target's weights live while it runs: one interface, one implementation per way.

`Residency` (resident): llama.cpp reads the file into memory it owns (weight repacking on: faster). `Paged`: the
native pager streams the layers the plan does not pin through a window, inside the target's share of the budget
(edgecad.pager). `Remote`: the plan's last layers live on other devices (edgecad.rpc), the rest here as the local
residency it wraps says. The engine asks its residency for everything that differs (model parameters, the load,
the context's hooks, what happens around a completion and its statistics); it never asks which one it has.
"""
from __future__ import annotations

import mmap
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

from . import native
from .config import EngineConfig
from .drafter import Drafter
from .errors import EdgecadError, RemoteLostError
from .gguf_file import GGUFInfo
from .llama import Guard, Model, ModelParams
from .pager import LazyLoad, Pager, file_mappings, finds_mappings, lazy_load, new_mapping
from .pipeline import Pipeline
from .plan import BudgetPlan, RemotePlan
from .rpc.client import watched
from .tree import TreeParams

# What a residency measures of a completion (the `edgecad` stats' keys), and their values where it measures none.
STATS = {"target_budget_bytes": None,        # the target's share of the budget (paged)
         "peak_resident_target_bytes": None,  # the most of it resident at once (None: mincore cannot see the file)
         "bytes_read": 0,                     # read from storage by the pager (the generation's passes)
         "io_wait_seconds": 0.0,              # passes waiting on the pager's reads
         "io_busy_seconds": 0.0,              # the IO thread reading (overlaps compute)
         "draft_layers_in_pass": 0,           # draft layers run while a pass waited on IO (the pipeline)
         "gate_wait_seconds": 0.0}            # chain drafting held while the target computed


class Residency:
    """The resident target: nothing to do around passes; the interface's defaults."""
    name = "resident"
    pager: Optional[Pager] = None

    def model_params(self, n_gpu_layers: int) -> ModelParams:
        """How llama.cpp loads the target: resident, read into its own buffers, weights repacked (faster). Not
        mapped: llama.cpp repacks a mapped tensor into anonymous memory and its file pages stay mapped too
        (measured on the 1.5B Q4_K_M: 1,963 MB held for a plan of 1,479; read, 1,342)."""
        return ModelParams(use_mmap=False, use_extra_bufts=True, n_gpu_layers=n_gpu_layers)

    @contextmanager
    def loading(self, path: Path, verbose: bool = False):
        """Around llama.cpp's load of the target; yields what the lazy load did (LazyLoad)."""
        yield LazyLoad(reason="not paged")

    def start(self, model: Model, info: GGUFInfo) -> None:
        """After every model is loaded (and a --storage profile charged for what the loads read)."""

    def tree_params(self, cfg: EngineConfig) -> Optional[TreeParams]:
        """The mode's tree parameters for this residency, unless the caller fixed them. The cost-aware cap
        measured +13% tok/s paged but -7% resident (scripts/eval_fallback.py): a resident target's passes are
        cheap, LLMCad's threshold alone does better."""
        if cfg.tree_params is None or cfg.tree_params_given:
            return cfg.tree_params
        return replace(cfg.tree_params, cost_aware=False)

    def target_hooks(self) -> dict:
        """Keyword arguments of the target's Context (llama.cpp's cb_eval, what runs after a decode)."""
        return {}

    def draft_hooks(self) -> dict:
        """Keyword arguments of the draft's Context: with the pipeline, the gate that lets it draft beside a
        target pass. A resident target's pass never waits: nothing to overlap, no pipeline."""
        return {}

    def pipeline(self, drafter: Drafter) -> Optional[Pipeline]:
        """What drafts beside the target's passes (edgecad.pipeline), None without the pipeline."""
        return None

    def begin_completion(self) -> None:
        """Before a completion: back to a known state."""

    def prompt_done(self) -> None:
        """The completion's prompt is processed: its measurements from here on are the generation's."""

    def completion_stats(self, stats) -> dict:
        """What this residency measured during the completion's generation (STATS' keys and its own), given the
        decoder's counters (edgecad.decode.Stats)."""
        return dict(STATS)

    def close(self) -> None:
        pass


class Paged(Residency):
    """The target paged by the native pager inside its share of the budget (plan: the paging plan)."""
    name = "paged"

    def __init__(self, plan: BudgetPlan, pipeline: bool = False):
        """pipeline: draft beside the passes while they wait on storage (the memory plan's choice by default)."""
        self.plan, self.pipelined, self.pager, self._before, self._mappings = plan, pipeline, None, None, set()

    def model_params(self, n_gpu_layers: int) -> ModelParams:
        return ModelParams(use_mmap=True, use_extra_bufts=False, n_gpu_layers=n_gpu_layers)  # pages stay the file's

    @contextmanager
    def loading(self, path: Path, verbose: bool = False):
        """llama.cpp maps the file without reading it (lazy_load): the pager reads what the plan keeps."""
        self._mappings = file_mappings(path) if finds_mappings() else None
        with lazy_load(path) as how:
            yield how
        if not how.applied and verbose:
            sys.stderr.write(f"edgecad: the target is read whole at load, then evicted ({how.reason})\n")

    def start(self, model: Model, info: GGUFInfo) -> None:
        # its reads are throttled by the pager itself (a --storage profile charges only the loads' reads)
        self.pager = Pager(model, info, self.plan, new_mapping(model.path, self._mappings))

    def tree_params(self, cfg: EngineConfig) -> Optional[TreeParams]:
        return cfg.tree_params

    def target_hooks(self) -> dict:
        return dict(cb_eval=self.pager.cb_eval, cb_eval_user_data=self.pager.handle, after_decode=self.pager.after_pass)

    def draft_hooks(self) -> dict:
        return dict(cb_eval=self.pager.gate_cb_eval, cb_eval_user_data=self.pager.handle) if self.pipelined else {}

    def pipeline(self, drafter: Drafter) -> Optional[Pipeline]:
        return Pipeline(self.pager, drafter) if self.pipelined else None

    def begin_completion(self) -> None:
        self.pager.recover()
        self.pager.reset_peak()
        self._before = self.pager.stats()

    def prompt_done(self) -> None:
        self._before = self.pager.stats()  # (the peak stays the completion's)

    def completion_stats(self, stats) -> dict:
        after, before = self.pager.stats(), self._before
        diff = lambda k: after[k] - before[k]
        # (None when mincore cannot see this file's pages: pager.mincore_sees)
        peak = after["peak_resident"] if self.pager.measured else None
        return {"target_budget_bytes": self.plan.budget, "peak_resident_target_bytes": peak,
                "bytes_read": diff("bytes_read"), "io_wait_seconds": diff("io_wait_ns") / 1e9,
                "io_busy_seconds": diff("io_busy_ns") / 1e9, "draft_layers_in_pass": diff("draft_layers_in_pass"),
                "gate_wait_seconds": diff("gate_wait_ns") / 1e9}

    def close(self) -> None:
        if self.pager is not None:
            self.pager.close()
            self.pager = None


class Remote(Residency):
    """The target's last layers on remote devices (the plan's remote split), the rest here as `local` holds it."""

    def __init__(self, local: Residency, plan: RemotePlan, target: GGUFInfo):
        """target: the whole target (its layers on the devices are dropped from this device after the load)."""
        self.local, self.plan, self.target, self.name = local, plan, target, local.name

    @property
    def pager(self) -> Optional[Pager]:
        return self.local.pager

    def model_params(self, n_gpu_layers: int) -> ModelParams:
        """The local residency's parameters, the last layers offloaded to the devices, llama.cpp's calls watched."""
        if n_gpu_layers:
            raise EdgecadError("target_gpu_layers with remote devices: llama.cpp offloads the target's last layers "
                               "to one or the other; keep target_gpu_layers=0 with remote")
        return replace(self.local.model_params(0), **self.plan.model_params(), guard=WATCHED)

    @contextmanager
    def loading(self, path: Path, verbose: bool = False):
        with self.local.loading(path, verbose) as how:
            yield how
        forget_layers(path, self.target, self.plan.first)  # what the load read to send them

    def start(self, model: Model, info: GGUFInfo) -> None:
        self.local.start(model, info)

    def tree_params(self, cfg: EngineConfig) -> Optional[TreeParams]:
        return self.local.tree_params(cfg)

    def target_hooks(self) -> dict:
        return self.local.target_hooks()

    def draft_hooks(self) -> dict:
        return self.local.draft_hooks()

    def pipeline(self, drafter: Drafter) -> Optional[Pipeline]:
        return self.local.pipeline(drafter)

    def begin_completion(self) -> None:
        self.local.begin_completion()

    def prompt_done(self) -> None:
        self.local.prompt_done()

    def completion_stats(self, stats) -> dict:
        """The local residency's, the layers on each device and the bytes the passes moved over the network
        (estimated: activations in and out of each device)."""
        r = self.plan
        return {**self.local.completion_stats(stats),
                "remote_layers": {f"{d.name} {d.endpoint}": c for d, c in zip(r.devices, r.counts)},
                "network_bytes": r.net_bytes(stats.prompt_tokens - stats.prompt_reused + stats.draft_tokens
                                             + stats.target_passes, stats.prompt_tokens + len(stats.token_ids))}

    def close(self) -> None:
        self.local.close()


class _Watched(Guard):
    """llama.cpp's calls that may reach a remote device run in watched threads (edgecad.rpc.client.watched)."""

    def call(self, what: str, fn, *args):
        return watched(fn, *args, what=what)

    def release(self, fn, ptr) -> None:
        try:
            watched(fn, ptr, what="while closing")
        except RemoteLostError:  # (once a device is lost, freeing would wait on it for good: left to the exit)
            pass


WATCHED = _Watched()


def forget_layers(path: Path, info: GGUFInfo, first: int) -> None:
    """Drop what the load read of layers first.. to send them (never read here again): out of this process's
    mappings of the file (llama.cpp read them through its mapping), then out of the page cache. Whole pages
    only: a page shared with a local layer stays."""
    page = mmap.PAGESIZE
    spans = [(-(-l.start // page) * page, l.end // page * page) for l in info.layers()[first:]]
    for addr, off, length in file_mappings(path):
        for lo, hi in spans:
            lo, hi = max(lo, off), min(hi, off + length)
            if hi > lo:
                native.libc.madvise(addr + lo - off, hi - lo, mmap.MADV_DONTNEED)  # (best effort)
    fd = os.open(path, os.O_RDONLY)
    try:
        for lo, hi in spans:
            os.posix_fadvise(fd, lo, max(hi - lo, 0), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def merged_stats(parts: list[dict]) -> dict:
    """A completion's residency measurements across the plans it moved through (edgecad.moves): counts and
    seconds summed, the highest peak, the last plan's share."""
    out = dict(parts[-1])
    for k, v in STATS.items():
        if k == "peak_resident_target_bytes":
            peaks = [p[k] for p in parts if p.get(k) is not None]
            out[k] = max(peaks) if peaks else None
        elif v is not None:
            out[k] = sum(p.get(k, 0) for p in parts)
    return out


def residency_for(cfg: EngineConfig) -> Residency:
    """The residency a configuration asks for: paged when its plan has a paging plan (with the pipeline if it says),
    wrapped in Remote when the plan puts layers on remote devices."""
    local = Paged(cfg.plan.paging, cfg.pipeline) if cfg.plan.paging is not None else Residency()
    return Remote(local, cfg.plan.remote, cfg.target_info) if cfg.plan.remote is not None else local
