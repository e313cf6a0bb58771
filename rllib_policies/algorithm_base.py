"""The algorithm base every learner in this package builds on (RLlib's new API stack).

A learner here is an ``AlgorithmConfig`` subclass with one typed options method, an RLModule, a
Learner, and an ``AlgorithmBase`` subclass whose ``training_step`` reads top to bottom:

    batch = self.sample_episodes(n)  or  rows from Ray Data        # data
    self.update_learners(columns, module_id=…, groups=…)            # one learner-group update
    self.inference_module(module_id)                                # the driver's copy, synced
    self.metrics.log_dict({...}, key=self.metrics_key, window=1)    # results[metrics_key]

``update_learners`` hides the local vs ``num_learners`` > 0 branch (one shard per learner, rows of a
group kept together); ``own_state`` / ``set_own_state`` put an algorithm's own counters and
statistics into its checkpoints under ``metrics_key``.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS


class AlgorithmConfigBase(AlgorithmConfig):
    """The configs' shared part: subclasses name their Learner in ``default_learner_class`` and add one
    typed options method (``.outer_controller(...)``, ``.utility_agent(...)``, ``.unex_rl(...)``)."""

    default_learner_class: ClassVar[type]

    def get_default_learner_class(self):
        return self.default_learner_class


def set_provided(config: AlgorithmConfig, options: dict) -> AlgorithmConfig:
    """RLlib's options-method pattern in one place: set every option whose value is not
    ``NotProvided`` (``options`` = the typed method's ``locals()``; ``self`` is skipped)."""
    for name, value in options.items():
        if name != "self" and value is not NotProvided:
            setattr(config, name, value)
    return config


def learner_batch(columns: dict[str, np.ndarray], module_id: str = DEFAULT_MODULE_ID) -> MultiAgentBatch:
    """Equal-length columns → the MultiAgentBatch a ``LearnerGroup.update(batch=…)`` takes."""
    n = len(next(iter(columns.values())))
    return MultiAgentBatch({module_id: SampleBatch(columns)}, env_steps=n)


def shard_rows(n_rows: int, n_shards: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices for ``n_shards`` near-equal shards; with ``groups`` [n_rows] (e.g. session ids,
    any integers) every group's rows land in one shard (groups are split in order of first sight)."""
    if groups is None:
        return np.array_split(np.arange(n_rows), n_shards)
    uniq, first = np.unique(groups, return_index=True)
    ordered = uniq[np.argsort(first)]
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(ordered, n_shards)]


def nonempty_shards(shards: list[np.ndarray]) -> list[np.ndarray]:
    """The shards that hold rows; a batch with fewer groups than learners leaves some learners idle."""
    return [s for s in shards if len(s)]


class AlgorithmBase(Algorithm):
    """Shared plumbing for the package's algorithms; subclasses set ``metrics_key`` and ``config_class``."""

    metrics_key: ClassVar[str]  # results[metrics_key] and the algorithm's own checkpoint state
    config_class: ClassVar[type[AlgorithmConfig]]

    @classmethod
    def get_default_config(cls) -> AlgorithmConfig:
        return cls.config_class()

    def setup(self, config) -> None:
        super().setup(config)
        self._inference: dict[str, torch.nn.Module] = {}

    # ---------------------------------------------------------------- learners
    @property
    def num_learner_shards(self) -> int:
        """How many shards one update is split into (1 for a local learner)."""
        return 1 if self.learner_group.is_local else max(len(self.learner_group), 1)

    def update_learners(
        self,
        columns: dict[str, np.ndarray],
        *,
        module_id: str = DEFAULT_MODULE_ID,
        groups: np.ndarray | None = None,
        **update_kwargs,
    ) -> list:
        """One learner-group update on ``columns``: one batch for a local learner, else one shard per
        remote learner (``groups`` keeps each group's rows in one shard). Learner results are
        aggregated into ``results["learners"]``; the raw results are returned."""
        if self.learner_group.is_local:
            results = self.learner_group.update(batch=learner_batch(columns, module_id), **update_kwargs)
        else:
            n = len(next(iter(columns.values())))
            shards = nonempty_shards(shard_rows(n, self.num_learner_shards, groups))
            batches = [learner_batch({k: v[idx] for k, v in columns.items()}, module_id) for idx in shards]
            results = self.learner_group.update(batches=batches, **update_kwargs)
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        return results

    def learner_weights(
        self, module_ids: list[str] | tuple[str, ...] = (DEFAULT_MODULE_ID,), *, inference_only: bool = False
    ) -> dict[str, dict]:
        """The learners' current weights (NumPy state dicts) by module id; ``inference_only`` leaves out
        what inference copies do not hold (``InferenceOnlyAPI.get_non_inference_attributes``, e.g.
        target networks), as RLlib's own env-runner sync does."""
        if not inference_only:
            return self.learner_group.get_weights(list(module_ids))
        components = [f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{m}" for m in module_ids]
        return self.learner_group.get_state(components, inference_only=True)[COMPONENT_LEARNER][COMPONENT_RL_MODULE]

    def inference_module(self, module_id: str = DEFAULT_MODULE_ID, weights: dict | None = None) -> torch.nn.Module:
        """The driver's CPU copy of a module, loaded with ``weights`` (default: the learners' current
        inference weights). One copy per module id, reused across calls; never trained."""
        if module_id not in self._inference:
            module = self.get_module(module_id)
            if module is None:
                raise ValueError(
                    f"no module {module_id!r} on the env runners (learner-only modules have no driver copy)"
                )
            self._inference[module_id] = copy.deepcopy(module).cpu().eval()
        if weights is None:
            weights = self.learner_weights([module_id], inference_only=True)[module_id]
        self._inference[module_id].load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        return self._inference[module_id]

    def sync_env_runners(self) -> None:
        """Push the learners' weights to the env runners (inference-only modules)."""
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)

    # ---------------------------------------------------------------- sampling
    def sample_episodes(self, n_episodes: int) -> list:
        """``n_episodes`` fresh episodes from the env runners (split across remote runners, or the
        local one), exploring; env-runner metrics go to ``results["env_runners"]``.

        ``EnvRunner.sample(num_episodes=…)`` resets its envs on every call and, in Ray 2.60, re-seeds
        them with ``config.seed`` each time (``_needs_initial_reset`` is set again after each call):
        every iteration would replay the same users and draws. Clearing the flag after the call keeps
        the reset but not the re-seed, so each call gets new episodes (tested)."""
        n_remote = self.env_runner_group.num_remote_env_runners()
        per_runner = -(-n_episodes // max(n_remote, 1))

        def sample(runner):
            episodes = runner.sample(num_episodes=per_runner, explore=True)
            runner._needs_initial_reset = False
            return episodes

        local = n_remote == 0
        episode_lists = self.env_runner_group.foreach_env_runner(sample, local_env_runner=local)
        metrics = self.env_runner_group.foreach_env_runner(lambda r: r.get_metrics(), local_env_runner=local)
        self.metrics.aggregate(metrics, key=ENV_RUNNER_RESULTS)
        return [e for eps in episode_lists for e in eps]

    # ---------------------------------------------------------------- checkpoints
    def own_state(self) -> dict:
        """The algorithm's own counters and statistics, saved in checkpoints under ``metrics_key``."""
        return {}

    def set_own_state(self, state: dict) -> None:
        """Restore what ``own_state`` returned (called after the learners' state is restored)."""

    def get_state(self, *args, **kwargs):
        state = super().get_state(*args, **kwargs)
        state[self.metrics_key] = self.own_state()
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if self.metrics_key in state:
            self.set_own_state(state[self.metrics_key])
