"""Planning, apart from running: pure functions of a device (measured before: edgecad.measure) and a budget.

    units    sizes as the user writes them ("1.5GB", "40%")
    sizes    what a model costs in memory besides its weights (KV caches, compute buffers)
    paging   the target's paging plan: pinned tensors and layers, streamed layers, the window
    remote   the split of the target's last layers onto remote devices
    costs    the cost model: measured costs, the speed they predict, how a completion corrects them
    search   the fastest configuration inside a budget: one frozen MemoryPlan per call
    doubt    a choice made on costs never measured, which the engine checks by running its rival

No module here reads a file, the clock or llama.cpp: the same inputs give the same plan.
"""
from .costs import Costs, costs_from_dict, observe
from .paging import STORAGE_PROFILES, BudgetPlan, PagerParams, plan_budget
from .remote import RemoteDevice, RemotePlan, plan_remote
from .doubt import doubts
from .search import CONFIGS, TARGET, TARGET_PAGED, TREE, TREE_PAGED, Config, Device, MemoryPlan, plan_memory
from .units import MB, MiB, parse_budget, parse_memory, parse_size

__all__ = ["Costs", "costs_from_dict", "observe", "STORAGE_PROFILES", "BudgetPlan", "PagerParams", "plan_budget", "RemoteDevice",
           "RemotePlan", "plan_remote", "CONFIGS", "TARGET", "TARGET_PAGED", "TREE", "TREE_PAGED", "Config", "Device",
           "MemoryPlan", "plan_memory", "doubts", "MB", "MiB", "parse_budget", "parse_memory", "parse_size"]
