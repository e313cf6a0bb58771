"""CRMConfig: the typed options of the pessimistic weight-policy learner (RLlib's config style).

config = (CRMConfig()
          .environment(SessionEnv, env_config={"world": {...}})       # the world the logs come from
          .crm(offline_requests="runs/crm/train/", lam=0.25, init_weights=(1, 1, 10), init_sigma=1.0)
          .training(lr=0.02)
          .learners(num_learners=0))
algo = config.build_algo()
"""

from __future__ import annotations

import numpy as np
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_policies.algorithm_base import AlgorithmConfigBase, set_provided
from rllib_policies.ope import normal_quantile

from .learner import CRMLearner
from .logs import LOG_HIGH, LOG_LOW
from .module import CRMPolicyModule

REWARDS = ("scalarised", "learnt_metric")


class CRMConfig(AlgorithmConfigBase):
    """AlgorithmConfig for CRM; ``.crm(...)`` sets its own options."""

    default_learner_class = CRMLearner

    def __init__(self, algo_class=None):
        from .algorithm import CRM  # noqa: PLC0415 - algorithm.py imports this module

        super().__init__(algo_class=algo_class or CRM)
        self.offline_requests = None
        self.lam = 0.25
        self.reward = "scalarised"
        self.metric_kpi = "revenue"
        self.metric_signals = ("clicks", "long_views", "purchases")
        self.init_weights = (1.0, 1.0, 10.0)
        self.init_sigma = 1.0
        self.learn_sigma = True
        self.min_sigma = 0.2
        self.confidence = 0.95
        self.min_ess_fraction = 0.2
        self.barrier_weight = 0.01
        self.l2 = 1.0
        self.steps_per_iteration = 50
        self.do_no_harm_level = 0.95
        self.lr = 0.01
        self.num_env_runners = 0

    def crm(
        self,
        *,
        offline_requests: str | list[str] | None = NotProvided,
        lam: float = NotProvided,
        reward: str = NotProvided,
        metric_kpi: str = NotProvided,
        metric_signals: tuple[str, ...] = NotProvided,
        init_weights: tuple[float, float, float] = NotProvided,
        init_sigma: float | tuple[float, float, float] = NotProvided,
        learn_sigma: bool = NotProvided,
        min_sigma: float = NotProvided,
        confidence: float = NotProvided,
        min_ess_fraction: float = NotProvided,
        barrier_weight: float = NotProvided,
        l2: float = NotProvided,
        steps_per_iteration: int = NotProvided,
        do_no_harm_level: float = NotProvided,
    ) -> CRMConfig:
        """Sets CRM's own options.

        Args:
            offline_requests: Request-row Parquet path(s) (``logs.request_dataset`` output); required.
            lam: The objective r_λ = λ·clicks/σ_clicks + (1 − λ)·long_views/σ_long_views, λ ∈ [0, 1].
            reward: "scalarised" (r_λ) or "learnt_metric" (metric.LearntMetric fitted on the same rows).
            metric_kpi: The learnt metric's North-Star KPI (a request-row column summed per user).
            metric_signals: The learnt metric's short-term per-request signals (request-row columns).
            init_weights: The policy's mean at init (weight units; usually the logging mean μ₀).
            init_sigma: σ_θ at init (log space; usually the logging σ₀, so π_θ = q at init).
            learn_sigma: Learn σ_θ (else it stays at ``init_sigma``).
            min_sigma: σ_θ's floor (log space).
            confidence: z = Φ⁻¹(confidence), the pessimism of J = V̂ − z·SE.
            min_ess_fraction: τ, the barrier's threshold on ESS/n.
            barrier_weight: κ, the barrier's weight.
            l2: Ridge penalty on the context weights W.
            steps_per_iteration: Full-batch gradient steps per ``train()`` call.
            do_no_harm_level: Deploy π_θ only when its one-sided lower bound at this level (ESS-corrected,
                on held-out rows) beats the logging mean's estimate.

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    @property
    def z(self) -> float:
        return normal_quantile(2 * self.confidence - 1)  # one-sided: Φ⁻¹(confidence)

    def validate(self) -> None:
        super().validate()
        if self.offline_requests is None:
            raise ValueError("crm(offline_requests=…) is required: CRM learns from logged request rows (crm/logs.py)")
        if self.env is None:
            raise ValueError(
                "CRM needs .environment(SessionEnv, env_config=…): the world whose logs it reads (its spaces: the "
                "request context and the ranking weights)"
            )
        checks = [
            (0.0 <= self.lam <= 1.0, f"lam must be in [0, 1], got {self.lam}"),
            (self.reward in REWARDS, f"reward must be one of {REWARDS}, got {self.reward!r}"),
            (0.5 <= self.confidence < 1.0, f"confidence must be in [0.5, 1), got {self.confidence}"),
            (0.0 <= self.min_ess_fraction < 1.0, f"min_ess_fraction must be in [0, 1), got {self.min_ess_fraction}"),
            (self.barrier_weight >= 0, f"barrier_weight must be >= 0, got {self.barrier_weight}"),
            (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
            (self.min_sigma > 0, f"min_sigma must be > 0, got {self.min_sigma}"),
            (np.all(np.asarray(self.init_sigma) > self.min_sigma), "init_sigma must be > min_sigma"),
            (self.steps_per_iteration >= 1, f"steps_per_iteration must be >= 1, got {self.steps_per_iteration}"),
            (0.5 <= self.do_no_harm_level < 1.0, f"do_no_harm_level must be in [0.5, 1), got {self.do_no_harm_level}"),
            (
                np.shape(self.init_weights) == (3,) and np.all(np.asarray(self.init_weights) > 0),
                f"init_weights must be 3 positive weights, got {self.init_weights}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=CRMPolicyModule,
            model_config={
                "init_mean": np.clip(np.log(np.asarray(self.init_weights, np.float64)), LOG_LOW, LOG_HIGH).tolist(),
                "init_sigma": np.broadcast_to(np.asarray(self.init_sigma, np.float64), (3,)).tolist(),
                "low": LOG_LOW.tolist(),
                "high": LOG_HIGH.tolist(),
                "min_sigma": self.min_sigma,
                "learn_sigma": self.learn_sigma,
            },
        )
