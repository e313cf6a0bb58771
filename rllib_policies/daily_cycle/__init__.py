"""The daily cycle (issue 15): serve → log → learn → gate → promote → monitor → roll back, per simulated day.

python -m rllib_policies.daily_cycle --config rllib_policies/configs/daily_cycle.yaml [--fresh]
"""

from .config import DailyCycleConfig
from .cycle import DailyCycle
from .gate import GateDecision, gate, kl_to, monitor, trust_region
from .traffic import DayTraffic, day_traffic

__all__ = [
    "DailyCycle",
    "DailyCycleConfig",
    "DayTraffic",
    "GateDecision",
    "gate",
    "kl_to",
    "monitor",
    "day_traffic",
    "trust_region",
]
