"""UNEX-RL: matching, pre-ranking and ranking as cooperating agents with one global critic, the
cascading information chain (CIC), stop-gradient (SG) and category-quantile rescaling (CQR)."""

from .algorithm import ARMS, UnexRL, UnexRLConfig
from .cic import STAGES, CategoryQuantileRescaler, Requests, stage_observations

__all__ = ["ARMS", "UnexRL", "UnexRLConfig", "STAGES", "CategoryQuantileRescaler", "Requests", "stage_observations"]
