"""BC, CQL and IQL as RLlib ships them (configured, not rewritten), on the same logged datasets.

RLlib reads the transitions itself (``config.offline_data``: Ray Data, its OfflinePreLearner). Two things
differ from our own learners, both measured on Ray 2.60 (docs/offline_rl.md):

- CQL's and IQL's policies are tanh-squashed Gaussians whose bounds are fixed at [−1, 1] (the action space's
  bounds never reach the distribution), so they train on a copy of the rows with actions mapped to
  u = 2·a/a_max − 1 (kept 10⁻³ inside the edges) under ``Box(−1, 1)``, and serve a = a_max·(tanh(m) + 1)/2
  of the mean m. BC (a plain Gaussian) trains on the same copy and serves a_max·(clip(m, −1, 1) + 1)/2.
- Offline RLlib algorithms have no env runners: the trained module is the local learner's
  (``num_learners=0``), and CQL must be told it is offline (``_is_online = False``), else it builds an env.

    algo = ShippedOffline("cql", rows_path, observation_dim=37, seed=0)
    algo.train(); algo.policy_weights(obs); algo.q_estimate(initial_obs); algo.stop()
"""

from __future__ import annotations

import gc
import os

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.rllib.algorithms.bc import BCConfig
from ray.rllib.algorithms.cql import CQLConfig
from ray.rllib.algorithms.iql import IQLConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns

from actors.stages import RANKING_ACTION_HIGH

SHIPPED = ("bc", "cql", "iql")
EDGE = 1e-3  # unit actions stay this far inside ±1 (atanh of ±1 is infinite)


def unit_rows(path: str) -> str:
    """A copy of the rows at ``path`` with actions u = 2·a/a_max − 1 ∈ [−1 + ε, 1 − ε] (written once, beside it)."""
    out = os.path.splitext(path)[0] + "_unit.parquet"
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(path):
        return out
    table = pq.read_table(path)
    actions = np.asarray(table.column("actions").to_pylist(), np.float32)
    unit = np.clip(2 * actions / RANKING_ACTION_HIGH - 1, -1 + EDGE, 1 - EDGE).astype(np.float32)
    column = pa.array(unit.tolist(), pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("actions"), "actions", column)
    pq.write_table(table, out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def to_weights(unit: np.ndarray) -> np.ndarray:
    """u ∈ [−1, 1]³ → ranking weights a = a_max·(u + 1)/2."""
    return RANKING_ACTION_HIGH * (np.clip(unit, -1, 1) + 1) / 2


def shipped_config(
    name: str,
    rows_path: str,
    observation_dim: int,
    seed: int = 0,
    updates_per_iteration: int = 200,
    batch_size: int = 256,
    gamma: float = 1.0,
    hidden: tuple[int, ...] = (128, 128),
    tau: float = 0.02,
    num_actions: int = 10,
):
    """The RLlib config of ``name`` ∈ {"bc", "cql", "iql"} on the unit-action copy of ``rows_path``.

    CQL: Polyak rate ``tau`` as our learners'; ``bc_iters=0`` (its default of 20 000 steps of behaviour
    cloning first would be most of our budget); ``lr=None`` (it has actor/critic/alpha rates of its own);
    ``num_actions`` sampled actions per state in its penalty. Every learner gets ``updates_per_iteration``
    minibatches of ``batch_size`` per ``train()``; the mapped data are materialised once (IQL's default
    re-runs its pre-learner every iteration)."""
    if name == "bc":
        config = BCConfig().training(train_batch_size_per_learner=batch_size, lr=1e-3)
    elif name == "cql":
        config = CQLConfig().training(
            train_batch_size_per_learner=batch_size,
            gamma=gamma,
            lr=None,
            tau=tau,
            bc_iters=0,
            num_actions=num_actions,
            num_steps_sampled_before_learning_starts=0,
        )
    elif name == "iql":
        config = IQLConfig().training(train_batch_size_per_learner=batch_size, gamma=gamma)
    else:
        raise ValueError(f"unknown shipped offline learner {name!r}; choose from {SHIPPED}")
    config = (
        config.environment(
            observation_space=gym.spaces.Box(-np.inf, np.inf, (observation_dim,), np.float32),
            action_space=gym.spaces.Box(-1.0, 1.0, (len(RANKING_ACTION_HIGH),), np.float32),
        )
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        # RLlib's catalog: an encoder (fcnet_hiddens, the last width its output) then a head: widths (h1, h2)
        # give the same MLP as ours, (s[, a]) → h1 → h2 → out
        .rl_module(model_config={"fcnet_hiddens": [hidden[0]], "head_fcnet_hiddens": list(hidden[1:])})
        .offline_data(
            input_=[unit_rows(rows_path)],
            dataset_num_iters_per_learner=max(int(updates_per_iteration), 2),  # 1 breaks CQL's local learner
            # fractional CPUs: with whole ones the pre-learner actor starves the read tasks on a 1–2 CPU Ray (hangs)
            input_read_method_kwargs={"num_cpus": 0.25},
            map_batches_kwargs={"concurrency": 1, "num_cpus": 0.25},
            iter_batches_kwargs={"prefetch_batches": 1},
            materialize_data=False,
            materialize_mapped_data=True,
        )
        .reporting(min_time_s_per_iteration=0, min_train_timesteps_per_iteration=0)
        .debugging(seed=seed, log_level="ERROR")
    )
    if name == "cql":
        config._is_online = False  # CQL's config builds an env otherwise ("config.env is not provided")
    return config


class ShippedOffline:
    """One of RLlib's offline learners behind the interface our own offline learners have."""

    def __init__(self, name: str, rows_path: str, observation_dim: int, seed: int = 0, **options):
        self.name = name
        self.algo = shipped_config(name, rows_path, observation_dim, seed, **options).build_algo()

    @classmethod
    def wrap(cls, name: str, algo) -> ShippedOffline:
        """The interface around an already built (or restored) RLlib algorithm of learner ``name``."""
        self = cls.__new__(cls)
        self.name, self.algo = name, algo
        return self

    @property
    def module(self):
        return self.algo.learner_group._learner.module[DEFAULT_MODULE_ID]

    def train(self) -> dict:
        return self.algo.train()

    @torch.no_grad()
    def _unit_mean(self, obs: np.ndarray) -> torch.Tensor:
        out = self.module.forward_inference({Columns.OBS: torch.as_tensor(obs, dtype=torch.float32)})
        mean = out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)[0]
        return mean if self.name == "bc" else torch.tanh(mean)

    def policy_weights(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic policy (the distribution's mean) as ranking weights [B, 3]."""
        return to_weights(self._unit_mean(obs).numpy())

    @torch.no_grad()
    def q_estimate(self, initial_obs: np.ndarray) -> float:
        """mean_s0 Q(s0, π(s0)) (RLlib's ``compute_q_values``: the min of the twin critics); NaN for BC."""
        if self.name == "bc":
            return float("nan")
        unit = self._unit_mean(initial_obs).clamp(-1 + EDGE, 1 - EDGE)
        q = self.module.compute_q_values(
            {Columns.OBS: torch.as_tensor(initial_obs, dtype=torch.float32), Columns.ACTIONS: unit}
        )
        return float(q.mean())

    def stop(self) -> None:
        """Stop the algorithm and collect its Ray Data iterators while Ray is up (collected after a shutdown,
        each prints a "Ray is not initialized" traceback)."""
        self.algo.stop()
        self.algo = None
        gc.collect()
