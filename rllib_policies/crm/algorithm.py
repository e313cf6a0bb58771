"""CRM: learn a context-dependent weight policy from Gaussian-logged requests, offline, pessimistically
(learner.py), then deploy it only where held-out logs certify it (do no harm).

    algo = CRMConfig().environment(SessionEnv, env_config=…).crm(offline_requests=…, lam=0.25).build_algo()
    for _ in range(10): algo.train()                 # results["crm"]: V̂, SE, ESS/n, J on the training rows
    decision = algo.do_no_harm(held_out_rows, q)    # "mean", "mean_h<h>", "policy" or "logging": what is certified
    weights = algo.deployed_weights(obs, decision, q, rng)  # [B, 3], drawn from exactly that policy

Do no harm tries, in order, the learned mean with log-normal jitter h (N(m_θ(x), h²I), h = ``mean_jitter``,
then each of ``wider_jitters``) and π_θ — each shifted along (1, 1, 1) to the logs' mean log-weight when
``align_scale`` (rankings unchanged) — against the logging policy q by a paired lower bound on held-out rows;
the first certified is served as that stochastic policy, none → q. The deterministic mean exp(m_θ(x)) is
never certified, so never served by do no harm (the module's ``_forward_inference`` returns it for inspection only).

One iteration = ``steps_per_iteration`` full-batch gradient steps (one ``update_learners`` call with
``num_epochs``) on all training rows, read once on the driver (pyarrow); the reward column is r_λ (logs.Objective,
σ from these rows) or the learnt metric (metric.py). With ``num_learners`` > 0 each learner computes J on
its shard (rows of one user together) and RLlib averages the gradients.

Configuration (RLlib style; the config and the algorithm live in one module, as RLlib's own do):

    config = (CRMConfig()
              .environment(SessionEnv, env_config={"world": {...}})       # the world the logs come from
              .crm(offline_requests=storage.resolve("crm/train"), lam=0.25, init_weights=(1, 1, 10), init_sigma=1.0)
              .training(lr=0.02)
              .learners(num_learners=0))
    algo = config.build_algo()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from scipy import stats

from actors.served_policies import publish_crm
from rllib_policies import storage
from rllib_policies.algorithm_base import AlgorithmBase, AlgorithmConfigBase, set_provided
from rllib_policies.ope import (
    AbstainRule,
    DensityRatioSNIPS,
    EssCorrected,
    Estimate,
    GaussianPolicy,
    LoggedBandit,
    cluster_sums,
)

from .learner import CRMLearner
from .logs import LOG_HIGH, LOG_LOW, Objective, as_arrays
from .metric import LearntMetric
from .module import CRMPolicyModule

REWARDS = ("scalarised", "learnt_metric")


class CRMConfig(AlgorithmConfigBase):
    """AlgorithmConfig for CRM; ``.crm(...)`` sets its own options."""

    default_learner_class = CRMLearner

    def __init__(self, algo_class=None):
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
        self.mean_jitter = 0.3
        self.align_scale = True
        self.wider_jitters: tuple[float, ...] = ()
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
        mean_jitter: float = NotProvided,
        align_scale: bool = NotProvided,
        wider_jitters: tuple[float, ...] = NotProvided,
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
            confidence: z = Φ⁻¹(confidence), the pessimism of J = V̂ − z·SE; in (0.5, 1).
            min_ess_fraction: τ, the barrier's threshold on ESS/n.
            barrier_weight: κ, the barrier's weight.
            l2: Ridge penalty on the context weights W.
            steps_per_iteration: Full-batch gradient steps per ``train()`` call.
            do_no_harm_level: Deploy a learned policy only when its paired one-sided lower bound of
                V(candidate) − V(q) (ESS-corrected, on held-out rows) is > 0 at this level, Bonferroni-split over
                the candidates (algorithm.do_no_harm); in (0.5, 1).
            mean_jitter: h, the log-space std with which the learned mean is served and certified
                (N(m_θ(x), h²I) in the box: do no harm's first candidate); > 0.
            align_scale: Shift each candidate's log-space mean along (1, 1, 1), m ← m + c(x)·1 with c(x) the
                logged actions' mean log-weight minus m's, before it is certified and served. Ranking by Σ w·p
                is invariant to w → e^c·w, so the slates are unchanged (up to the box's truncation), and the
                policy's overlap with the logs — the OPE's effective sample size — is the largest over that
                redundant direction the objective cannot see.
            wider_jitters: More candidates between the jittered mean and π_θ: the learned mean with each of these
                h (> ``mean_jitter``, increasing), tried in that order after "mean" as "mean_h<h>". A wider h
                costs value but gains overlap with wide logs (E_q[(π/q)²] falls as (σ₀/h)³); every candidate
                shares the Bonferroni split.

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    @property
    def z(self) -> float:
        return float(stats.norm.ppf(self.confidence))  # one-sided: Φ⁻¹(confidence)

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
            (0.5 < self.confidence < 1.0, f"confidence must be in (0.5, 1), got {self.confidence}"),
            (0.0 <= self.min_ess_fraction < 1.0, f"min_ess_fraction must be in [0, 1), got {self.min_ess_fraction}"),
            (self.barrier_weight >= 0, f"barrier_weight must be >= 0, got {self.barrier_weight}"),
            (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
            (self.min_sigma > 0, f"min_sigma must be > 0, got {self.min_sigma}"),
            (np.all(np.asarray(self.init_sigma) > self.min_sigma), "init_sigma must be > min_sigma"),
            (self.steps_per_iteration >= 1, f"steps_per_iteration must be >= 1, got {self.steps_per_iteration}"),
            (
                0.5 < self.do_no_harm_level < 1.0,
                f"do_no_harm_level must be in (0.5, 1), got {self.do_no_harm_level}",
            ),
            (self.mean_jitter > 0, f"mean_jitter must be > 0, got {self.mean_jitter}"),
            (
                all(a < b for a, b in zip((self.mean_jitter, *self.wider_jitters), self.wider_jitters)),
                f"wider_jitters must strictly increase and exceed mean_jitter, got {self.wider_jitters}",
            ),
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


def _scalar(value) -> float:
    """A learner metric (RLlib Stats or a number) as a float."""
    return float(value.peek() if hasattr(value, "peek") else value)


def logging_policy_on(data: LoggedBandit, q: GaussianPolicy) -> GaussianPolicy:
    """The logging policy as a per-row target on ``data`` (w_i = 1 on its own logs)."""
    return GaussianPolicy(np.broadcast_to(q.mean, (len(data), q.dim)), q.cov, q.low, q.high)


NUMERICAL_ZERO = 1e-9  # a paired lower bound this close to 0 certifies nothing (float rounding of V̂ − V̂)
CANDIDATES = ("mean", "policy")  # do no harm's order ("mean_h<h>" of wider_jitters between); "logging": fallback


@dataclass(frozen=True)
class Certificate:
    """One candidate's paired comparison with the logging policy q on held-out rows."""

    estimate: Estimate  # V̂_SNIPS(candidate) with its ESS-corrected interval
    difference: float  # V̂(candidate) − V̂(q), paired on the same rows (nan when abstained)
    difference_low: float  # its one-sided lower bound (nan when abstained)
    certified: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    """Do no harm's verdict on held-out rows. ``deployed`` names what is served — exactly the policy that was
    certified: "mean" (the learned mean with log-normal jitter h, N(m_θ(x), h²I) in the box; "mean_h<h>" with a
    wider h), "policy" (π_θ,
    N(m_θ(x), σ_θ²I) in the box) or "logging" (q, nothing certified)."""

    deployed: str
    certificates: dict[str, Certificate]  # per candidate tried, in order
    logging: Estimate  # V̂(q), the logging policy's on-policy value
    level: float  # the per-candidate one-sided level (Bonferroni over the candidates)

    @property
    def deploy(self) -> bool:
        """True when a learned policy (not q) is deployed."""
        return self.deployed != "logging"

    @property
    def learned(self) -> Estimate:
        """The deployed candidate's estimate (π_θ's when nothing was certified)."""
        return self.certificates.get(self.deployed, self.certificates[list(self.certificates)[-1]]).estimate

    @property
    def difference_low(self) -> float:
        """The deployed candidate's paired lower bound (π_θ's when nothing was certified)."""
        return self.certificates.get(self.deployed, self.certificates[list(self.certificates)[-1]]).difference_low

    @property
    def reason(self) -> str:
        tried = "; ".join(f"{k}: {c.reason}" for k, c in self.certificates.items())
        return f"deployed {self.deployed} ({tried})"


class CRM(AlgorithmBase):
    metrics_key = "crm"
    config_class = CRMConfig

    def setup(self, config) -> None:
        super().setup(config)
        self.columns: dict[str, np.ndarray] | None = None
        self.user_id: np.ndarray | None = None  # groups: one user's rows stay in one learner shard
        self.logged_scale: float | None = None  # the logged actions' mean log-weight (align_scale)
        self.reward_fn = None
        self.steps = 0

    # ---------------------------------------------------------------- data
    def load_rows(self) -> None:
        """Read the request rows (on the driver with pyarrow: every row is needed here, and a Ray Data read costs
        seconds of start-up), fit the reward (r_λ's σ or the learnt metric) and the context standardisation on them,
        and hand both to every learner."""
        table = storage.read_parquet(self.config.offline_requests)
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
        self.logged_scale = float(rows["action"].mean())

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

    def jitters(self) -> dict[str, float]:
        """The learned-mean candidates, name → log-normal jitter h: "mean" (``mean_jitter``), then "mean_h<h>"
        for each of ``wider_jitters``; each is served as N(m_θ(x), h²I) in the box."""
        return {"mean": self.config.mean_jitter, **{f"mean_h{h:g}": h for h in self.config.wider_jitters}}

    def aligned(self, policy: GaussianPolicy) -> GaussianPolicy:
        """``policy`` with its mean shifted along (1, 1, 1) to the logged actions' mean log-weight (``align_scale``;
        clipped into the box): the same rankings, the most overlap with the logs."""
        if not self.config.align_scale or self.logged_scale is None:
            return policy
        mean = policy.mean + (self.logged_scale - policy.mean.mean(axis=-1, keepdims=True))
        return GaussianPolicy(np.clip(mean, LOG_LOW, LOG_HIGH), policy.cov, LOG_LOW, LOG_HIGH)

    def candidates(self, obs: np.ndarray, module=None) -> dict[str, GaussianPolicy]:
        """Do no harm's candidates for contexts ``obs``, in order (``CANDIDATES``), scale-aligned (``align_scale``)."""
        pi = self.aligned(self.policy(obs, module))  # one forward pass: the jittered means share π_θ's mean
        jittered = {
            name: GaussianPolicy(pi.mean, np.full(3, float(h)), LOG_LOW, LOG_HIGH) for name, h in self.jitters().items()
        }
        return {**jittered, "policy": pi}

    def deployed_policy(
        self, obs: np.ndarray, decision: Decision, logging_policy: GaussianPolicy, module=None
    ) -> GaussianPolicy:
        """The served policy for contexts ``obs`` [n, d]: exactly the one ``decision`` certified (or q)."""
        if decision.deployed == "logging":
            return GaussianPolicy(
                np.broadcast_to(logging_policy.mean, (len(obs), 3)), logging_policy.cov, LOG_LOW, LOG_HIGH
            )
        return self.candidates(obs, module)[decision.deployed]

    def deployed_weights(
        self, obs: np.ndarray, decision: Decision, logging_policy: GaussianPolicy, rng: np.random.Generator
    ) -> np.ndarray:
        """One draw of the served weights per context [n, 3] (weight units): exp of a draw of the certified
        policy (exact truncated Gaussian, GaussianPolicy.sample)."""
        return np.exp(self.deployed_policy(obs, decision, logging_policy).sample(rng))

    def served_policy_params(self, decision: Decision, module=None) -> dict | None:
        """The certified policy as serving states it (``actors.served_policies.CRMPolicy``): m_θ(x)'s linear map,
        the context standardisation, the log-weight box, the served std (σ_θ for "policy", h for a learned-mean
        candidate) and the scale it is aligned to; None when q was kept (nothing to serve)."""
        if not decision.deploy:
            return None
        module = module or self.inference_module()
        with torch.no_grad():
            _, sigma = module.gaussian(module.obs_mean[None])
        jitters = self.jitters()
        if decision.deployed != "policy" and decision.deployed not in jitters:
            raise ValueError(f"decision.deployed {decision.deployed!r} is none of this run's candidates {CANDIDATES}")
        std = np.full(3, jitters[decision.deployed]) if decision.deployed in jitters else sigma.numpy()
        scale = self.logged_scale if self.config.align_scale else None
        return {
            "weight": module.weights.weight.detach().numpy(),
            "bias": module.weights.bias.detach().numpy(),
            **{k: getattr(module, k).numpy() for k in ("obs_mean", "obs_std")},
            "low": LOG_LOW,  # the box in float64, as CRM.policy states it (the module holds float32 copies)
            "high": LOG_HIGH,
            "std": std,
            "scale": scale,
            "deployed": decision.deployed,
        }

    def publish_to_serve(self, store_prefix: str, decision: Decision) -> dict | None:
        """Serve the certified policy (``served_policy_params``) as a new version of the CRM store every recommend
        replica of ``store_prefix`` follows; ``store.rollback`` restores the previous one. Returns the store's ack
        (``readers_live``: the replicas following it), or None when q was kept: the live policy stays untouched."""
        params = self.served_policy_params(decision)
        return None if params is None else publish_crm(store_prefix, params)

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
        """``do_no_harm`` (below) for this run's candidates (or ``module``'s) on held-out request rows."""
        data = self.logged_bandit(rows)
        return do_no_harm(data, self.candidates(rows["obs"], module), logging_policy, self.config.do_no_harm_level)

    # ---------------------------------------------------------------- checkpoints
    def own_state(self) -> dict:
        return {"steps": self.steps, "logged_scale": self.logged_scale}

    def set_own_state(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.logged_scale = state.get("logged_scale")


def certify(data: LoggedBandit, target: GaussianPolicy, base: GaussianPolicy, level: float) -> Certificate:
    """Paired one-sided lower bound (``level``) of Δ = V(target) − V(base) on ``data``: Δ̂ = V̂_SNIPS(target) −
    V̂_SNIPS(base) on the same rows, influence ψ_i = ψ_i(target) − ψ_i(base) summed per user (clusters),
    bound Δ̂ − t_{min(ESS_target, ESS_base, C)−1}(level)·s.e. (the ESS correction of EssCorrected). An abstained
    target estimate (AbstainRule: ESS < 50 or ESS/n < 1 %) is not certified."""
    estimator = DensityRatioSNIPS(
        interval=EssCorrected(2 * level - 1), abstain=AbstainRule(min_ess=50, min_ess_fraction=0.01)
    )
    est, base_est = estimator.estimate(data, target), estimator.estimate(data, base)
    if est.abstained:
        return Certificate(est, float("nan"), float("nan"), False, f"abstained ({est.reason})")
    psi = estimator.parts(data, target).influence()[:, 0] - estimator.parts(data, base).influence()[:, 0]
    summed = cluster_sums(psi, data.clusters)
    c = len(summed)
    se = np.sqrt(c / max(c - 1, 1) * (summed**2).sum()) / len(data)
    diff = est.value - base_est.value
    low = diff - stats.t.ppf(level, max(min(est.ess, base_est.ess, c) - 1.0, 1.0)) * se
    certified = bool(low > NUMERICAL_ZERO)  # two identical policies differ by rounding only: that is no gain
    return Certificate(est, float(diff), float(low), certified, f"paired lower bound {low:+.4f}")


def do_no_harm(
    data: LoggedBandit,
    candidates: dict[str, GaussianPolicy] | GaussianPolicy,
    logging_policy: GaussianPolicy,
    level: float,
) -> Decision:
    """Deploy the first candidate (in order) whose paired one-sided lower bound of V(candidate) − V(q) on
    held-out ``data`` is > 0 (``certify``), else q itself. Every candidate is compared with the same fallback
    q, the logging policy that produced the logs (on-policy: its weights are 1; with several logging rounds, q
    is the first round's logger and its weights are q/q̄). Each test runs at level
    1 − (1 − ``level``)/K for K candidates (Bonferroni), so P(deploying a policy worse than q) ≤ 1 − ``level``.
    What is certified is what is served: the candidates are the stochastic policies themselves (a single
    GaussianPolicy is taken as the one candidate "policy")."""
    if isinstance(candidates, GaussianPolicy):
        candidates = {"policy": candidates}
    per_test = 1.0 - (1.0 - level) / len(candidates)
    base = logging_policy_on(data, logging_policy)
    logging = DensityRatioSNIPS(interval=EssCorrected(2 * per_test - 1)).estimate(data, base)
    certificates: dict[str, Certificate] = {}
    for name, target in candidates.items():
        certificates[name] = certify(data, target, base, per_test)
        if certificates[name].certified:
            return Decision(name, certificates, logging, per_test)
    return Decision("logging", certificates, logging, per_test)
