"""A choice the plan doubts: the draft used or not, decided on costs this device never measured.

A plan predicts each configuration's speed from the learnt costs (edgecad.plan.costs), but a completion teaches
only the costs of the configuration that ran: a target alone never measures a tree's acceptance, a tree never
measures the target's 1-token pass. The rival's prediction then rests on priors, which measured 2x off (tree_tokens
3.7-8.4 across pairs and prompts around a prior of 6). So where the rival (the fastest plan with the draft's use the
other way) is predicted within DOUBT of the chosen and rests on a cost never measured, the engine runs it for one
completion (edgecad.moves), which measures it, and keeps whichever the measured costs then predict faster.
"""
from __future__ import annotations

from typing import Optional

from .costs import Costs
from .search import Config, MemoryPlan

DOUBT = 2.0  # a rival predicted at least 1/DOUBT of the chosen's speed is doubted while its costs are priors
             # (measured acceptance ran 2x either side of its prior: the module's docstring)


def teaches(kind: Config) -> tuple[str, ...]:
    """The learnt costs that only a completion of `kind` teaches (costs.observe): what its prediction rests on
    beyond the costs every configuration shares (the storage's read speed, measured at load)."""
    if kind.speculative:
        return ("tree_tokens", "tree_nodes", "draft_node_s", "batch_slope")
    return ("paged_byte_s",) if kind.paged else ("target_byte_s",)


def measured(costs: Costs, kind: Config) -> bool:
    """This device measured what predicting `kind` rests on (one completion of it taught its costs)."""
    return any(costs.samples(name) for name in teaches(kind))


def doubts(chosen: MemoryPlan, rival: MemoryPlan) -> Optional[str]:
    """Why `chosen` is doubted against `rival` (both planned at one budget from the same costs), or None: the rival
    uses the draft the other way, is predicted at least 1/DOUBT of the chosen's speed, and rests on costs this
    device never measured."""
    if rival.speculative == chosen.speculative or measured(chosen.costs, rival.kind):
        return None
    if rival.tokens_per_second * DOUBT < chosen.tokens_per_second:
        return None
    return (f"checking {rival.config} (predicted {rival.tokens_per_second:.2f} tok/s against {chosen.config}'s "
            f"{chosen.tokens_per_second:.2f} on costs this device never measured: {', '.join(teaches(rival.kind))})")
