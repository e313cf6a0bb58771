"""Train an offline-RL fusion-ranking policy from logged sessions: the `ray job submit` entrypoint of every offline
learner (rllib_policies.jobs runs it; one config file per learner in rllib_policies/configs/offline_*.yaml).

    ray job submit --working-dir . -- python -m rllib_policies.train_offline \\
        --config rllib_policies/configs/offline_bcq.yaml
    python -m rllib_policies.train_offline --config … --resume latest      # continue a run

``learner``: td3, bcq or uwac (ours, rllib_policies.offline.td3 / bcq / uwac) or bc, cql, iql (RLlib's, configured:
rllib_policies.offline.shipped). ``dataset``: transition Parquet under the storage root; when it is missing the
job first writes it — ``sessions_per_day`` × 2 simulated days served by the ``dataset_kind`` behaviour policy
(exploratory, concurrent, imitation or misaligned), through the telemetry path (rllib_policies.offline.data). At the
end the off-policy gate (rllib_policies.offline.gate) says whether the policy would be promoted over the behaviour
policy on those logs, and the simulator says what it is really worth.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from actors.cascade import build_world
from actors.stages import RANKING_ACTION_HIGH
from rllib_policies.envs import SessionEnv
from rllib_policies.jobs import AlgorithmJobConfig, job_main
from rllib_policies.offline.data import DATASETS, eval_users, oracle_expert, read_rows, true_value, write_dataset
from rllib_policies.offline.gate import gate
from rllib_policies.offline.registry import LEARNERS, own_config
from rllib_policies.offline.shipped import SHIPPED, ShippedOffline, shipped_config


@dataclass
class OfflineJobConfig(AlgorithmJobConfig):
    env_config: dict = field(default_factory=lambda: {"preset": "default", "world": {"n_items": 5000, "n_users": 2000}})
    learner: str = "bcq"
    dataset: str = "offline/concurrent/rows.parquet"  # under the storage root
    dataset_kind: str = "concurrent"  # the behaviour that writes a missing dataset
    sessions_per_day: int = 500
    offline_rl: dict = field(default_factory=dict)  # OfflineConfig.offline_rl(...) / the shipped learners' budget
    options: dict = field(default_factory=dict)  # .td3(...) / .bcq(...) / .uwac(...) options; shipped_config's
    iterations: int = 8
    checkpoint_dir: str = "offline_rl"
    checkpoint_every: int = 4
    eval_sessions: int = 1000
    gate_steps: int = 1000  # FQE's gradient steps per fit
    gate_boot: int = 3  # FQE's bootstrap refits

    def validate(self) -> None:
        if self.learner not in LEARNERS:
            raise ValueError(f"learner must be one of {LEARNERS}, got {self.learner!r}")
        if self.dataset_kind not in DATASETS:
            raise ValueError(f"dataset_kind must be one of {DATASETS}, got {self.dataset_kind!r}")
        if self.learner in SHIPPED and (cloning := [k for k in ("bc_steps", "bc_actor_lr") if k in self.options]):
            # the job trains RLlib's algorithm itself; the per-call switch lives in ShippedOffline.train
            raise ValueError(
                f"options.{', options.'.join(cloning)}: not in this job (it trains RLlib's algorithm directly); "
                "ShippedOffline and benchmarks/offline_rl.py take them"
            )


def ensure_dataset(job: OfflineJobConfig) -> str:
    """The dataset's path, written first when missing (the imitation expert is the oracle's)."""
    if not os.path.exists(job.dataset):
        _, pipeline = build_world(job.env_config)
        expert = oracle_expert(pipeline) if job.dataset_kind == "imitation" else None
        out_dir = os.path.dirname(job.dataset)
        info = write_dataset(job.dataset_kind, job.env_config, out_dir, 2, job.sessions_per_day, job.seed, expert)
        if info["path"] != job.dataset:
            os.replace(info["path"], job.dataset)
        print(f"wrote the {job.dataset_kind} dataset: {info['sessions']} sessions, {info['transitions']} transitions")
    return job.dataset


def build(job: OfflineJobConfig):
    job.validate()
    path = ensure_dataset(job)
    if job.learner in SHIPPED:
        _, pipeline = build_world(job.env_config)
        budget = {k: v for k, v in job.offline_rl.items() if k in ("updates_per_iteration", "batch_size", "hidden")}
        config = shipped_config(job.learner, path, pipeline.spec.context_dim, job.seed, **budget, **job.options)
        return config.build_algo()
    config = job.algorithm_config(own_config(job.learner, job.options), SessionEnv)
    return config.offline_rl(dataset=path, **job.offline_rl).build_algo()


def progress(result: dict) -> str:
    learner = result.get("learners", {}).get("default_policy", {})
    losses = " | ".join(f"{k} {float(v):.3f}" for k, v in learner.items() if k.endswith("loss"))
    own = result.get("offline")
    return (f"critic's V̂ {own['q_estimate']:.2f} | " if own else "") + losses


def policy_of(algo, job: OfflineJobConfig, initial_obs):
    """obs → ranking weights, and the critic's estimate at the session starts ``initial_obs`` (NaN for BC)."""
    if job.learner in SHIPPED:
        wrapper = ShippedOffline.wrap(job.learner, algo, **job.options)
        return wrapper.policy_weights, wrapper.q_estimate(initial_obs)
    return algo.policy_weights, algo.q_estimate(initial_obs)


def after(algo, job: OfflineJobConfig) -> None:
    """The gate's verdict on the logs, and the truth from the simulator."""
    rows = read_rows(job.dataset)
    initial_obs = rows["obs"][rows["t"] == 0]
    policy, estimate = policy_of(algo, job, initial_obs)
    decision = gate(rows, policy, RANKING_ACTION_HIGH, n_boot=job.gate_boot, steps=job.gate_steps, seed=job.seed)
    _, pipeline = build_world(job.env_config)
    users = eval_users(pipeline, job.eval_sessions)
    truth = true_value(pipeline, policy, users).mean()
    weights = np.round(policy(initial_obs).mean(0), 3).tolist()
    print(
        f"gate: {decision.reason} (FQE {decision.fqe.value:.2f} [{decision.fqe.low:.2f}, {decision.fqe.high:.2f}], "
        f"DR {decision.dr.value:.2f}, ESS {decision.dr.ess:.0f}); critic's V̂ {estimate:.2f}; true V on "
        f"{job.eval_sessions} simulated sessions {truth:.2f}; mean weights {weights}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    return job_main(OfflineJobConfig, build, progress, argv, description=__doc__, after=after)


if __name__ == "__main__":
    sys.exit(main())
