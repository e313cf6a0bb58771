"""UnexRL: matching, pre-ranking and ranking as cooperating agents with one global critic, on
RLlib's new API stack (a MultiRLModule of three StagePolicyModules + a learner-only critic).

    config = (UnexRLConfig()
              .environment(MultiStageEnv, env_config={"world": {"n_items": 5000, "n_users": 2000}})
              .unex_rl(arm="unex_rl", cic=True, stop_gradient=True, cqr=False)
              .learners(num_learners=0))
    algo = config.build_algo()
    for _ in range(30): print(algo.train()["unex_rl"])

One iteration: ``sessions_per_iteration`` sessions are served by the current stage policies with
Gaussian exploration on the learning stages — vectorised over sessions, through the one cascade
(``actors.cascade.run_cascade``) and the one observation layout MultiStageEnv uses (the env itself
steps one agent turn at a time: ~50× slower on two cores; it pays the inner reward, the sampler pays
usage time, the long-term reward UNEX-RL optimises) — their per-request transitions (raw o_1, stage
observations and actions, usage seconds, next request) go to a replay buffer with the reward in
seconds / ``reward_scale_s`` (or the paper's CQR quantiles, ``cqr=True``); then
``updates_per_iteration`` minibatch updates (each learner gets a full minibatch) of the critic and the
stage policies (learner.py), target networks by Polyak averaging.
"""

from __future__ import annotations

import copy
import warnings
from typing import Self

import numpy as np
import ray
import torch
from gymnasium import spaces
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.schedules.scheduler import Scheduler

from actors.cascade import build_world
from actors.served_policies import publish_stage_policy
from actors.stages import DEFAULT_PARAMS, STAGE_ACTION_HIGH, STAGES
from rllib_policies.algorithm_base import AlgorithmBase, AlgorithmConfigBase, set_provided

from .cic import CategoryQuantileRescaler
from .learner import CRITIC, UnexRLLearner
from .modules import JOINT_ACTION_DIM, GlobalCriticModule, StagePolicyModule
from .sampler import N_ITEM_GROUPS, ReplayBuffer, sample_sessions, transitions_from_episodes

EXPLORE_STD = 0.2  # the exploration's σ, a fraction of each action's range (stages not given one)
# matching explores twice as widely by default: the critic must see relevance outweigh matching's own Gumbel
# exploration before it can learn that relevance pays (the starved start's plateau; the learning test)
EXPLORE_STD_BY_STAGE = {"matching": 0.4}

# arm → its switches (UNEX-RL with every piece on but CQR; each ablation switches one off, "cqr" switches the
# paper's reward rescaling on). The defaults in UnexRLConfig.__init__ are the "unex_rl" arm.
ARMS: dict[str, dict] = {
    "unex_rl": {
        "cic": True,
        "stop_gradient": True,
        "cqr": False,
        "critic": "global",
        "critic_scale_free": True,
        "trainable_stages": STAGES,
    },
    "single_agent": {"trainable_stages": ("ranking",)},
    "independent": {"critic": "independent", "critic_scale_free": False},  # one Q_k(o_k, a_k) per stage
    "no_cic": {"cic": False},
    "no_sg": {"stop_gradient": False},
    "cqr": {"cqr": True},  # the paper's category-quantile rewards: off by default, they favour clicks here
}


class UnexRLConfig(AlgorithmConfigBase):
    """AlgorithmConfig for UnexRL; ``.unex_rl(...)`` sets its own options."""

    default_learner_class = UnexRLLearner

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or UnexRL)
        # UNEX-RL's switches (the "unex_rl" arm)
        self.cic: bool = True
        self.stop_gradient: bool = True
        self.cqr: bool = False
        self.critic: str = "global"
        self.trainable_stages: tuple[str, ...] = STAGES
        # sampling and replay
        self.sampler: str = "vectorised"
        self.sessions_per_iteration: int = 64
        self.explore_std: float | dict[str, float] = dict(EXPLORE_STD_BY_STAGE)
        self.explore_correlation: float = 0.0
        self.explore_schedule: list[list[float]] | None = None
        self.buffer_size: int = 50_000
        self.reward_scale_s: float = 30.0
        self.cqr_window: int = 4096
        self.cqr_relabel: bool = False
        # updates
        self.updates_per_iteration: int = 16
        self.minibatch_size: int = 256
        self.tau: float = 0.01
        self.hidden: tuple[int, ...] = (64, 64)
        self.init_params: dict[str, tuple[float, ...]] = {}
        self.actor_lr: float | list[list[float]] = 3e-4
        self.actor_warmup_iterations: int = 2
        self.policy_delay: int = 2
        self.twin_q: bool = False
        self.critic_scale_free: bool = True
        self.max_action_step: float | None = None
        self.search_candidates: int = 16
        self.search_weight: float = 1.0
        self.search_std: float | None = None
        self.search_rounds: int = 1
        self.action_margin: float = 0.02
        self.saturation_penalty: float = 0.1
        self.incumbent_window: int = 0
        # RLlib's own settings, UNEX-RL's values
        # γ 0.5: a two-request credit horizon. On the learning test (10 seeds, 30 iterations) γ 0.9 closes 70 % ± 13
        # of the gap, γ 0.5 74 % ± 5 and γ 0 (the next request's seconds ignored) 70 % ± 11 (learning_unex_rl.md)
        self.gamma = 0.5
        self.lr = 1e-3
        self.num_env_runners = 0
        self.normalize_actions = False  # the stage policies emit actions in the env's units; the env clips
        self.clip_actions = False
        self.multi_agent(policies=list(STAGES), policy_mapping_fn=_stage_of)  # in order: reproducible init

    def unex_rl(
        self,
        *,
        arm: str = NotProvided,
        cic: bool = NotProvided,
        stop_gradient: bool = NotProvided,
        cqr: bool = NotProvided,
        critic: str = NotProvided,
        trainable_stages: tuple[str, ...] | list[str] = NotProvided,
        sampler: str = NotProvided,
        sessions_per_iteration: int = NotProvided,
        explore_std: float | dict[str, float] = NotProvided,
        explore_correlation: float = NotProvided,
        explore_schedule: list[list[float]] | None = NotProvided,
        buffer_size: int = NotProvided,
        reward_scale_s: float = NotProvided,
        cqr_window: int = NotProvided,
        cqr_relabel: bool = NotProvided,
        updates_per_iteration: int = NotProvided,
        minibatch_size: int = NotProvided,
        tau: float = NotProvided,
        hidden: tuple[int, ...] | list[int] = NotProvided,
        init_params: dict = NotProvided,
        actor_lr: float | list[list[float]] = NotProvided,
        actor_warmup_iterations: int = NotProvided,
        policy_delay: int = NotProvided,
        twin_q: bool = NotProvided,
        critic_scale_free: bool = NotProvided,
        max_action_step: float | None = NotProvided,
        search_candidates: int = NotProvided,
        search_weight: float = NotProvided,
        search_std: float | None = NotProvided,
        search_rounds: int = NotProvided,
        action_margin: float = NotProvided,
        saturation_penalty: float = NotProvided,
        incumbent_window: int = NotProvided,
    ) -> Self:
        """Sets UNEX-RL's own options.

        Args:
            arm: A name from ``ARMS``: sets every switch below (cic … trainable_stages) to UNEX-RL's,
                then the arm's own; switches given explicitly in the same call win.
            cic: Rebuild downstream observations by replaying the cascade (the cascading information
                chain); False: the buffer's stale o_k.
            stop_gradient: Detach upstream actions inside downstream observations in the actor loss.
            cqr: Rewards as quantiles within (user cohort, item category tier) cells (the paper's CQR);
                False (the default): usage seconds / ``reward_scale_s``. A quantile caps a long view's
                seconds at 1, so CQR ranks click-heavy rankings above the usage optimum
                (benchmarks/results/unex_rl_cqr.md); the learning test closes 68 % ± 16 of its gap with it
                (5 seeds, γ 0.9), 70 % ± 13 without at γ 0.9 and 74 % ± 5 at γ 0.5 (10 seeds; learning_unex_rl.md,
                30 iterations).
            critic: "global" (Q_g on the joint action) or "independent" (one Q_k(o_k, a_k) per stage).
            trainable_stages: The stages whose policies learn (the others keep their initial
                parameters: ``init_params``, else the defaults).
            sampler: "vectorised" (sessions batched through the cascade, default) or "env_runner"
                (RLlib's MultiAgentEnvRunner stepping MultiStageEnv; needs env_config
                {"reward": "usage"}): the same transitions, ~50× slower here.
            sessions_per_iteration: Sessions served (and stored) per iteration.
            explore_std: σ of the Gaussian exploration, as a fraction of each action's range; a dict
                (stage → σ) sets it per stage, stages not named ``EXPLORE_STD`` (0.2); default
                ``EXPLORE_STD_BY_STAGE``: matching 0.4, the others 0.2.
            explore_correlation: ρ, the share of the exploration noise's variance drawn once per session and
                shared by its requests (temporally correlated exploration, as DDPG's Ornstein–Uhlenbeck noise:
                a session served at one shifted setting shows that setting's effect on the user's temper and
                so on the session's length); 0: independent noise per request (default), 1: one draw per session.
            explore_schedule: A factor on every stage's sampled exploration σ (the action search keeps
                ``search_std``, by default the unscaled σ), piecewise linear in the sessions sampled so far, as
                RLlib's schedules are written: [[sessions, factor], …], the first at 0, the last factor held after
                its point (e.g. [[0, 1], [1920, 1], [3840, 0.5]]: the full σ while the policies travel, then narrower
                exploration, so the critic sees the usage surface near the policies more sharply); None: constant.
            buffer_size: Replay buffer capacity (transitions = requests).
            reward_scale_s: Usage seconds per unit reward when ``cqr`` is off.
            cqr_window: Rewards kept per CQR cell (a sliding window).
            cqr_relabel: After every batch, re-score every stored transition's raw reward against the
                cells as they are now (one reference distribution for the whole buffer: a raw reward's
                quantile no longer depends on when it was stored); False: the quantile from insertion.
            updates_per_iteration: Minibatch updates per iteration.
            minibatch_size: Transitions per minibatch and learner.
            tau: Polyak rate of the target networks, θ' ← τ·θ + (1 − τ)·θ'.
            hidden: Hidden widths of the stage policies' MLPs.
            init_params: Stage → the parameter vector its policy starts at (e.g. a starved matching
                stage for a learning test); stages not named start at ``DEFAULT_PARAMS``. Each value
                must lie in (0, ``STAGE_ACTION_HIGH``) (the policies' sigmoid box).
            actor_lr: The stage policies' (the actors') learning rate; the critic uses ``lr``. Or RLlib's
                piecewise-linear schedule [[sessions, lr], …] over the sessions sampled so far, the first at 0
                (e.g. fast while the policies travel from a bad start, slower once they are near the optimum).
            actor_warmup_iterations: The critic trains alone for this many iterations first (stage
                policies that follow an untrained critic walk away from good default parameters).
            policy_delay: After the warm-up, the stage policies update on every
                ``policy_delay``-th minibatch (TD3).
            twin_q: Two heads per critic, the TD target from the smaller target head (TD3's clipped
                double-Q: the critic's overestimation no longer drives the actions into the box's corners).
            critic_scale_free: The global critic reads each stage's scale weights (``modules.SCALE_WEIGHTS``: the
                weights of the linear score the stage ranks by) as a direction, their sum divided out
                (``modules.scale_free``): the cascade serves any positive multiple of them the same items, so the
                true Q_g is constant along those rays and the critic need not learn that from rewards. On by
                default since session 43: on the learning test its mean was above the critic on raw actions at
                every budget measured (79 against 74 % at 30 iterations and 82 against 78 % at 60 on the same code,
                83 against 79 % at 90; none of the differences significant), and at 150 iterations (5× the test's
                budget) it closes 89 % ± 8, the only setting whose interval lies above 80 % (docs/unex_rl.md).
                False: the critic reads the actions as they are.
            max_action_step: δ, the per-iteration bound on each learning stage policy's step: the mean
                change of its deterministic action on a minibatch, as a fraction of each action's range,
                at most δ per action dimension from the iteration's start (longer steps are shortened);
                None: unbounded.
            search_candidates: k, the critic-guided action search: per transition, the critic's best of
                the policies' joint action and k − 1 Gaussian perturbations of it (σ = ``search_std``,
                learning stages only), a*, and the actor loss adds β·‖ã − a*‖² (actions
                scaled to [0, 1]), so the policies climb the critic's shape within the explored region,
                not only its slope at ã; 0 or 1: off (DDPG's loss alone).
            search_weight: β, the weight of that regression towards a*.
            search_std: σ of the search's perturbations, as a fraction of each action's range; None: the
                exploration's ``explore_std`` (the region the critic has seen).
            search_rounds: The search repeated this many times, each round around the best so far (a
                random walk uphill on the critic: reach ≈ σ·√rounds, k candidates per round).
            action_margin: m, the search's candidates are clipped to [m, 1 − m] of each action's range
                (off the box's faces, where the sigmoid policies saturate and stop learning), and the
                saturation penalty starts at logit(1 − m); 0: the whole box. Default 0.02.
            saturation_penalty: λ, the actor loss adds λ·Σ_j relu(|z_j| − logit(1 − m))² of the learning
                policies' pre-squash outputs z (needs ``action_margin`` > 0), so a policy pushed onto a face
                of the box can still come back (sigmoid'(z) → 0 there); 0: off. Default 0.1.
            incumbent_window: w, the deployed policies (``deployed_policies``: served, hot-updated, evaluated)
                are the incumbent — the stage policies at the centre of the w consecutive iterations whose
                exploration sessions earned the highest mean usage so far — instead of the latest (the
                critic can overestimate and carry the policies past their best; choosing by the sessions
                actually served costs no extra traffic); 0: the latest (default: with 32–64 explored
                sessions an iteration their usage is too noisy to rank policies reliably; learning_unex_rl.md).

        Returns:
            This updated AlgorithmConfig object.
        """
        options = dict(locals())  # the options as passed, before any other local exists
        options.pop("arm")
        if arm is not NotProvided:
            if arm not in ARMS:
                raise ValueError(f"unknown UNEX-RL arm {arm!r}; arms: {sorted(ARMS)}")
            for name, value in {**ARMS["unex_rl"], **ARMS[arm]}.items():
                setattr(self, name, value)
        set_provided(self, options)
        self.trainable_stages, self.hidden = tuple(self.trainable_stages), tuple(self.hidden)
        self.init_params = {s: tuple(float(x) for x in p) for s, p in dict(self.init_params).items()}
        return self

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.incumbent_window, int) or self.incumbent_window < 0:
            raise ValueError(f"incumbent_window must be an int >= 0, got {self.incumbent_window!r}")
        if self.cqr_relabel and not self.cqr:
            raise ValueError("cqr_relabel re-scores CQR quantiles: it needs cqr=True (the reward is in seconds)")
        if self.critic not in ("global", "independent"):
            raise ValueError(f"critic must be 'global' or 'independent', got {self.critic!r}")
        if self.critic_scale_free and self.critic != "global":
            raise ValueError(
                "critic_scale_free reads the joint action: it needs critic='global' (it is on by default: pass "
                "critic_scale_free=False with critic='independent', or arm='independent')"
            )
        bad = set(self.trainable_stages) - set(STAGES)
        if bad or not self.trainable_stages:
            raise ValueError(f"trainable_stages must be a non-empty subset of {STAGES}, got {self.trainable_stages}")
        Scheduler.validate(fixed_value_or_schedule=self.actor_lr, setting_name="actor_lr", description="learning rate")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.sampler not in ("vectorised", "env_runner"):
            raise ValueError(f"sampler must be 'vectorised' or 'env_runner', got {self.sampler!r}")
        if self.explore_correlation > 0 and self.sampler != "vectorised":
            raise ValueError(
                "explore_correlation draws per session in the vectorised sampler: it needs sampler='vectorised'"
            )
        if self.explore_schedule is not None:
            shape = "[[sessions, factor], …] from sessions 0, sessions non-decreasing, finite factors > 0"
            try:
                points = np.asarray(self.explore_schedule, dtype=float)
            except (TypeError, ValueError):
                points = np.zeros((0, 0))
            if (
                points.ndim != 2
                or points.shape[1:] != (2,)
                or len(points) == 0
                or points[0, 0] != 0
                or (np.diff(points[:, 0]) < 0).any()
                or not np.isfinite(points).all()
                or (points[:, 1] <= 0).any()
            ):
                raise ValueError(f"explore_schedule must be {shape}, got {self.explore_schedule!r}")
            if self.sampler != "vectorised":
                raise ValueError("explore_schedule scales the vectorised sampler's noise: needs sampler='vectorised'")
        if self.sampler == "env_runner" and (self.env_config or {}).get("reward") != "usage":
            raise ValueError(
                "sampler='env_runner' trains on the env's rewards: set env_config['reward'] = 'usage' "
                "(UNEX-RL's long-term reward is usage time)"
            )
        for s, p in self.init_params.items():
            if s not in STAGES:
                raise ValueError(f"init_params: unknown stage {s!r}; stages: {STAGES}")
            high = STAGE_ACTION_HIGH[s]
            if len(p) != len(high) or not all(0 < x < h for x, h in zip(p, high)):
                raise ValueError(
                    f"init_params[{s!r}] must be {len(high)} values inside (0, {high.tolist()}), got {list(p)}"
                )
        if self.max_action_step is not None and not 0 < self.max_action_step <= 1:
            raise ValueError(f"max_action_step must be in (0, 1] or None, got {self.max_action_step}")
        if isinstance(self.explore_std, dict) and set(self.explore_std) - set(STAGES):
            raise ValueError(f"explore_std: unknown stage(s) {sorted(set(self.explore_std) - set(STAGES))}")
        if not 0 <= self.explore_correlation <= 1:
            raise ValueError(f"explore_correlation must be in [0, 1], got {self.explore_correlation}")
        if not all(self.explore_std_of(s) > 0 for s in STAGES):
            raise ValueError(f"explore_std must be > 0, got {self.explore_std}")
        if self.search_std is not None and not self.search_std > 0:
            raise ValueError(f"search_std must be > 0 or None, got {self.search_std}")
        if self.search_candidates < 0 or self.search_weight < 0:
            raise ValueError(
                f"search_candidates and search_weight must be >= 0, got {self.search_candidates}, {self.search_weight}"
            )
        if self.search_rounds < 1:
            raise ValueError(f"search_rounds must be >= 1, got {self.search_rounds}")
        if not 0 <= self.action_margin < 0.5:
            raise ValueError(f"action_margin must be in [0, 0.5), got {self.action_margin}")
        if self.saturation_penalty < 0 or (self.saturation_penalty > 0 and self.action_margin == 0):
            raise ValueError(
                f"saturation_penalty must be >= 0, and > 0 only with action_margin > 0, got "
                f"{self.saturation_penalty} (action_margin {self.action_margin})"
            )
        if self.minibatch_size < 2 or self.sessions_per_iteration < 1:
            raise ValueError("minibatch_size must be >= 2 and sessions_per_iteration >= 1")

    def explore_std_of(self, stage: str) -> float:
        """Stage ``stage``'s exploration σ (a fraction of each action's range)."""
        if isinstance(self.explore_std, dict):
            return float(self.explore_std.get(stage, EXPLORE_STD))
        return float(self.explore_std)

    def explore_factor(self, sessions: int) -> float:
        """f(sessions): the ``explore_schedule``'s factor on every σ after ``sessions`` sampled sessions (piecewise
        linear between its points, its last factor held; 1 without a schedule)."""
        if self.explore_schedule is None:
            return 1.0
        points = np.asarray(self.explore_schedule, dtype=float)
        return float(np.interp(sessions, points[:, 0], points[:, 1]))

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=StagePolicyModule)

    def get_multi_rl_module_spec(self, **kwargs):
        spec = super().get_multi_rl_module_spec(**kwargs)
        for s in STAGES:
            if s in spec.rl_module_specs:
                spec.rl_module_specs[s].model_config = {
                    "hidden": self.hidden,
                    "explore_std": self.explore_std_of(s),
                    "init": list(self.init_params.get(s, DEFAULT_PARAMS[s].tolist())),
                }
        if not kwargs.get("inference_only") and CRITIC not in spec.rl_module_specs:
            d = build_world(self.env_config)[1].spec.dim
            spec.rl_module_specs[CRITIC] = RLModuleSpec(
                module_class=GlobalCriticModule,
                learner_only=True,
                observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
                action_space=spaces.Box(0.0, 1.0, (JOINT_ACTION_DIM,), np.float32),
                model_config={
                    "obs_dim": d,
                    "n_critics": 1 if self.critic == "global" else len(STAGES),
                    "twin": self.twin_q,
                    "scale_free": self.critic_scale_free,
                },
            )
        return spec


class UnexRL(AlgorithmBase):
    metrics_key = "unex_rl"
    config_class = UnexRLConfig

    def setup(self, config) -> None:
        super().setup(config)
        cfg = self.config
        self.world, self.pipeline = build_world(cfg.env_config)
        self.buffer = ReplayBuffer(cfg.buffer_size)
        self.cqr = CategoryQuantileRescaler(3, N_ITEM_GROUPS + 1, cfg.cqr_window)
        self.rng = np.random.default_rng(cfg.seed)
        self.sessions_seen = 0
        self.policy_version = 0
        self.stage_actors: dict = {}  # Ray stage actors hot-updated after each round (attach_stage_actors)
        self.serve_store_prefix: str | None = None  # Serve stage deployments hot-updated too (attach_serve_stages)
        self.recent: list[tuple[dict, float]] = []  # the last w iterations: (the policies that served, usage/session)
        self.incumbent: dict | None = None  # the best window's centre policies, its mean usage
        self.incumbent_usage = -np.inf
        self._sync_stage_policies()

    def _sync_stage_policies(self) -> None:
        """The driver's copies of the stage policies μ_k (serve the sampled sessions), from the learners."""
        self.stage_policies = {s: self.inference_module(s) for s in STAGES}

    @property
    def deployed_policies(self) -> dict:
        """What is served: the incumbent (``incumbent_window``) once one window has closed, else the latest."""
        return self.incumbent if self.incumbent is not None else self.stage_policies

    def _track_incumbent(self, usage_s: float) -> bool:
        """The policies that just served ``usage_s`` per session enter the window; a window whose mean usage
        beats the incumbent's makes its centre policies the incumbent. True when the deployed policies will
        change after this round's update (no window: they are the latest; no incumbent yet: likewise)."""
        w = self.config.incumbent_window
        if w == 0:
            return True
        self.recent = [*self.recent, (copy.deepcopy(self.stage_policies), usage_s)][-w:]
        mean = float(np.mean([u for _, u in self.recent]))
        if len(self.recent) == w and mean > self.incumbent_usage:
            self.incumbent, self.incumbent_usage = self.recent[w // 2][0], mean
            return True
        return self.incumbent is None

    def training_step(self) -> None:
        cfg = self.config
        if cfg.sampler == "env_runner":
            episodes = self.sample_episodes(cfg.sessions_per_iteration)
            batch, summary = transitions_from_episodes(self.pipeline, episodes)
        else:
            factor = cfg.explore_factor(self.sessions_seen)
            batch, summary = sample_sessions(
                self.pipeline,
                self.stage_policies,
                cfg.sessions_per_iteration,
                self.rng,
                explore=True,
                explore_std={s: cfg.explore_std_of(s) * factor for s in STAGES},
                explore_stages=cfg.trainable_stages,
                explore_correlation=cfg.explore_correlation,
            )
        deployed_changes = self._track_incumbent(summary["usage_s_per_session"])
        raw = batch["reward_s"]
        if cfg.cqr:
            batch["reward"] = self.cqr.rescale(raw, batch["user_group"], batch["item_group"]).astype(np.float32)
        else:
            batch["reward"] = (raw / cfg.reward_scale_s).astype(np.float32)
        self.buffer.add(batch)
        if cfg.cqr and cfg.cqr_relabel:
            d, n = self.buffer.data, len(self.buffer)
            d["reward"][:n] = self.cqr.quantiles(d["reward_s"][:n], d["user_group"][:n], d["item_group"][:n])
        self.sessions_seen += cfg.sessions_per_iteration
        warm = self.iteration >= cfg.actor_warmup_iterations
        for u in range(cfg.updates_per_iteration):
            mb = self.buffer.sample(cfg.minibatch_size * self.num_learner_shards, self.rng)
            mb["actor_on"] = np.full(len(mb["reward"]), float(warm and u % cfg.policy_delay == 0), np.float32)
            mb["anchor"] = np.full(len(mb["reward"]), float(u == 0), np.float32)  # the step bound's start
            self.update_learners(mb, module_id=CRITIC, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.sessions_seen})
        self._sync_stage_policies()
        self.sync_env_runners()
        if deployed_changes:  # a version names the weights it serves: an unchanged incumbent publishes nothing
            self.policy_version += 1
            self._hot_update()
        metrics = {
            **summary,
            "sessions_seen": self.sessions_seen,
            "buffer_size": len(self.buffer),
            "reward_rescaled_mean": float(batch["reward"].mean()),
            "policy_version": self.policy_version,
            "incumbent_usage_s": self.incumbent_usage if self.incumbent is not None else float("nan"),
        }
        self.metrics.log_dict(metrics, key=self.metrics_key, window=1)

    def evaluate_policy(self, n_sessions: int = 500, seed: int = 0) -> dict:
        """The deployed stage policies, deterministic, on fixed simulated users: usage time, return, NDCG@10."""
        rng = np.random.default_rng(seed)
        _, summary = sample_sessions(
            self.pipeline, self.deployed_policies, n_sessions, rng, explore=False, users_seed=seed
        )
        return summary

    # ---------------------------------------------------------------- Ray stage actors
    def attach_stage_actors(self, stage_actors: dict) -> None:
        """Stage actors (actors.stage_actors.StageActor handles, by stage) to hot-update with the deployed
        stage policies (``deployed_policies``) whenever a training round changes them."""
        self.stage_actors = stage_actors
        self._hot_update()

    def attach_serve_stages(self, store_prefix: str) -> None:
        """The recommend app's Serve stage deployments (its ``store_prefix``) to hot-update with the deployed
        stage policies whenever a training round changes them: each change publishes a new version of each
        stage's policy store (``actors.served_policies.publish_stage_policy``), which ``rollback`` undoes."""
        self.serve_store_prefix = store_prefix
        self._hot_update()

    def _policy_states(self) -> dict[str, dict]:
        return {
            s: {k: v.detach().numpy() for k, v in self.deployed_policies[s].pi.state_dict().items()} for s in STAGES
        }

    def _hot_update(self) -> None:
        states = self._policy_states()
        if self.serve_store_prefix is not None:
            for s in STAGES:
                publish_stage_policy(self.serve_store_prefix, s, states[s], STAGE_ACTION_HIGH[s])
        refs = [
            self.stage_actors[s].set_policy.remote(
                states[s],
                STAGE_ACTION_HIGH[s].tolist(),
                self.policy_version,
            )
            for s in STAGES
            if s in self.stage_actors
        ]
        ray.get(refs)

    # ---------------------------------------------------------------- checkpoints
    def own_state(self) -> dict:
        return {
            "cqr": self.cqr.state(),
            "sessions_seen": self.sessions_seen,
            "policy_version": self.policy_version,
            "buffer": self.buffer.state(),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "recent": [(_weights(p), u) for p, u in self.recent],
            "incumbent": None if self.incumbent is None else _weights(self.incumbent),
            "incumbent_usage": self.incumbent_usage,
            "critic_scale_free": self.config.critic_scale_free,  # what the saved global critic reads (φ(a) or a)
        }

    def set_own_state(self, state: dict) -> None:
        saved = state.get("critic_scale_free")
        if saved is not None and saved != self.config.critic_scale_free:
            raise ValueError(
                f"this checkpoint's global critic was trained with critic_scale_free={saved}: resume with the same "
                f"setting (.unex_rl(critic_scale_free={saved})), not {self.config.critic_scale_free}"
            )
        if saved is None and self.config.critic_scale_free:
            warnings.warn(
                "this checkpoint predates the record of critic_scale_free (on by default since session 43, off "
                "before): if its critic was trained on raw actions, resume with .unex_rl(critic_scale_free=False)",
                stacklevel=2,
            )
        self.cqr.set_state(state["cqr"])
        self.sessions_seen, self.policy_version = state["sessions_seen"], state["policy_version"]
        self.buffer.set_state(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self._sync_stage_policies()
        self.recent = [(self._policies(w), u) for w, u in state.get("recent", [])]
        self.incumbent = None if state.get("incumbent") is None else self._policies(state["incumbent"])
        self.incumbent_usage = state.get("incumbent_usage", -np.inf)

    def _policies(self, weights: dict) -> dict:
        """Stage policies (copies of the driver's modules) loaded with ``weights`` (``_weights``)."""
        out = copy.deepcopy(self.stage_policies)
        for s, w in weights.items():
            out[s].load_state_dict({k: torch.as_tensor(v) for k, v in w.items()})
        return out


def _weights(policies: dict) -> dict:
    """Stage → its module's state dict as NumPy arrays (what a checkpoint stores)."""
    return {s: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()} for s, m in policies.items()}


def _stage_of(agent_id, *args, **kwargs) -> str:
    """Agents are the stages: each maps to its own module."""
    return agent_id
