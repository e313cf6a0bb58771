"""CRM: a context-dependent weight policy learnt offline from Gaussian-logged requests by gradient ascent
on a pessimistic off-policy objective (Jeunen et al., arXiv 2405.02141). See docs/ope.md,
"Learning a weight policy from logs"."""

from .algorithm import CRM, CRMConfig, Decision
from .learner import CRMLearner, pessimistic_objective
from .logs import LoggedStates, Objective, logging_policy, request_dataset, request_rows, simulate_gaussian_logs
from .metric import LearntMetric
from .module import CRMPolicyModule

__all__ = [
    "CRM",
    "CRMConfig",
    "CRMLearner",
    "CRMPolicyModule",
    "Decision",
    "LearntMetric",
    "LoggedStates",
    "Objective",
    "logging_policy",
    "pessimistic_objective",
    "request_dataset",
    "request_rows",
    "simulate_gaussian_logs",
]
