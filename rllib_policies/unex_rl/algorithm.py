"""UnexRL: matching, pre-ranking and ranking as cooperating agents with one global critic, on
RLlib's new API stack (a MultiRLModule of three StageActorModules + a learner-only critic).

    config = (UnexRLConfig()
              .environment(MultiStageEnv, env_config={"world": {"n_items": 5000, "n_users": 2000}})
              .unex_rl(arm="unex_rl", cic=True, stop_gradient=True, cqr=True)
              .learners(num_learners=0))
    algo = config.build_algo()
    for _ in range(30): print(algo.train()["unex_rl"])

One iteration: ``sessions_per_iteration`` sessions are served by the current stage policies with
Gaussian exploration on the learning stages — vectorised over sessions, through the same stage
functions and the same observation builder as MultiStageEnv (the env itself steps one agent turn
at a time: ~50× slower on two cores; it pays the inner reward, the sampler pays usage time, the
long-term reward UNEX-RL optimises) — their per-request transitions (raw o_1, stage observations
and actions, usage seconds, next request) go to a replay buffer with rewards rescaled by CQR; then
``updates_per_iteration`` minibatch updates (each learner gets a full minibatch) of the critic and
the actors (learner.py), target networks by Polyak averaging.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from gymnasium import spaces
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import LEARNER_RESULTS

from actors.stages import DEFAULT_PARAMS
from rllib_policies.building_blocks import init_options, set_options
from rllib_policies.envs import STAGE_ACTION_HIGH, build_world

from .cic import STAGES, CategoryQuantileRescaler, observation_dim
from .modules import JOINT_ACTION_DIM, GlobalCriticModule, StageActorModule
from .sampler import N_ITEM_GROUPS, ReplayBuffer, sample_sessions, transitions_from_episodes

METRICS = "unex_rl"
CRITIC = "global_critic"
# arm → options (the ablations switch one piece of UNEX-RL off)
ARMS: dict[str, dict] = {
    "unex_rl": {},
    "single_agent": {"trainable_stages": ("ranking",)},
    "independent": {"critic": "independent"},
    "no_cic": {"cic": False},
    "no_sg": {"stop_gradient": False},
    "no_cqr": {"cqr": False},
}
SWITCHES = ("cic", "stop_gradient", "cqr", "critic", "trainable_stages")
_OPTIONS = dict(cic=True, stop_gradient=True, cqr=True, critic="global", trainable_stages=STAGES, tau=0.01,
                buffer_size=50_000, sessions_per_iteration=64, updates_per_iteration=16, minibatch_size=256,
                explore_std=0.1, reward_scale_s=30.0, cqr_window=4096, hidden=(64, 64), actor_lr=1e-4,
                actor_warmup_iterations=5, policy_delay=2, sampler="vectorised")


class UnexRLConfig(AlgorithmConfig):
    """AlgorithmConfig for UnexRL; ``.unex_rl(...)`` sets its own options:

    arm                  a name from ARMS (sets the switches below) — or set them one by one:
    cic                  rebuild downstream observations by replaying the cascade (False: stale buffer o_k)
    stop_gradient        detach upstream actions inside downstream observations in the actor loss
    cqr                  rewards as quantiles within (user cohort, item category tier) cells
                         (False: usage seconds / reward_scale_s)
    critic               "global" (Q_g on the joint action) | "independent" (one Q_k(o_k, a_k) per stage)
    trainable_stages     the stages whose actors learn (others keep their default parameters)
    tau, buffer_size, sessions_per_iteration, updates_per_iteration, minibatch_size, explore_std
    actor_lr             the actors' learning rate (the critic uses ``lr``)
    sampler              "vectorised" (sessions batched through the stage functions, default) or
                         "env_runner" (RLlib's MultiAgentEnvRunner stepping MultiStageEnv; needs
                         env_config {"reward": "usage"}): the same transitions, ~50× slower here
    actor_warmup_iterations, policy_delay   the critic trains alone for the first iterations, then the
                         actors update on every ``policy_delay``-th minibatch (TD3): actors that follow
                         an untrained critic walk away from good default parameters
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or UnexRL)
        init_options(self, _OPTIONS)
        self.gamma = 0.9
        self.lr = 1e-3
        self.num_env_runners = 0
        self.normalize_actions = False   # the actors emit actions in the env's units; the env clips
        self.clip_actions = False
        self.multi_agent(policies=set(STAGES), policy_mapping_fn=_stage_of)

    def unex_rl(self, arm: str | None = None, **kwargs) -> "UnexRLConfig":
        if arm is not None:   # an arm sets every switch (the defaults, then its own), then explicit kwargs
            if arm not in ARMS:
                raise ValueError(f"unknown UNEX-RL arm {arm!r}; arms: {sorted(ARMS)}")
            kwargs = {**{k: _OPTIONS[k] for k in SWITCHES}, **ARMS[arm], **kwargs}
        if kwargs.get("trainable_stages", NotProvided) is not NotProvided:
            kwargs["trainable_stages"] = tuple(kwargs["trainable_stages"])
        return set_options(self, _OPTIONS, kwargs, "unex_rl")

    def validate(self) -> None:
        super().validate()
        if self.critic not in ("global", "independent"):
            raise ValueError(f"critic must be 'global' or 'independent', got {self.critic!r}")
        bad = set(self.trainable_stages) - set(STAGES)
        if bad or not self.trainable_stages:
            raise ValueError(f"trainable_stages must be a non-empty subset of {STAGES}, got {self.trainable_stages}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.sampler not in ("vectorised", "env_runner"):
            raise ValueError(f"sampler must be 'vectorised' or 'env_runner', got {self.sampler!r}")
        if self.sampler == "env_runner" and (self.env_config or {}).get("reward") != "usage":
            raise ValueError("sampler='env_runner' trains on the env's rewards: set env_config['reward'] = 'usage' "
                             "(UNEX-RL's long-term reward is usage time)")
        if self.minibatch_size < 2 or self.sessions_per_iteration < 1:
            raise ValueError("minibatch_size must be >= 2 and sessions_per_iteration >= 1")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=StageActorModule)

    def get_multi_rl_module_spec(self, **kwargs):
        spec = super().get_multi_rl_module_spec(**kwargs)
        for s in STAGES:
            if s in spec.rl_module_specs:
                spec.rl_module_specs[s].model_config = {"hidden": self.hidden, "explore_std": self.explore_std,
                                                        "init": DEFAULT_PARAMS[s].tolist()}
        if not kwargs.get("inference_only") and CRITIC not in spec.rl_module_specs:
            d = observation_dim(build_world(self.env_config)[1])
            spec.rl_module_specs[CRITIC] = RLModuleSpec(
                module_class=GlobalCriticModule, learner_only=True,
                observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
                action_space=spaces.Box(0.0, 1.0, (JOINT_ACTION_DIM,), np.float32),
                model_config={"obs_dim": d, "n_critics": 1 if self.critic == "global" else 3})
        return spec

    def get_default_learner_class(self):
        from .learner import UnexRLLearner

        return UnexRLLearner


class UnexRL(Algorithm):
    @classmethod
    def get_default_config(cls) -> UnexRLConfig:
        return UnexRLConfig()

    def setup(self, config) -> None:
        super().setup(config)
        cfg = self.config
        self.world, self.pipeline = build_world(cfg.env_config)
        self.buffer = ReplayBuffer(cfg.buffer_size)
        self.cqr = CategoryQuantileRescaler(3, N_ITEM_GROUPS + 1, cfg.cqr_window)
        self.rng = np.random.default_rng(cfg.seed)
        # driver copies of the stage actors (serve the sampled sessions), synced from the learners
        local = self.env_runner_group.local_env_runner.module
        self.actors = {s: copy.deepcopy(local[s]).cpu().eval() for s in STAGES}
        self._sync_actors()
        self.sessions_seen = 0
        self.stage_runners: list = []          # stage actors hot-updated after each round (attach_stage_actors)
        self.policy_version = 0

    def _sync_actors(self) -> None:
        weights = self.learner_group.get_weights(list(STAGES))
        for s in STAGES:
            self.actors[s].load_state_dict({k: torch.as_tensor(v) for k, v in weights[s].items()})

    def training_step(self) -> None:
        cfg = self.config
        if cfg.sampler == "env_runner":
            from rllib_policies.outer_controller.algorithm import _sample_fresh

            n_remote = self.env_runner_group.num_remote_env_runners()
            per_runner = -(-cfg.sessions_per_iteration // max(n_remote, 1))
            episodes = self.env_runner_group.foreach_env_runner(_sample_fresh(per_runner), local_env_runner=n_remote == 0)
            batch, summary = transitions_from_episodes(self.pipeline, [e for eps in episodes for e in eps])
        else:
            batch, summary = sample_sessions(self.pipeline, self.actors, cfg.sessions_per_iteration, self.rng, explore=True,
                                             explore_std=cfg.explore_std, explore_stages=cfg.trainable_stages)
        raw = batch["reward_s"]
        if cfg.cqr:
            batch["reward"] = self.cqr.rescale(raw, batch["user_group"], batch["item_group"]).astype(np.float32)
        else:
            batch["reward"] = (raw / cfg.reward_scale_s).astype(np.float32)
        self.buffer.add(batch)
        self.sessions_seen += cfg.sessions_per_iteration
        n = max(len(self.learner_group), 1) if not self.learner_group.is_local else 1
        warm = self.iteration >= cfg.actor_warmup_iterations
        for u in range(cfg.updates_per_iteration):
            mb = self.buffer.sample(cfg.minibatch_size * n, self.rng)
            mb["actor_on"] = np.full(len(mb["reward"]), float(warm and u % cfg.policy_delay == 0), np.float32)
            if self.learner_group.is_local:
                results = self.learner_group.update(batch=_ma_batch(mb))
            else:
                shards = np.array_split(np.arange(len(mb["reward"])), n)
                results = self.learner_group.update(batches=[_ma_batch({k: v[i] for k, v in mb.items()}) for i in shards])
            self.metrics.aggregate(results, key=LEARNER_RESULTS)
        self._sync_actors()
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        self.policy_version += 1
        self._hot_update()
        self.metrics.log_dict({**summary, "sessions_seen": self.sessions_seen, "buffer_size": len(self.buffer),
                               "reward_rescaled_mean": float(batch["reward"].mean()), "policy_version": self.policy_version},
                              key=METRICS, window=1)

    def evaluate_policy(self, n_sessions: int = 500, seed: int = 0) -> dict:
        """The deterministic stage policies on fixed simulated users: usage time, return, NDCG@10."""
        _, summary = sample_sessions(self.pipeline, self.actors, n_sessions, np.random.default_rng(seed), explore=False,
                                     users_seed=seed)
        return summary

    # ---------------------------------------------------------------- stage actors
    def attach_stage_actors(self, runners: dict) -> None:
        """Stage actors (actors.stage_actors.StageActor handles, by stage) to hot-update with the
        deterministic policies after every training round."""
        self.stage_runners = runners
        self._hot_update()

    def _hot_update(self) -> None:
        if not self.stage_runners:
            return
        import ray

        refs = [self.stage_runners[s].set_policy.remote(
                    {k: v.detach().numpy() for k, v in self.actors[s].pi.state_dict().items()},
                    STAGE_ACTION_HIGH[s].tolist(), self.policy_version) for s in STAGES if s in self.stage_runners]
        ray.get(refs)

    def get_state(self, *args, **kwargs):
        state = super().get_state(*args, **kwargs)
        state[METRICS] = {"cqr": self.cqr.state(), "sessions_seen": self.sessions_seen, "policy_version": self.policy_version,
                          "buffer": self.buffer.state(), "rng": copy.deepcopy(self.rng.bit_generator.state)}
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if METRICS in state:
            own = state[METRICS]
            self.cqr.set_state(own["cqr"])
            self.sessions_seen, self.policy_version = own["sessions_seen"], own["policy_version"]
            self.buffer.set_state(own["buffer"])
            self.rng.bit_generator.state = own["rng"]
        self._sync_actors()


def _stage_of(agent_id, *args, **kwargs) -> str:
    """Agents are the stages: each maps to its own module."""
    return agent_id


def _ma_batch(columns: dict) -> MultiAgentBatch:
    return MultiAgentBatch({CRITIC: SampleBatch(columns)}, env_steps=len(columns["reward"]))
