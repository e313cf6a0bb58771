"""CRM: learn a context-dependent weight policy from Gaussian-logged requests, offline, pessimistically
(learner.py), then deploy it only where held-out logs certify it (do no harm).

    algo = CRMConfig().environment(SessionEnv, env_config=…).crm(offline_requests=…, lam=0.25).build_algo()
    for _ in range(10): algo.train()                 # results["crm"]: V̂, SE, ESS/n, J on the training rows
    decision = algo.do_no_harm(held_out_rows)       # deploy π_θ or keep the logging mean μ₀
    weights = algo.deployed_weights(obs, decision)  # [B, 3]

One iteration = ``steps_per_iteration`` full-batch gradient steps (one ``update_learners`` call with
``num_epochs``) on all training rows, read once with Ray Data; the reward column is r_λ (logs.Objective,
σ from these rows) or the learnt metric (metric.py). With ``num_learners`` > 0 each learner computes J on
its shard (rows of one user together) and RLlib averages the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from scipy import stats

from rllib_policies.algorithm_base import AlgorithmBase
from rllib_policies.ope import (
    AbstainRule,
    DensityRatioSNIPS,
    EssCorrected,
    Estimate,
    GaussianPolicy,
    LoggedBandit,
    cluster_sums,
)

from .config import CRMConfig
from .logs import LOG_HIGH, LOG_LOW, Objective, as_arrays
from .metric import LearntMetric


def _scalar(value) -> float:
    """A learner metric (RLlib Stats or a number) as a float."""
    return float(value.peek() if hasattr(value, "peek") else value)


def logging_policy_on(data: LoggedBandit, q: GaussianPolicy) -> GaussianPolicy:
    """The logging policy as a per-row target on ``data`` (w_i = 1 on its own logs)."""
    return GaussianPolicy(np.broadcast_to(q.mean, (len(data), q.dim)), q.cov, q.low, q.high)


@dataclass(frozen=True)
class Decision:
    """Do no harm's verdict on held-out rows: deploy π_θ only if it is certified better than the logging policy."""

    deploy: bool
    learned: Estimate  # V̂(π_θ) with its ESS-corrected interval
    logging: Estimate  # V̂(q), the logging policy's on-policy value
    difference_low: float  # the paired one-sided lower bound of V(π_θ) − V(q)
    reason: str


class CRM(AlgorithmBase):
    metrics_key = "crm"
    config_class = CRMConfig

    def setup(self, config) -> None:
        super().setup(config)
        self.columns: dict[str, np.ndarray] | None = None
        self.user_id: np.ndarray | None = None  # groups: one user's rows stay in one learner shard
        self.reward_fn = None
        self.steps = 0

    # ---------------------------------------------------------------- data
    def load_rows(self) -> None:
        """Read the request rows with Ray Data, fit the reward (r_λ's σ or the learnt metric) and the
        context standardisation on them, and hand both to every learner."""
        ds = ray.data.read_parquet(self.config.offline_requests, num_cpus=0.25).materialize()
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        if table.num_rows < 2:
            raise ValueError(f"{self.config.offline_requests!r} holds {table.num_rows} request rows; need at least 2")
        rows = as_arrays(table)
        d = self.inference_module().observation_space.shape[0]
        if rows["obs"].shape[1] != d:
            raise ValueError(f"logged context has dimension {rows['obs'].shape[1]}; the env's observation has {d}")
        self.reward_fn = (
            LearntMetric.fit(rows, self.config.metric_kpi, tuple(self.config.metric_signals))
            if self.config.reward == "learnt_metric"
            else Objective.fitted(self.config.lam, rows)
        )
        mean, std = rows["obs"].mean(0), rows["obs"].std(0)
        self.learner_group.foreach_learner(
            lambda learner: learner.module[DEFAULT_MODULE_ID].unwrapped().set_obs_scale(mean, std)
        )
        self.columns = {
            Columns.OBS: rows["obs"],
            Columns.ACTIONS: rows["action"].astype(np.float32),
            "log_propensity": rows["log_propensity"].astype(np.float32),
            "rewards": self.reward_fn(rows).astype(np.float32),
        }
        self.user_id = rows["user_id"]

    def training_step(self) -> None:
        if self.columns is None:
            self.load_rows()
        results = self.update_learners(
            self.columns, groups=self.user_id, num_epochs=self.config.steps_per_iteration, shuffle_batch_per_epoch=False
        )
        self.steps += self.config.steps_per_iteration
        last = results[0][DEFAULT_MODULE_ID] if isinstance(results, list) else results[DEFAULT_MODULE_ID]
        fit = {k: _scalar(last[k]) for k in ("objective", "value", "se", "ess_fraction")}
        self.metrics.log_dict({**fit, "steps": self.steps}, key=self.metrics_key, window=1)

    # ---------------------------------------------------------------- the policy on the driver
    def policy(self, obs: np.ndarray, module=None) -> GaussianPolicy:
        """π_θ(·|x_i) for contexts [n, d] as an OPE target (rllib_policies.ope)."""
        module = module or self.inference_module()
        with torch.no_grad():
            mean, sigma = module.gaussian(torch.as_tensor(np.asarray(obs, np.float32)))
        return GaussianPolicy(mean.numpy().astype(np.float64), sigma.numpy().astype(np.float64), LOG_LOW, LOG_HIGH)

    def logged_bandit(self, rows: dict[str, np.ndarray]) -> LoggedBandit:
        """Held-out request rows (logs.as_arrays) as an OPE table with this run's reward."""
        return LoggedBandit(
            context=rows["obs"],
            action=rows["action"],
            reward=self.reward_fn(rows)[:, None],
            propensity=np.exp(rows["log_propensity"]),
            clusters=rows["user_id"],
        )

    def do_no_harm(self, rows: dict[str, np.ndarray], logging_policy: GaussianPolicy, module=None) -> Decision:
        """``do_no_harm`` (below) for this run's π_θ (or ``module``'s) on held-out request rows."""
        data = self.logged_bandit(rows)
        return do_no_harm(data, self.policy(rows["obs"], module), logging_policy, self.config.do_no_harm_level)

    # ---------------------------------------------------------------- checkpoints
    def own_state(self) -> dict:
        return {"steps": self.steps}

    def set_own_state(self, state: dict) -> None:
        self.steps = int(state["steps"])


def do_no_harm(data: LoggedBandit, target: GaussianPolicy, logging_policy: GaussianPolicy, level: float) -> Decision:
    """Deploy π_θ iff, on held-out ``data``, the one-sided lower bound (``level``) of Δ = V(π_θ) − V(q) is
    > 0 — paired on the same rows: Δ̂ = V̂_SNIPS(π_θ) − V̂(q) with influence ψ_i = ψ_i(π_θ) − ψ_i(q) summed
    per user (clusters), half-width t_{min(ESS, C)−1}(level)·s.e. (the ESS correction of EssCorrected).
    An abstained estimate of π_θ (AbstainRule: ESS < 50 or ESS/n < 1 %) keeps μ₀. The unpaired estimates
    (π_θ's ESS-corrected interval, q's value) are reported beside it."""
    estimator = DensityRatioSNIPS(
        interval=EssCorrected(2 * level - 1), abstain=AbstainRule(min_ess=50, min_ess_fraction=0.01)
    )
    base_target = logging_policy_on(data, logging_policy)
    learned, base = estimator.estimate(data, target), estimator.estimate(data, base_target)
    if learned.abstained:
        return Decision(False, learned, base, float("nan"), f"learned policy's estimate abstained: {learned.reason}")
    psi = estimator.parts(data, target).influence()[:, 0] - estimator.parts(data, base_target).influence()[:, 0]
    summed = cluster_sums(psi, data.clusters)
    c = len(summed)
    se = np.sqrt(c / max(c - 1, 1) * (summed**2).sum()) / len(data)
    low = learned.value - base.value - stats.t.ppf(level, max(min(learned.ess, c) - 1.0, 1.0)) * se
    verdict = ">" if low > 0 else "<="
    return Decision(
        bool(low > 0), learned, base, float(low), f"paired lower bound of V(π_θ) − V(q): {low:.4f} {verdict} 0"
    )
