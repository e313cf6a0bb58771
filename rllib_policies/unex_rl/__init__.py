"""UNEX-RL: matching, pre-ranking and ranking as cooperating agents with one global critic, the
cascading information chain (CIC), stop-gradient (SG) and category-quantile rescaling (CQR)."""

from .algorithm import ARMS, UnexRL, UnexRLConfig
from .cic import CategoryQuantileRescaler, stage_observations

__all__ = ["ARMS", "UnexRL", "UnexRLConfig", "CategoryQuantileRescaler", "stage_observations"]
