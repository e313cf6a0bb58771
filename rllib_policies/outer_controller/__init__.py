"""The outer controller: delayed-KPI credit assignment over sessions, trained with RLlib."""

from .algorithm import OuterController, OuterControllerConfig
from .module import RankingPolicyModule
from .sessions import KPIS, SessionBatch, from_episodes, from_trajectories
from .signals import OuterSignals, SignalConfig

__all__ = [
    "OuterController",
    "OuterControllerConfig",
    "RankingPolicyModule",
    "KPIS",
    "SessionBatch",
    "from_episodes",
    "from_trajectories",
    "OuterSignals",
    "SignalConfig",
]
