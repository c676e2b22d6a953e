"""Where the target's weights live while it runs: one interface, one implementation per way.

`Resident`: llama.cpp reads the file into memory it owns (weight repacking on: faster). `Paged`: the
native pager streams the layers the plan does not pin through a window, inside the target's share of the
budget (edgecad.pager). The engine asks its residency for everything that differs (model parameters, the
load, the context's hooks, what happens around a completion and its statistics); it never asks which one
it has. A GPU or a remote residency would be one more implementation.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .gguf_file import GGUFInfo
from .llama import Model, ModelParams
from .pager import BudgetPlan, LazyLoad, Pager, file_mappings, lazy_load, new_mapping
from .config import EngineConfig
from .drafter import Drafter
from .pipeline import Pipeline
from .tree import TreeParams


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

    def completion_stats(self) -> dict:
        """What this residency measured during the completion's generation (the `edgecad` stats' paging keys)."""
        return {}

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
        self._mappings = file_mappings(path)
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

    def completion_stats(self) -> dict:
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


def residency_for(cfg: EngineConfig) -> Residency:
    """The residency a configuration asks for: paged when its plan has a paging plan (with the pipeline if it says)."""
    return Paged(cfg.plan.paging, cfg.pipeline) if cfg.plan.paging is not None else Residency()
