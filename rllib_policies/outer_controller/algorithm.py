"""OuterController: the layered (inner reward + delayed-KPI outer controller) policy-gradient
algorithm on RLlib's new API stack, with the monolithic weighted-sum arm as a switch.

    config = (OuterControllerConfig()
              .environment(SessionEnv, env_config={...})
              .outer_controller(arm="layered", kpi_weights={"revenue": 1, "return": 2, "ndcg": 1},
                                min_sessions_for_kpi=10_000, trust_region_kl=0.5)
              .learners(num_learners=0))
    algo = config.build_algo()
    algo.warm_start("trajectories/")          # optional: behaviour cloning on logged sessions
    for _ in range(50): print(algo.train()["outer_controller"])
    algo.promote()                            # do no harm: keep π only if it beats its start

One iteration: sample ``sessions_per_iteration`` complete sessions on the env runners (or read them
from trajectory Parquet with Ray Data when ``offline_trajectories`` is set) → signals on the driver
→ up to ``num_epochs`` learner-group updates (whole sessions per learner shard) inside the trust
region KL(π_old ‖ π) ≤ δ on the batch's states (π_old: the policy before this iteration; the epoch
that crosses δ is shortened by backtracking and ends the iteration) → optionally the rollback rail
(KL(π_ref ‖ π) to the start above ``kl_rollback_threshold`` restores the last good state; off by
default: it guards live traffic after a promotion, it does not bound training) → weights synced
to the env runners.

``promote()`` is the do-no-harm check at the end of training: π and its start π_ref serve the same
simulated users with common random numbers (``actors.world.oracle.simulate_policy_sessions``);
π stays only when the paired 95 % interval of J(π) − J(π_ref) lies above 0, else the learners fall
back to π_ref.
"""

from __future__ import annotations

import copy
import logging
from typing import Self

import numpy as np
import pyarrow.dataset as pads
import ray.data
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from actors.cascade import build_world
from actors.served_policies import publish_outer_controller
from actors.telemetry import apply_returns, read_returns
from actors.world import seed_sequence
from actors.world.metrics import mean_ci
from actors.world.oracle import simulate_policy_sessions
from rllib_policies.algorithm_base import AlgorithmBase, AlgorithmConfigBase, set_provided
from rllib_policies.credit import KappaSchedule, credit_weights, kpi_credit

from . import sessions as session_data
from .learner import OuterControllerLearner
from .module import LOG_STD_MAX, RankingPolicyModule, SessionNoise
from .rails import fit_inner_reward_weights
from .signals import OuterSignals, SignalConfig

logger = logging.getLogger(__name__)
EXPLORATION = ("request", "session")


def ranking_mean_policy(module, pipeline):
    """policy(req) → {"ranking": μ(s) [B, 3]}: the module's mean action as each request's ranking weights."""

    def policy(req):
        with torch.no_grad():
            return {"ranking": module.gaussian(torch.as_tensor(pipeline.context(req)))[0].numpy()}

    return policy


def kpi_shrinkage_weights(parts: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """c_k [C] = max(0, 1 − V_k/‖ĝ_k‖²) per objective term k: ĝ_k = mean_i a_ik·ε_i is term k's share of
    the policy gradient in exploration space (a_ik: session i's advantage part, ε_i [D] its exploration
    draw) and V_k = tr Cov_i(a_ik·ε_i)/B its variance: the plug-in MSE-optimal multiplier of an unbiased
    estimate, 0 where the batch cannot tell the term's gradient from noise."""
    z = parts[:, :, None] * noise[:, None, :]  # [B, C, D]
    b = len(z)
    if b < 2:
        return np.ones(parts.shape[1])
    g2 = (z.mean(axis=0) ** 2).sum(axis=-1)
    v = z.var(axis=0, ddof=1).sum(axis=-1) / b
    return np.clip(1.0 - v / np.maximum(g2, 1e-12), 0.0, 1.0)


def paired_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval of paired differences d̄ ± t·s/√n."""
    d = np.asarray(differences, np.float64)
    if len(d) < 2:
        raise ValueError(f"a paired interval needs >= 2 differences, got {len(d)}")
    return mean_ci(d, confidence)


class OuterControllerConfig(AlgorithmConfigBase):
    """AlgorithmConfig for OuterController; ``.outer_controller(...)`` sets its own options."""

    default_learner_class = OuterControllerLearner

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or OuterController)
        # outer-controller settings (see ``outer_controller``)
        self.arm = "layered"
        self.kpi_weights = {"revenue": 1.0, "return": 1.0, "ndcg": 1.0}
        self.kappa_start = 0.2
        self.kappa_end = 0.6
        self.kappa_anneal_iters = 30
        self.kappa_kind = "linear"
        self.anneal = True
        self.credit_attention = True
        self.baseline = True
        self.baseline_alpha = 0.01
        self.reward_clip = 5.0
        self.inner_reward_weight = 1.0
        self.step_kpis = True
        self.min_sessions_for_kpi = 10_000
        self.kl_rollback_threshold = None
        self.trust_region_kl = 0.5
        self.trust_region_backtracks = 6
        self.promotion_sessions = 1000
        self.promotion_confidence = 0.95
        self.sessions_per_iteration = 64
        self.entropy_coeff = 0.0
        self.credit_loss_coeff = 0.5
        self.personalisation_l2 = 0.0
        self.offline_trajectories = None
        self.offline_advantage_temperature = 1.0
        self.exploration = "request"
        self.kpi_shrinkage = False
        self.restart_directions = 0
        self.restart_radius = 2.0
        self.restart_sessions = 32
        self.restart_at = (0,)
        # AlgorithmConfig defaults overridden
        self.gamma = 0.9
        self.lr = 3e-3
        self.num_epochs = 4
        self.normalize_actions = False  # the module emits actions in the env's units; the env clips
        self.clip_actions = False

    def outer_controller(
        self,
        *,
        arm: str | None = NotProvided,
        kpi_weights: dict[str, float] | None = NotProvided,
        kappa_start: float | None = NotProvided,
        kappa_end: float | None = NotProvided,
        kappa_anneal_iters: int | None = NotProvided,
        kappa_kind: str | None = NotProvided,
        anneal: bool | None = NotProvided,
        credit_attention: bool | None = NotProvided,
        baseline: bool | None = NotProvided,
        baseline_alpha: float | None = NotProvided,
        reward_clip: float | None = NotProvided,
        inner_reward_weight: float | None = NotProvided,
        step_kpis: bool | None = NotProvided,
        min_sessions_for_kpi: int | None = NotProvided,
        kl_rollback_threshold: float | None = NotProvided,
        trust_region_kl: float | None = NotProvided,
        trust_region_backtracks: int | None = NotProvided,
        promotion_sessions: int | None = NotProvided,
        promotion_confidence: float | None = NotProvided,
        sessions_per_iteration: int | None = NotProvided,
        entropy_coeff: float | None = NotProvided,
        credit_loss_coeff: float | None = NotProvided,
        personalisation_l2: float | None = NotProvided,
        offline_trajectories: str | list[str] | None = NotProvided,
        offline_advantage_temperature: float | None = NotProvided,
        exploration: str | None = NotProvided,
        kpi_shrinkage: bool | None = NotProvided,
        restart_directions: int | None = NotProvided,
        restart_radius: float | None = NotProvided,
        restart_sessions: int | None = NotProvided,
        restart_at: tuple[int, ...] | list[int] | None = NotProvided,
    ) -> Self:
        """Sets the outer controller's own settings.

        Args:
            arm: "layered" (inner reward + delayed-KPI outer controller) or "monolithic" (one
                weighted sum of the inner reward and the KPIs at the session's last step).
            kpi_weights: {KPI: weight} over ``sessions.KPIS``; R = Σ_k w_k·KPI_k per session.
                Changeable at run time with ``OuterController.set_kpi_weights``.
            kappa_start: κ when the KPI gate opens (0.2).
            kappa_end: κ after annealing (0.6).
            kappa_anneal_iters: gated iterations over which κ rises from start to end.
            kappa_kind: the anneal's shape, "linear" or "cosine".
            anneal: False: κ = kappa_end from the first gated iteration.
            credit_attention: gated-attention credit over the session (False: uniform credit 1/T).
            baseline: standardise each signal with a rolling EMA baseline.
            baseline_alpha: the baselines' EMA rate α ∈ [0.005, 0.02].
            reward_clip: rewards and advantages are clipped to ±reward_clip (5).
            inner_reward_weight: β, the inner reward's weight in either arm's signal (1); 0 trains on
                the KPIs alone (see signals.py).
            step_kpis: credit the KPIs that decompose over a session's requests (NDCG, revenue,
                clicks) per request, where they were earned; only the rest (the next-day return)
                is a session-level reward (True). False: every KPI at the session level.
            min_sessions_for_kpi: the KPI gate: κ = 0 until this many sessions were seen (10 000).
            kl_rollback_threshold: the rollback rail (off: None, the default): roll the learners
                back to the last good state when KL(π_ref ‖ π) to the start on the batch's states
                exceeds it. It pins a learning policy near its start; it is meant for live traffic.
            trust_region_kl: δ, the per-iteration trust region KL(π_old ‖ π_new) ≤ δ on the batch's
                states (0.5); the epochs stop at the first that crosses δ, whose step is halved
                until inside. None: every epoch runs, unbounded.
            trust_region_backtracks: halvings of the crossing epoch's step before it is undone (6).
            promotion_sessions: simulated sessions of ``promote``'s paired check (1000).
            promotion_confidence: the paired interval's level in ``promote`` (0.95).
            sessions_per_iteration: complete sessions per training batch.
            entropy_coeff: β_H, the entropy bonus's weight in the policy loss.
            credit_loss_coeff: λ_credit, the credit network's auxiliary loss weight.
            personalisation_l2: λ_p ≥ 0, the weight of mean_s ‖m(s) − m̄‖² in the loss (m: the
                policy's logits, m̄ their batch mean): it shrinks the policy toward one action for
                every state, so it personalises only where the policy gradient keeps pulling states
                apart. 0: no shrinkage.
            offline_trajectories: trajectory Parquet path(s): train from logs (Ray Data, advantage-
                weighted regression onto the logged actions) instead of sampling.
            offline_advantage_temperature: T in the offline weight exp(A_t/T).
            exploration: "request" (default): a fresh u ~ N(m(s), σ²) at every request; "session":
                one ε ~ N(0, I) per session and u_t = m(s_t) + σ·ε at each of its requests
                (``module.SessionNoise``), and each session gets one advantage (signals.py): the
                session's return then answers one direction, not T.
            kpi_shrinkage: with per-session exploration, weigh each objective term's share of the
                policy gradient by its signal-to-noise ratio on the batch, c_k = max(0, 1 − V_k/‖ĝ_k‖²)
                (``kpi_shrinkage_weights``): a term whose gradient the batch cannot tell from noise
                (a next-day-return coin flip, a rare purchase's revenue) stops drowning the others.
                Biased toward the well-measured terms; do no harm (``promote``) checks the whole J.
            restart_directions: K, exploratory restarts (0: off): at each iteration of ``restart_at``
                the policy's mean logits m̄ and K candidates m̄ + r·σ_u·d_k (d_k: K unit directions
                spread evenly over the circle when K − 1 = 2 dims, seeded Gaussian ones otherwise)
                serve the same ``restart_sessions`` simulated users with common random numbers
                (``session_objective``) and the mean moves to the best by mean J (``restart``). A
                jump outside the trust region, paired so that J's per-session noise cancels; its
                sessions count toward the budget (``restart_sessions_used``), and do no harm still
                compares with the start.
            restart_radius: r, the candidates' distance from m̄ in units of σ_u (2).
            restart_sessions: simulated sessions per candidate (32).
            restart_at: the iterations (before their batch) at which to restart ((0,)).

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    def signal_config(self) -> SignalConfig:
        return SignalConfig(
            arm=self.arm,
            gamma=self.gamma,
            kpi_weights=dict(self.kpi_weights),
            kappa=KappaSchedule(self.kappa_start, self.kappa_end, self.kappa_anneal_iters, self.kappa_kind),
            anneal=self.anneal,
            baseline=self.baseline,
            baseline_alpha=self.baseline_alpha,
            reward_clip=self.reward_clip,
            inner_reward_weight=self.inner_reward_weight,
            step_kpis=self.step_kpis,
            min_sessions_for_kpi=self.min_sessions_for_kpi,
            per_session=self.exploration == "session",
        )

    def validate(self) -> None:
        super().validate()
        self.signal_config()  # raises ValueError naming the bad field
        if self.sessions_per_iteration < 1:
            raise ValueError(f"sessions_per_iteration must be >= 1, got {self.sessions_per_iteration}")
        if self.sessions_per_iteration < max(self.num_learners, 1):
            raise ValueError(
                f"sessions_per_iteration ({self.sessions_per_iteration}) must be >= num_learners "
                f"({self.num_learners}): each learner trains on whole sessions"
            )
        if self.kl_rollback_threshold is not None and self.kl_rollback_threshold <= 0:
            raise ValueError(f"kl_rollback_threshold must be > 0 or None, got {self.kl_rollback_threshold}")
        if self.trust_region_kl is not None and not self.trust_region_kl > 0:
            raise ValueError(f"trust_region_kl must be > 0 or None, got {self.trust_region_kl}")
        if self.trust_region_backtracks < 0:
            raise ValueError(f"trust_region_backtracks must be >= 0, got {self.trust_region_backtracks}")
        if not (np.isfinite(self.personalisation_l2) and self.personalisation_l2 >= 0):
            raise ValueError(f"personalisation_l2 must be finite and >= 0, got {self.personalisation_l2}")
        if self.exploration not in EXPLORATION:
            raise ValueError(f"exploration must be one of {EXPLORATION}, got {self.exploration!r}")
        if self.kpi_shrinkage and self.exploration != "session":
            raise ValueError("kpi_shrinkage needs exploration='session' (one advantage per session to split by KPI)")
        if self.restart_directions < 0 or self.restart_directions and self.restart_sessions < 2:
            raise ValueError(
                f"restart_directions must be >= 0 and restart_sessions >= 2, got {self.restart_directions} "
                f"and {self.restart_sessions}"
            )
        if not (np.isfinite(self.restart_radius) and self.restart_radius > 0):
            raise ValueError(f"restart_radius must be finite and > 0, got {self.restart_radius}")
        if any(int(i) != i or i < 0 for i in self.restart_at):
            raise ValueError(f"restart_at must list iterations >= 0, got {self.restart_at}")
        if self.restart_directions and self.offline_trajectories is not None:
            raise ValueError("restart_directions needs online training (its candidates serve simulated sessions)")
        ground_truth = sorted(k for k in self.kpi_weights if k in session_data.GROUND_TRUTH_KPIS)
        if ground_truth and self.offline_trajectories is not None:
            k = ground_truth[0]
            raise ValueError(
                f"kpi_weights names {k!r}, which needs the simulator's ground truth "
                f"({session_data.GROUND_TRUTH_KPIS[k]}): logged trajectories cannot carry it. Training on logs "
                f"can blend {list(session_data.LOGGED_KPIS)}: drop {k!r} from kpi_weights."
            )
        if self.promotion_sessions < 2:
            raise ValueError(f"promotion_sessions must be >= 2, got {self.promotion_sessions}")
        if not 0 < self.promotion_confidence < 1:
            raise ValueError(f"promotion_confidence must be in (0, 1), got {self.promotion_confidence}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=RankingPolicyModule)

    def build_env_to_module_connector(self, env=None, spaces=None, device=None):
        """RLlib's pipeline, led by ``SessionNoise`` when exploration is per session."""
        pipeline = super().build_env_to_module_connector(env=env, spaces=spaces, device=device)
        if self.exploration == "session":
            pipeline.prepend(SessionNoise())
        return pipeline


class OuterController(AlgorithmBase):
    metrics_key = "outer_controller"
    config_class = OuterControllerConfig

    def setup(self, config) -> None:
        super().setup(config)
        self.signals = OuterSignals(self.config.signal_config())
        self.rollbacks = self.consecutive_rollbacks = 0
        self.last_batch = None
        self.last_promotion: dict | None = None
        self.restart_sessions_used = 0
        self.last_restart: dict | None = None
        self._offline_batches = None
        self._reference = self._policy_params()  # π_ref: the pre-training policy
        self._last_good = self._snapshot()

    # ---------------------------------------------------------------- data
    def _read_sessions(self) -> session_data.SessionBatch:
        """The next batch of logged sessions (cycling through the dataset)."""
        if self._offline_batches is None:
            self._dataset = ray.data.read_parquet(self.config.offline_trajectories, num_cpus=0.25)
            self._returns = read_returns(self.config.offline_trajectories)  # late KPIs the sessioniser backfilled
            self._offline_batches = iter(())
        for _ in range(2):  # the rest of this pass, then one fresh pass
            for table in self._offline_batches:
                try:
                    return session_data.from_trajectories(apply_returns(table, self._returns))
                except ValueError:  # no usable rows in this batch (no observations / unknown return): skip it
                    continue
            self._offline_batches = iter(
                self._dataset.iter_batches(batch_size=self.config.sessions_per_iteration, batch_format="pyarrow")
            )
        raise ValueError(
            f"no usable trajectories under {self.config.offline_trajectories!r} (rows need logged "
            "observations and a known 'returned')"
        )

    # ---------------------------------------------------------------- training
    def training_step(self) -> None:
        restarted = 0.0
        if self.config.restart_directions and self.iteration in self.config.restart_at:
            restarted = float(self.restart()["moved"])
        if self.config.offline_trajectories is not None:
            batch = self._read_sessions()
        else:
            batch = session_data.from_episodes(self.sample_episodes(self.config.sessions_per_iteration))
        self.last_batch = batch
        signals = self.signals.compute(batch)
        if self.config.kpi_shrinkage:
            weights = kpi_shrinkage_weights(signals["session_parts"], self._session_noise(batch))
            length = np.bincount(batch.session, minlength=batch.n_sessions)
            advantage = signals["session_parts"] @ weights / length
            signals["step_signal"] = advantage[batch.session].astype(np.float32)
            signals["metrics"] |= {f"shrinkage_{k}": float(c) for k, c in zip(signals["part_names"], weights)}
        step = self._trust_region_update(batch, signals)
        kl = self.kl_from_reference(batch.obs)
        rolled_back = self.config.kl_rollback_threshold is not None and kl > self.config.kl_rollback_threshold
        if rolled_back:
            self.learner_group.set_state(self._last_good)
            self.rollbacks += 1
            self.consecutive_rollbacks += 1
            if self.consecutive_rollbacks == 5:
                logger.warning(
                    "5 rollbacks in a row (KL %.3f > %.3f): the policy keeps leaving the trust region "
                    "around π_ref; lower lr or warm-start a new reference",
                    kl,
                    self.config.kl_rollback_threshold,
                )
        else:
            self._last_good = self._snapshot()
            self.consecutive_rollbacks = 0
        self.sync_env_runners()
        self.metrics.log_dict(
            {
                **signals["metrics"],
                **step,
                "kl_from_reference": kl,
                "rolled_back": float(rolled_back),
                "rollbacks": self.rollbacks,
                "consecutive_rollbacks": self.consecutive_rollbacks,
                "sessions_in_batch": batch.n_sessions,
                "restarted": restarted,
                "restart_sessions_used": self.restart_sessions_used,
                "mean_session_length": len(batch.t) / batch.n_sessions,
            },
            key=self.metrics_key,
            window=1,
        )

    def restart_unit_directions(self, dim: int) -> np.ndarray:
        """d [K, dim]: unit directions, evenly spread over the circle when dim = 2, else seeded Gaussian ones."""
        k = self.config.restart_directions
        if dim == 2:
            angle = 2 * np.pi * np.arange(k) / k
            return np.stack([np.cos(angle), np.sin(angle)], axis=1)
        d = seed_sequence(self.config.seed or 0, "restart-directions").normal(size=(k, dim))
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    def restart(self) -> dict:
        """Exploratory restart: the current policy and K candidates whose mean logits are moved by
        r·σ_u·d_k (the output layer's bias shifted, through U·atanh when max_logit bounds them) serve the same
        simulated users with common random numbers; the learners and env runners take the best by mean J.
        Returns (and keeps in ``last_restart``) every candidate's mean J and which one was kept."""
        cfg, module = self.config, self.inference_module()
        weights = self._policy_params()
        name = f"pi.{len(module.pi) - 1}.bias"
        raw = torch.as_tensor(weights[name])
        m = raw if module.max_logit is None else module.max_logit * torch.tanh(raw / module.max_logit)
        sigma = float(module.log_std.detach().clamp(module.log_std_min, LOG_STD_MAX).exp().mean())
        shifts = cfg.restart_radius * sigma * self.restart_unit_directions(len(raw))
        candidates = [weights]
        for shift in shifts:
            target = m + torch.as_tensor(shift, dtype=m.dtype)
            if module.max_logit is not None:
                u = module.max_logit
                target = u * torch.atanh((target / u).clamp(-0.9, 0.9))  # short of tanh's flat tails
            candidates.append({**weights, name: target.numpy().astype(weights[name].dtype)})
        seed = 10_007 * (cfg.seed or 0) + self.iteration
        j = np.array(
            [self.session_objective(c, cfg.restart_sessions, seed, stream="restart-users") for c in candidates]
        ).mean(axis=1)
        best = int(np.argmax(j))
        self.restart_sessions_used += len(candidates) * cfg.restart_sessions
        if best:
            self._push_weights(candidates[best])
            self._last_good = self._snapshot()
        self.last_restart = {"objective": j.tolist(), "kept": best, "moved": best > 0, "iteration": self.iteration}
        return self.last_restart

    def _session_noise(self, batch: session_data.SessionBatch) -> np.ndarray:
        """ε [B, K − 1] of each session's exploration draw, ε = (u₀ − m(s₀))/σ at its first request."""
        first = np.flatnonzero(batch.t == 0)
        first = first[np.argsort(batch.session[first])]
        with torch.no_grad():
            module = self.inference_module()
            m, log_std = module.logits(torch.as_tensor(batch.obs[first]))
            u = module.action_dist_cls(loc=m, scale=log_std.exp()).unsquash(torch.as_tensor(batch.actions[first]))
            return ((u - m) / log_std.exp()).numpy()

    def _update(self, batch: session_data.SessionBatch, signals: dict, num_epochs: int | None = None) -> None:
        """One learner-group update; each learner shard holds whole sessions (credit attends over them)."""
        columns = {
            Columns.OBS: batch.obs,
            Columns.ACTIONS: batch.actions,
            "session": batch.session,
            "t": batch.t,
            "engaged": batch.engaged.astype(np.float32),
            "step_signal": signals["step_signal"],
            "outer_signal": signals["outer_signal"],
            "kpi_step_signal": signals["kpi_step_signal"],
            "kappa": signals["kappa"],
        }
        self.update_learners(columns, groups=batch.session, num_epochs=num_epochs or self.config.num_epochs)

    def _trust_region_update(self, batch: session_data.SessionBatch, signals: dict) -> dict:
        """Up to ``num_epochs`` one-epoch updates inside KL(π_old ‖ π) ≤ δ on the batch's states.
        The first epoch that crosses δ is backtracked, θ = θ_e + 2^{−k}(θ − θ_e) (θ_e: before that
        epoch) for the first k that lands inside (undone after ``trust_region_backtracks`` halvings),
        and ends the iteration. δ = None: one update of ``num_epochs`` epochs, as RLlib runs it."""
        delta, x = self.config.trust_region_kl, torch.as_tensor(batch.obs)
        old = self._policy_params()
        if delta is None:
            self._update(batch, signals)
            return {"kl_step": self.kl(x, old), "epochs": float(self.config.num_epochs), "backtracked": 0.0}
        epochs, backtracked, kl = 0, 0.0, 0.0
        for _ in range(self.config.num_epochs):
            before = self._policy_params() if epochs else old
            self._update(batch, signals, num_epochs=1)
            epochs += 1
            kl = self.kl(x, old)
            if kl <= delta:
                continue
            after, backtracked = self._policy_params(), 1.0
            for k in range(1, self.config.trust_region_backtracks + 1):
                weights = {n: before[n] + 0.5**k * (after[n] - before[n]) for n in after}
                kl = self.kl(x, old, weights)
                if kl <= delta:
                    break
            else:
                weights, kl = before, self.kl(x, old, before)
            self.learner_group.set_weights({DEFAULT_MODULE_ID: weights})
            break
        return {"kl_step": kl, "epochs": float(epochs), "backtracked": backtracked}

    def warm_start(self, trajectories, iterations: int = 20) -> dict:
        """Behaviour cloning on logged sessions: maximise log π(a|s) of the logged actions (the KPI
        signals are off), then make the result the KL reference and the last good state."""
        rows = pads.dataset(trajectories, format="parquet", ignore_prefixes=[".", "_"]).to_table()
        batch = session_data.from_trajectories(apply_returns(rows, read_returns(trajectories)))
        ones = np.ones(len(batch.t), np.float32)
        for _ in range(iterations):  # A_t ≡ 1: the loss is −mean log π(a|s) (exp(0) = 1 as well offline)
            step_signal = ones * (0 if self.config.offline_trajectories else 1)
            zeros = ones * 0
            self._update(
                batch,
                {
                    "step_signal": step_signal,
                    "outer_signal": zeros,
                    "kpi_step_signal": zeros,
                    "kappa": zeros,
                },
            )
        self.sync_env_runners()
        self._reference = self._policy_params()
        self._last_good = self._snapshot()
        return {"sessions": batch.n_sessions, "steps": len(batch.t), "iterations": iterations}

    # ---------------------------------------------------------------- rails
    def _snapshot(self) -> dict:
        """A copy of the learner state (weights + optimizer). A local learner's state holds NumPy
        views of the live tensors, which the next optimizer step would change in place."""
        state = copy.deepcopy(self.learner_group.get_state(components="learner"))
        # Learner.set_state skips the weights when the stored weights_seq_no is older than its own:
        # a snapshot without it always restores.
        state["learner"].pop(WEIGHTS_SEQ_NO, None)
        return state

    def _policy_params(self) -> dict:
        """The learners' current module weights (numpy state dict)."""
        return dict(self.learner_weights()[DEFAULT_MODULE_ID])

    def policy_mean(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) under the learners' current weights."""
        with torch.no_grad():
            return self.inference_module().gaussian(torch.as_tensor(obs))[0].numpy()

    def kl(self, obs, p_weights: dict, q_weights: dict | None = None) -> float:
        """Mean over the states of KL(π_p(·|s) ‖ π_q(·|s)); q defaults to the learners' current weights."""
        x = torch.as_tensor(obs)
        with torch.no_grad():
            p = self.inference_module(weights=p_weights).action_dist(x)
            q = self.inference_module(weights=q_weights).action_dist(x)
            return float(p.kl(q).mean())

    def kl_from_reference(self, obs: np.ndarray) -> float:
        """Mean over the batch's states of KL(π_ref(·|s) ‖ π(·|s))."""
        return self.kl(obs, self._reference)

    # ---------------------------------------------------------------- do no harm
    def session_objective(
        self, weights: dict | None = None, n_sessions: int | None = None, seed: int = 0, stream: str = "promotion-users"
    ) -> np.ndarray:
        """J = Σ_k w_k·KPI_k per simulated session [n] of μ(s) under ``weights`` (default: the learners'
        current ones) with the current KPI weights; the same users and common random numbers for the
        same ``n_sessions``, ``seed`` and ``stream`` (the users' seed stream;
        ``actors.world.oracle.simulate_policy_sessions``)."""
        world, pipeline = build_world(self.config.env_config)
        n = n_sessions or self.config.promotion_sessions
        users = seed_sequence(seed, stream).integers(0, world.users.n, n)
        module = copy.deepcopy(self.inference_module(weights=weights))
        kpis = simulate_policy_sessions(pipeline, ranking_mean_policy(module, pipeline), users, seed)
        missing = sorted(set(self.signals.kpi_weights) - set(kpis))
        if missing:
            raise ValueError(f"promotion: the simulated sessions carry no {missing} (they have {sorted(kpis)})")
        return sum(w * kpis[k] for k, w in self.signals.kpi_weights.items())

    def _set_policy(self, weights: dict) -> None:
        """Load module weights into the learners and the env runners; they become the last good state."""
        self._push_weights(weights)
        self._last_good = self._snapshot()

    def _push_weights(self, weights: dict) -> None:
        """Load module weights into the learners and the env runners."""
        self.learner_group.set_weights({DEFAULT_MODULE_ID: weights})
        # no update since the last sync: the env runners would skip a sync at the same weights_seq_no,
        # so the weights are pushed without one (a missing seq no forces the update)
        state = {COMPONENT_RL_MODULE: {DEFAULT_MODULE_ID: dict(weights)}}
        self.env_runner_group.foreach_env_runner(
            lambda runner: runner.set_state(state),
            local_env_runner=self.env_runner_group.num_remote_env_runners() == 0,
        )

    def promote(self, n_sessions: int | None = None, seed: int = 0) -> dict:
        """Do no harm: π (the learners' policy) stays only when the paired interval of J(π) − J(π_ref)
        on common random numbers lies above 0; otherwise the learners and env runners fall back to
        π_ref, the start. Returns (and keeps in ``last_promotion``) both means, the paired difference
        with its half-width, and which policy was promoted."""
        j_start = self.session_objective(self._reference, n_sessions, seed)
        j_trained = self.session_objective(None, n_sessions, seed)
        diff, half = paired_interval(j_trained - j_start, self.config.promotion_confidence)
        promoted = "trained" if diff - half > 0 else "start"
        if promoted == "start":
            self._set_policy(self._reference)
        self.last_promotion = {
            "promoted": promoted,
            "j_start": float(j_start.mean()),
            "j_trained": float(j_trained.mean()),
            "difference": diff,
            "half_width": half,
            "sessions": len(j_start),
        }
        return self.last_promotion

    def publish_to_serve(self, store_prefix: str) -> dict:
        """Serve the learners' current policy (after ``promote``: the promoted one) — μ(s) (m(s)'s MLP, ``high``,
        ``max_logit``) — as a new version of the outer controller's store that every recommend replica of
        ``store_prefix`` follows (``actors.served_policies``); ``store.rollback`` restores the previous version.
        Returns the store's ack (``readers_live``: the replicas following it)."""
        module = self.inference_module()
        state = {k: v.detach().numpy() for k, v in module.pi.state_dict().items()}
        return publish_outer_controller(store_prefix, state, module.high.numpy(), module.max_logit)

    def inner_reward_weights(self, batch: session_data.SessionBatch, ridge: float = 1e-2) -> dict[str, float]:
        """Fit the inner reward's weights to the current credit: c_t = T·w_t·R (KPI units) per step."""
        if batch is None:
            raise ValueError("no training batch yet: run at least one iteration before fitting inner-reward weights")
        if "inner_features" not in batch.step_objectives:
            raise ValueError(
                "this batch has no inner-reward features (logged trajectories carry only the summed inner "
                "reward): fit inner-reward weights on online sessions"
            )
        module = self.inference_module()
        x = torch.as_tensor(np.concatenate([batch.obs, batch.actions / module.high.numpy()], axis=1))
        mask, sid, rel, (xp,) = session_data.pad_sessions(torch.as_tensor(batch.session), torch.as_tensor(batch.t), x)
        w = credit_weights(module.credit if self.config.credit_attention else None, xp, mask)
        r_outer = torch.as_tensor(self.signals.outer_reward(batch), dtype=torch.float32)
        credited = kpi_credit(w, mask, r_outer)[sid, rel].numpy()
        return fit_inner_reward_weights(batch.step_objectives["inner_features"], credited, ridge)

    def set_kpi_weights(self, weights: dict) -> None:
        """Change the outer controller's KPI weights at run time; the next iteration uses them."""
        self.signals.set_kpi_weights(weights)

    # ---------------------------------------------------------------- checkpoints
    def own_state(self) -> dict:
        return {
            "signals": self.signals.state(),
            "rollbacks": self.rollbacks,
            "consecutive_rollbacks": self.consecutive_rollbacks,
            "last_promotion": self.last_promotion,
            "restart_sessions_used": self.restart_sessions_used,
            "reference": self._reference,
        }

    def set_own_state(self, state: dict) -> None:
        self.signals.set_state(state["signals"])
        self.rollbacks = state["rollbacks"]
        self.consecutive_rollbacks = state.get("consecutive_rollbacks", 0)
        self.last_promotion = state.get("last_promotion")
        self.restart_sessions_used = state.get("restart_sessions_used", 0)
        self._reference = dict(state["reference"])
        self._last_good = self._snapshot()  # the restored learner state is the last good one
