"""OuterController: the layered (inner reward + delayed-KPI outer controller) policy-gradient
algorithm on RLlib's new API stack, with the monolithic weighted-sum arm as a switch.

    config = (OuterControllerConfig()
              .environment(SessionEnv, env_config={...})
              .outer_controller(arm="layered", kpi_weights={"revenue": 1, "return": 2, "ndcg": 1},
                                min_sessions_for_kpi=10_000, kl_rollback_threshold=0.3)
              .learners(num_learners=0))
    algo = config.build_algo()
    algo.warm_start("trajectories/")          # optional: behaviour cloning on logged sessions
    for _ in range(50): print(algo.train()["outer_controller"])

One iteration: sample ``sessions_per_iteration`` complete sessions on the env runners (or read them
from trajectory Parquet with Ray Data when ``offline_trajectories`` is set) → signals on the driver
→ ``learner_group.update(batch=…)`` → KL(π_ref ‖ π) on the batch's states; above the threshold the
learner state rolls back to the last good one, otherwise this one becomes the last good one →
weights synced to the env runners.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS, WEIGHTS_SEQ_NO

from rllib_policies.building_blocks import init_options, set_options
from rllib_policies.credit import KappaSchedule

from . import sessions as session_data
from .module import RankingPolicyModule, gaussian_kl
from .signals import OuterSignals, SignalConfig

METRICS = "outer_controller"
logger = logging.getLogger(__name__)
_OPTIONS = dict(
    arm="layered", kpi_weights={"revenue": 1.0, "return": 1.0, "ndcg": 1.0}, kappa_start=0.2, kappa_end=0.6,
    kappa_anneal_iters=30, kappa_kind="linear", anneal=True, credit_attention=True, baseline=True, baseline_alpha=0.01,
    reward_clip=5.0, min_sessions_for_kpi=10_000, kl_rollback_threshold=0.3, sessions_per_iteration=64,
    entropy_coeff=0.0, credit_loss_coeff=0.5, offline_trajectories=None, offline_advantage_temperature=1.0,
)


class OuterControllerConfig(AlgorithmConfig):
    """AlgorithmConfig for OuterController; ``.outer_controller(...)`` sets its own options:

    arm                     "layered" (inner reward + outer KPI controller) | "monolithic"
    kpi_weights             {KPI: weight}, KPIs from sessions.KPIS; changeable at run time
    kappa_start/end/anneal_iters/kind, anneal   the κ schedule (anneal=False: κ_end throughout)
    credit_attention        gated-attention credit (False: uniform credit over the session)
    baseline, baseline_alpha  rolling EMA baseline on each signal (α ∈ [0.005, 0.02])
    reward_clip             rewards and advantages clipped to ±reward_clip (5)
    min_sessions_for_kpi    the KPI gate: κ = 0 until this many sessions were seen (10 000)
    kl_rollback_threshold   roll back when KL(π_ref ‖ π) exceeds it (0.3); None disables
    sessions_per_iteration  complete sessions per training batch
    offline_trajectories    trajectory Parquet path(s): train from logs (Ray Data) instead of sampling
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or OuterController)
        init_options(self, _OPTIONS)
        self.gamma = 0.9
        self.lr = 3e-3
        self.num_epochs = 4
        self.normalize_actions = False   # the module emits actions in the env's units; the env clips
        self.clip_actions = False

    def outer_controller(self, **kwargs) -> "OuterControllerConfig":
        return set_options(self, _OPTIONS, kwargs, "outer_controller")

    def signal_config(self) -> SignalConfig:
        return SignalConfig(arm=self.arm, gamma=self.gamma, kpi_weights=dict(self.kpi_weights),
                            kappa=KappaSchedule(self.kappa_start, self.kappa_end, self.kappa_anneal_iters, self.kappa_kind),
                            anneal=self.anneal, baseline=self.baseline, baseline_alpha=self.baseline_alpha,
                            reward_clip=self.reward_clip, min_sessions_for_kpi=self.min_sessions_for_kpi)

    def validate(self) -> None:
        super().validate()
        self.signal_config()   # raises ValueError naming the bad field
        if self.sessions_per_iteration < 1:
            raise ValueError(f"sessions_per_iteration must be >= 1, got {self.sessions_per_iteration}")
        if self.sessions_per_iteration < max(self.num_learners, 1):
            raise ValueError(f"sessions_per_iteration ({self.sessions_per_iteration}) must be >= num_learners "
                             f"({self.num_learners}): each learner trains on whole sessions")
        if self.kl_rollback_threshold is not None and self.kl_rollback_threshold <= 0:
            raise ValueError(f"kl_rollback_threshold must be > 0 or None, got {self.kl_rollback_threshold}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=RankingPolicyModule)

    def get_default_learner_class(self):
        from .learner import OuterControllerLearner

        return OuterControllerLearner


class OuterController(Algorithm):
    @classmethod
    def get_default_config(cls) -> OuterControllerConfig:
        return OuterControllerConfig()

    def setup(self, config) -> None:
        super().setup(config)
        self.signals = OuterSignals(self.config.signal_config())
        self.rollbacks = self.consecutive_rollbacks = 0
        self.last_batch = None
        self._offline_batches = None
        self._probe = copy.deepcopy(self.get_module()).cpu()   # evaluates π_ref and π for the KL monitor
        self._reference = self._policy_params()               # π_ref: the pre-training policy
        self._last_good = self._snapshot()

    # ---------------------------------------------------------------- data
    def _sample_sessions(self) -> session_data.SessionBatch:
        n_remote = self.env_runner_group.num_remote_env_runners()
        per_runner = -(-self.config.sessions_per_iteration // max(n_remote, 1))
        episode_lists = self.env_runner_group.foreach_env_runner(_sample_fresh(per_runner), local_env_runner=n_remote == 0)
        metrics = self.env_runner_group.foreach_env_runner(lambda r: r.get_metrics(), local_env_runner=n_remote == 0)
        self.metrics.aggregate(metrics, key=ENV_RUNNER_RESULTS)
        return session_data.from_episodes([e for eps in episode_lists for e in eps])

    def _read_sessions(self) -> session_data.SessionBatch:
        """The next batch of logged sessions (cycling through the dataset)."""
        import ray.data

        if self._offline_batches is None:
            self._dataset = ray.data.read_parquet(self.config.offline_trajectories, num_cpus=0.25)
            self._offline_batches = iter(())
        for _ in range(2):   # the rest of this pass, then one fresh pass
            for table in self._offline_batches:
                try:
                    return session_data.from_trajectories(table)
                except ValueError:   # no usable rows in this batch (no observations / unknown return): skip it
                    continue
            self._offline_batches = iter(self._dataset.iter_batches(batch_size=self.config.sessions_per_iteration,
                                                                     batch_format="pyarrow"))
        raise ValueError(f"no usable trajectories under {self.config.offline_trajectories!r} (rows need logged "
                         "observations and a known 'returned')")

    # ---------------------------------------------------------------- training
    def training_step(self) -> None:
        offline = self.config.offline_trajectories is not None
        batch = self._read_sessions() if offline else self._sample_sessions()
        self.last_batch = batch
        signals = self.signals.compute(batch)
        self._update(batch, signals)
        kl = self._kl_from_reference(batch.obs)
        rolled_back = self.config.kl_rollback_threshold is not None and kl > self.config.kl_rollback_threshold
        if rolled_back:
            self.learner_group.set_state(self._last_good)
            self.rollbacks += 1
            self.consecutive_rollbacks += 1
            if self.consecutive_rollbacks == 5:
                logger.warning("5 rollbacks in a row (KL %.3f > %.3f): the policy keeps leaving the trust region "
                               "around π_ref; lower lr or warm-start a new reference", kl, self.config.kl_rollback_threshold)
        else:
            self._last_good = self._snapshot()
            self.consecutive_rollbacks = 0
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        self.metrics.log_dict({**signals["metrics"], "kl_from_reference": kl, "rolled_back": float(rolled_back),
                               "rollbacks": self.rollbacks,
                               "consecutive_rollbacks": self.consecutive_rollbacks, "sessions_in_batch": batch.n_sessions,
                               "mean_session_length": len(batch.t) / batch.n_sessions}, key=METRICS, window=1)

    def _update(self, batch: session_data.SessionBatch, signals: dict, num_epochs: int | None = None) -> None:
        columns = {Columns.OBS: batch.obs, Columns.ACTIONS: batch.actions, "session": batch.session, "t": batch.t,
                   "engaged": batch.engaged.astype(np.float32), "step_signal": signals["step_signal"],
                   "outer_signal": signals["outer_signal"], "kappa": signals["kappa"]}
        epochs = num_epochs or self.config.num_epochs
        if self.learner_group.is_local:
            results = self.learner_group.update(batch=_ma_batch(columns), num_epochs=epochs)
        else:   # one shard of whole sessions per learner (credit attends over complete sessions)
            groups = np.array_split(np.arange(batch.n_sessions), len(self.learner_group))
            shards = [_ma_batch({k: v[np.isin(batch.session, g)] for k, v in columns.items()}) for g in groups]
            results = self.learner_group.update(batches=shards, num_epochs=epochs)
        self.metrics.aggregate(results, key=LEARNER_RESULTS)

    def warm_start(self, trajectories, iterations: int = 20) -> dict:
        """Behaviour cloning on logged sessions: maximise log π(a|s) of the logged actions (the KPI
        signals are off), then make the result the KL reference and the last good state."""
        import pyarrow.dataset as pads

        batch = session_data.from_trajectories(pads.dataset(trajectories, format="parquet").to_table())
        ones = np.ones(len(batch.t), np.float32)
        for _ in range(iterations):   # A_t ≡ 1: the loss is −mean log π(a|s) (exp(0) = 1 as well offline)
            self._update(batch, {"step_signal": ones * (0 if self.config.offline_trajectories else 1),
                                 "outer_signal": ones * 0, "kappa": ones * 0})
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
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
        return dict(self.learner_group.get_weights([DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID])

    def policy_mean(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) under the learners' current weights."""
        return policy_gaussian(self._probe, self._policy_params(), torch.as_tensor(obs))[0]

    def _kl_from_reference(self, obs: np.ndarray) -> float:
        """Mean over the batch's states of KL(π_ref(·|s) ‖ π(·|s))."""
        x = torch.as_tensor(obs)
        mean_q, log_std_q = policy_gaussian(self._probe, self._policy_params(), x)
        mean_p, log_std_p = policy_gaussian(self._probe, self._reference, x)
        return float(gaussian_kl(mean_p, log_std_p, mean_q, log_std_q).mean())

    def inner_reward_weights(self, batch: session_data.SessionBatch, ridge: float = 1e-2) -> dict[str, float]:
        """Fit the inner reward's weights to the current credit: c_t = T·w_t·R (KPI units) per step."""
        from .rails import fit_inner_reward_weights
        from .sessions import pad_sessions

        if batch is None:
            raise ValueError("no training batch yet: run at least one iteration before fitting inner-reward weights")
        if "inner_features" not in batch.step_objectives:
            raise ValueError("this batch has no inner-reward features (logged trajectories carry only the summed inner "
                             "reward): fit inner-reward weights on online sessions")

        self._probe.load_state_dict({k: torch.as_tensor(v) for k, v in self._policy_params().items()})
        x = torch.as_tensor(np.concatenate([batch.obs, batch.actions / self._probe.high.numpy()], axis=1))
        mask, sid, rel, (xp,) = pad_sessions(torch.as_tensor(batch.session), torch.as_tensor(batch.t), x)
        with torch.no_grad():
            w, _ = self._probe.credit.weights(xp, mask) if self.config.credit_attention else (mask / mask.sum(1, keepdim=True), None)
        r_outer = torch.as_tensor(self.signals.outer_reward(batch), dtype=torch.float32)
        credited = (mask.sum(1, keepdim=True) * w * r_outer[:, None])[sid, rel].numpy()
        return fit_inner_reward_weights(batch.step_objectives["inner_features"], credited, ridge)

    def set_kpi_weights(self, weights: dict) -> None:
        """Change the outer controller's KPI weights at run time; the next iteration uses them."""
        self.signals.set_kpi_weights(weights)

    # ---------------------------------------------------------------- checkpoints
    def get_state(self, *args, **kwargs):
        state = super().get_state(*args, **kwargs)
        state[METRICS] = {"signals": self.signals.state(), "rollbacks": self.rollbacks,
                          "reference": self._reference}
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if METRICS in state:
            own = state[METRICS]
            self.signals.set_state(own["signals"])
            self.rollbacks = own["rollbacks"]
            self._reference = dict(own["reference"])
            self._last_good = self._snapshot()


def _ma_batch(columns: dict) -> MultiAgentBatch:
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=len(columns["t"]))


def _sample_fresh(num_episodes: int):
    """``EnvRunner.sample(num_episodes=…)`` resets its envs on every call and, in Ray 2.60, re-seeds
    them with ``config.seed`` each time (``_needs_initial_reset`` is set again after each call):
    every iteration would replay the same users and draws. Clearing the flag after the call keeps
    the reset but not the re-seed, so each iteration gets new sessions (tested)."""
    def sample(runner):
        episodes = runner.sample(num_episodes=num_episodes, explore=True)
        runner._needs_initial_reset = False
        return episodes
    return sample


def policy_gaussian(module: RankingPolicyModule, params: dict, obs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(μ, log σ) of the policy with the weights ``params`` loaded into ``module`` (a driver-side probe)."""
    module.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    with torch.no_grad():
        mean, log_std = module.gaussian(obs)
    return mean.numpy(), log_std.numpy()
