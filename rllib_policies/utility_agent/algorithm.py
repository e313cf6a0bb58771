"""UtilityAgent: PRL-PUTS's one-step, two-head Q agent trained offline on RLlib's new API stack.

    config = (UtilityAgentConfig()
              .environment(UtilityWeightEnv, env_config={"grid": 7})
              .utility_agent(offline_requests="requests/train/")      # request rows (exploration.py)
              .training(lr=1e-3, train_batch_size_per_learner=512)
              .learners(num_learners=0))
    algo = config.build_algo()
    for _ in range(20): print(algo.train()["utility_agent"])
    actions = algo.greedy(obs, lam=0.3)          # π_λ(s)

One iteration = one shuffled pass of Ray Data over the logged request rows in minibatches of
``train_batch_size_per_learner`` rows per learner; with ``num_learners`` > 0 each minibatch is
split into one shard per learner (data parallel, gradients all-reduced by RLlib).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import LEARNER_RESULTS

from rllib_policies.building_blocks import init_options, set_options

from .exploration import OBJECTIVES, ActionGrid
from .module import UtilityQModule

METRICS = "utility_agent"
_OPTIONS = dict(grid_n=7, grid_high=(2.0, 40.0), offline_requests=None, hidden=64, shuffle_buffer_rows=8192)


class UtilityAgentConfig(AlgorithmConfig):
    """AlgorithmConfig for UtilityAgent; ``.utility_agent(...)`` sets its own options:

    grid_n, grid_high      the action grid: grid_n values of w_long_view in [0, high[0]] and of
                           w_purchase in [0, high[1]] (w_click = 1) → grid_n² actions (7 → 49)
    offline_requests       request-row Parquet path(s) (exploration.request_dataset output), required
    hidden                 width of the state/action encoders and trunk (64)
    shuffle_buffer_rows    Ray Data local shuffle buffer per pass
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or UtilityAgent)
        init_options(self, _OPTIONS)
        self.lr = 1e-3
        self.num_epochs = 1
        self.train_batch_size_per_learner = 512
        self.num_env_runners = 0

    def utility_agent(self, **kwargs) -> "UtilityAgentConfig":
        return set_options(self, _OPTIONS, kwargs, "utility_agent")

    @property
    def grid(self) -> ActionGrid:
        return ActionGrid(int(self.grid_n), tuple(self.grid_high))

    def validate(self) -> None:
        super().validate()
        self.grid   # raises ValueError naming the bad field
        if self.offline_requests is None:
            raise ValueError("utility_agent(offline_requests=…) is required: the agent trains offline on logged "
                             "request rows (see rllib_policies.utility_agent.exploration)")
        if self.train_batch_size_per_learner < 2:
            raise ValueError(f"train_batch_size_per_learner must be >= 2, got {self.train_batch_size_per_learner}")
        env_grid = (self.env_config or {}).get("grid", 7), tuple((self.env_config or {}).get("grid_high", (2.0, 40.0)))
        if env_grid != (self.grid_n, tuple(self.grid_high)):
            raise ValueError(f"env_config grid {env_grid} differs from utility_agent grid "
                             f"{(self.grid_n, tuple(self.grid_high))}: set both to the same grid")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=UtilityQModule,
                            model_config={"grid": self.grid.weights.tolist(), "hidden": self.hidden})

    def get_default_learner_class(self):
        from .learner import UtilityQLearner

        return UtilityQLearner


class UtilityAgent(Algorithm):
    @classmethod
    def get_default_config(cls) -> UtilityAgentConfig:
        return UtilityAgentConfig()

    def setup(self, config) -> None:
        super().setup(config)
        self._dataset = None
        self._probe = copy.deepcopy(self.get_module()).cpu().eval()   # driver-side copy for greedy/q_values
        self.rows_seen = 0

    # ---------------------------------------------------------------- data
    def _load(self) -> None:
        import ray.data

        self._dataset = ray.data.read_parquet(self.config.offline_requests, num_cpus=0.25).materialize()
        n = self._dataset.count()
        if n < 2:
            raise ValueError(f"{self.config.offline_requests!r} holds {n} request rows; need at least 2")
        cols = list(OBJECTIVES)
        mean = np.array([self._dataset.mean(c) for c in cols], np.float32)
        std = np.array([self._dataset.std(c) for c in cols], np.float32)
        self.learner_group.foreach_learner(lambda learner: learner.module[DEFAULT_MODULE_ID].unwrapped()
                                           .set_reward_scale(mean, std))
        self.reward_scale = (mean, std)

    # ---------------------------------------------------------------- training
    def training_step(self) -> None:
        if self._dataset is None:
            self._load()
        n_learners = max(len(self.learner_group), 1) if not self.learner_group.is_local else 1
        batch_rows = self.config.train_batch_size_per_learner * n_learners
        seen = 0
        for table in self._dataset.iter_batches(batch_size=batch_rows, batch_format="pyarrow", drop_last=False,
                                                local_shuffle_buffer_size=self.config.shuffle_buffer_rows,
                                                local_shuffle_seed=int(self.iteration)):
            if table.num_rows < 2 * n_learners:
                continue
            self._update(_columns(table))
            seen += table.num_rows
        self.rows_seen += seen
        self.metrics.log_dict({"rows_in_pass": seen, "rows_seen": self.rows_seen}, key=METRICS, window=1)

    def _update(self, columns: dict) -> None:
        if self.learner_group.is_local:
            results = self.learner_group.update(batch=_ma_batch(columns), num_epochs=self.config.num_epochs)
        else:
            shards = np.array_split(np.arange(len(columns["rewards"])), len(self.learner_group))
            results = self.learner_group.update(batches=[_ma_batch({k: v[s] for k, v in columns.items()}) for s in shards],
                                                num_epochs=self.config.num_epochs)
        self.metrics.aggregate(results, key=LEARNER_RESULTS)

    # ---------------------------------------------------------------- inference on the driver
    def module_snapshot(self) -> UtilityQModule:
        """The driver's copy of the module with the learners' current weights."""
        weights = self.learner_group.get_weights([DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID]
        self._probe.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        return self._probe

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q(s, a) for every action, reward units: [B, A, 2]."""
        with torch.no_grad():
            return self.module_snapshot().q_values(torch.as_tensor(obs)).numpy()

    def greedy(self, obs: np.ndarray, lam: float) -> np.ndarray:
        """π_λ(s) = argmax_a λ·Q̃₁ + (1 − λ)·Q̃₂ → action indices [B]."""
        with torch.no_grad():
            return self.module_snapshot().greedy(torch.as_tensor(obs), lam).numpy()


def _columns(table) -> dict:
    from .exploration import as_arrays

    a = as_arrays(table)
    return {Columns.OBS: a["obs"], Columns.ACTIONS: a["action"], "rewards": a["rewards"], "propensity": a["propensity"]}


def _ma_batch(columns: dict) -> MultiAgentBatch:
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=len(columns["rewards"]))
