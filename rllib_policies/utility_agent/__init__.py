"""PRL-PUTS: a one-step, two-head Q agent that picks the ranking utility weights per request, and
the λ sweep that turns it into an empirical Pareto frontier of engagement vs. long dwell."""

from .algorithm import UtilityAgent, UtilityAgentConfig
from .exploration import OBJECTIVES, ActionGrid, request_dataset, request_rows, simulate_exploration_logs, split_by_user
from .module import UtilityQModule
from .ope import InversePropensity, RewardAtHit
from .pareto import hypervolume_2d, lambda_grid, non_dominated, sweep_actions

__all__ = [
    "UtilityAgent",
    "UtilityAgentConfig",
    "OBJECTIVES",
    "ActionGrid",
    "request_dataset",
    "request_rows",
    "simulate_exploration_logs",
    "split_by_user",
    "UtilityQModule",
    "InversePropensity",
    "RewardAtHit",
    "hypervolume_2d",
    "lambda_grid",
    "non_dominated",
    "sweep_actions",
]
