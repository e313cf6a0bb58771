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

import numpy as np
import ray.data
import torch
from ray.data.aggregate import Count, Mean, Std
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_policies.algorithm_base import AlgorithmBase, AlgorithmConfigBase, set_provided

from .exploration import OBJECTIVES, ActionGrid, as_arrays
from .learner import UtilityQLearner
from .module import UtilityQModule


class UtilityAgentConfig(AlgorithmConfigBase):
    """AlgorithmConfig for UtilityAgent; ``.utility_agent(...)`` sets its own options."""

    default_learner_class = UtilityQLearner

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or UtilityAgent)
        self.grid_n = 7
        self.grid_high = (2.0, 40.0)
        self.offline_requests = None
        self.hidden = 64
        self.shuffle_buffer_rows = 8192
        self.lr = 1e-3
        self.num_epochs = 1
        self.train_batch_size_per_learner = 512
        self.num_env_runners = 0

    def utility_agent(
        self,
        *,
        grid_n: int = NotProvided,
        grid_high: tuple[float, float] = NotProvided,
        offline_requests: str | list[str] | None = NotProvided,
        hidden: int = NotProvided,
        shuffle_buffer_rows: int = NotProvided,
    ) -> UtilityAgentConfig:
        """Sets the utility agent's own options.

        Args:
            grid_n: Values per weight on the action grid: ``grid_n`` values of w_long_view in
                [0, grid_high[0]] and of w_purchase in [0, grid_high[1]] (w_click = 1) → grid_n²
                actions (7 → 49). Must match the env's ``env_config["grid"]``.
            grid_high: The two weights' upper ends (w_long_view, w_purchase).
            offline_requests: Request-row Parquet path(s) (``exploration.request_dataset`` output);
                required, the agent trains offline on logged requests.
            hidden: Width of the state / action encoders and of the trunk.
            shuffle_buffer_rows: Ray Data's local shuffle buffer (rows) for each pass.

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    @property
    def grid(self) -> ActionGrid:
        return ActionGrid(int(self.grid_n), tuple(self.grid_high))

    def validate(self) -> None:
        super().validate()
        _ = self.grid  # ActionGrid raises a ValueError naming the bad field
        if self.offline_requests is None:
            raise ValueError(
                "utility_agent(offline_requests=…) is required: the agent trains offline on logged "
                "request rows (see rllib_policies.utility_agent.exploration)"
            )
        if self.train_batch_size_per_learner < 2:
            raise ValueError(f"train_batch_size_per_learner must be >= 2, got {self.train_batch_size_per_learner}")
        env = self.env_config or {}
        env_grid = env.get("grid", 7), tuple(env.get("grid_high", (2.0, 40.0)))
        if env_grid != (self.grid_n, tuple(self.grid_high)):
            raise ValueError(
                f"env_config grid {env_grid} differs from utility_agent grid "
                f"{(self.grid_n, tuple(self.grid_high))}: set both to the same grid"
            )

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=UtilityQModule, model_config={"grid": self.grid.weights.tolist(), "hidden": self.hidden}
        )


class UtilityAgent(AlgorithmBase):
    """One iteration = one shuffled pass over the request rows; ``results["utility_agent"]`` holds
    the pass's and the run's row counts."""

    metrics_key = "utility_agent"
    config_class = UtilityAgentConfig

    def setup(self, config) -> None:
        super().setup(config)
        self._dataset = None
        self.rows_seen = 0
        self.reward_scale: tuple[np.ndarray, np.ndarray] | None = None  # (μ, σ) per head, from the logs

    # ---------------------------------------------------------------- data
    def _load(self) -> None:
        """Materialise the request rows and set every learner's reward scale (μ_k, σ_k)."""
        self._dataset = ray.data.read_parquet(self.config.offline_requests, num_cpus=0.25).materialize()
        # one aggregation job for the count and every head's mean and σ (one job each cost seconds apiece)
        stats = self._dataset.aggregate(
            Count(alias_name="n"),
            *(Mean(c, alias_name=f"mean_{c}") for c in OBJECTIVES),
            *(Std(c, alias_name=f"std_{c}") for c in OBJECTIVES),
        )
        n = (stats or {}).get("n") or 0  # None: no rows at all
        if n < 2:
            raise ValueError(f"{self.config.offline_requests!r} holds {n} request rows; need at least 2")
        mean = np.array([stats[f"mean_{c}"] for c in OBJECTIVES], np.float32)
        std = np.array([stats[f"std_{c}"] for c in OBJECTIVES], np.float32)
        self.learner_group.foreach_learner(
            lambda learner: learner.module[DEFAULT_MODULE_ID].unwrapped().set_reward_scale(mean, std)
        )
        self.reward_scale = (mean, std)

    # ---------------------------------------------------------------- training
    def training_step(self) -> None:
        if self._dataset is None:
            self._load()
        shards = self.num_learner_shards
        seen = 0
        for table in self._dataset.iter_batches(
            batch_size=self.config.train_batch_size_per_learner * shards,
            batch_format="pyarrow",
            drop_last=False,
            local_shuffle_buffer_size=self.config.shuffle_buffer_rows,
            local_shuffle_seed=int(self.iteration),
        ):
            if table.num_rows < 2 * shards:
                continue
            self.update_learners(learner_columns(table), num_epochs=self.config.num_epochs)
            seen += table.num_rows
        self.rows_seen += seen
        self.metrics.log_dict({"rows_in_pass": seen, "rows_seen": self.rows_seen}, key=self.metrics_key, window=1)

    # ---------------------------------------------------------------- checkpoints
    def own_state(self) -> dict:
        scale = None if self.reward_scale is None else [s.tolist() for s in self.reward_scale]
        return {"rows_seen": self.rows_seen, "reward_scale": scale}

    def set_own_state(self, state: dict) -> None:
        self.rows_seen = int(state["rows_seen"])
        scale = state.get("reward_scale")
        self.reward_scale = None if scale is None else tuple(np.asarray(s, np.float32) for s in scale)

    # ---------------------------------------------------------------- inference on the driver
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q(s, a) for every action, reward units: [B, A, 2]."""
        with torch.no_grad():
            return self.inference_module().q_values(torch.as_tensor(obs)).numpy()

    def greedy(self, obs: np.ndarray, lam: float) -> np.ndarray:
        """π_λ(s) = argmax_a λ·Q̃₁ + (1 − λ)·Q̃₂ → action indices [B]."""
        with torch.no_grad():
            return self.inference_module().greedy(torch.as_tensor(obs), lam).numpy()


def learner_columns(table) -> dict[str, np.ndarray]:
    """Request rows (pyarrow) → the learner batch's columns: obs, actions, rewards [N, 2], propensity."""
    a = as_arrays(table)
    return {Columns.OBS: a["obs"], Columns.ACTIONS: a["action"], "rewards": a["rewards"], "propensity": a["propensity"]}
