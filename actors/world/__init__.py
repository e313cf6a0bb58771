"""The simulated recommender world: catalogue, users, response, sessions, delayed return."""

from .config import PRESETS, PipelineConfig, WorldConfig
from .entities import COHORTS, Catalogue, Users, seed_sequence, user_uniform
from .metrics import dcg, ndcg_at_k
from .world import Response, Sessions, World, examination_curve

__all__ = [
    "PRESETS",
    "PipelineConfig",
    "WorldConfig",
    "COHORTS",
    "Catalogue",
    "Users",
    "seed_sequence",
    "user_uniform",
    "dcg",
    "ndcg_at_k",
    "Response",
    "Sessions",
    "World",
    "examination_curve",
]
