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

``select_from: N`` (gradient steps) serves a checkpoint instead of the last iterate: the gate runs on the logs at each
checkpoint from N steps on, its verdicts go to ``<checkpoint_dir>/selection.json``, and the end reports the checkpoint
with the highest FQE lower bound (OPE-based checkpoint selection; no look at the true value; a resumed run keeps the
verdicts). CQL's ``bc_steps`` / ``bc_actor_lr`` (its warm start by cloning the logs) are switched before each
``train()`` call, as ``ShippedOffline.train`` does. CQL's learning-test recipe on the misaligned logs:
``options: {min_q_weight: 0.01, bc_steps: 800, actor_lr: 0.001}`` with ``select_from: 800`` (docs/offline_rl.md).
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from actors.cascade import build_world
from actors.stages import RANKING_ACTION_HIGH
from rllib_policies import storage
from rllib_policies.envs import SessionEnv
from rllib_policies.jobs import AlgorithmJobConfig, checkpoint_path, job_main, restore_checkpoint
from rllib_policies.offline.common import is_int
from rllib_policies.offline.data import DATASETS, eval_users, oracle_expert, read_rows, true_value, write_dataset
from rllib_policies.offline.gate import best_bound, gate
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
    # None: serve the last iterate. N: serve, among the checkpoints from N gradient steps on, the one with the highest
    # FQE lower bound on the logs (``selection.json`` under checkpoint_dir)
    select_from: int | None = None

    def validate(self) -> None:
        if self.learner not in LEARNERS:
            raise ValueError(f"learner must be one of {LEARNERS}, got {self.learner!r}")
        if self.dataset_kind not in DATASETS:
            raise ValueError(f"dataset_kind must be one of {DATASETS}, got {self.dataset_kind!r}")
        if self.select_from is not None and (not is_int(self.select_from) or self.select_from < 0):
            raise ValueError(f"select_from must be None or gradient steps, an int >= 0, got {self.select_from!r}")

    @property
    def selection_path(self) -> str:
        return storage.join(self.checkpoint_dir, "selection.json")


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


def learner_of(algo, job: OfflineJobConfig):
    """The algorithm behind the offline learners' interface (``policy_weights``, ``q_estimate``): RLlib's wrapped in
    ``ShippedOffline``, ours as built."""
    return ShippedOffline.wrap(job.learner, algo, **job.options) if job.learner in SHIPPED else algo


def policy_of(algo, job: OfflineJobConfig, initial_obs):
    """obs → ranking weights, and the critic's estimate at the session starts ``initial_obs`` (NaN for BC)."""
    learner = learner_of(algo, job)
    return learner.policy_weights, learner.q_estimate(initial_obs)


def gradient_steps(algo, job: OfflineJobConfig) -> int:
    if job.learner in SHIPPED:
        return learner_of(algo, job).steps
    return algo.iteration * algo.config.updates_per_iteration


def judge(policy, job: OfflineJobConfig, rows: dict):
    """The gate's decision on ``policy`` over the logs ``rows``."""
    return gate(rows, policy, RANKING_ACTION_HIGH, n_boot=job.gate_boot, steps=job.gate_steps, seed=job.seed)


def before(algo, job: OfflineJobConfig) -> None:
    """A fresh run starts a fresh selection: verdicts of an earlier run in the same checkpoint_dir are dropped."""
    if job.select_from is not None:
        storage.write_json(job.selection_path, {"select_from": job.select_from, "checkpoints": []})


def before_call(algo, job: OfflineJobConfig) -> None:
    if job.learner in SHIPPED:
        learner_of(algo, job).before_call()


def at_checkpoint(algo, job: OfflineJobConfig, path: str) -> None:
    """With ``select_from``: the gate's verdict on the checkpoint's policy, kept in ``selection.json`` (a verdict of
    this iteration or a later one, from a run resumed from an earlier checkpoint, is replaced)."""
    steps = gradient_steps(algo, job)
    if job.select_from is None or steps < job.select_from:
        return
    rows = read_rows(job.dataset)
    decision = judge(learner_of(algo, job).policy_weights, job, rows)
    kept = [c for c in read_selection(job) if c["iteration"] < algo.iteration]
    kept.append(
        {
            "iteration": algo.iteration,
            "steps": steps,
            "checkpoint": path,
            "fqe_low": decision.fqe.low,
            "promote": decision.promote,
            "reason": decision.reason,
        }
    )
    storage.write_json(job.selection_path, {"select_from": job.select_from, "checkpoints": kept})
    print(f"gate at {steps} steps: FQE lower bound {decision.fqe.low:.2f} ({decision.reason})", flush=True)


def read_selection(job: OfflineJobConfig, upto: int | None = None) -> list[dict]:
    """The checkpoints' verdicts in ``selection.json`` (those up to iteration ``upto``, when given)."""
    if not storage.exists(job.selection_path):
        return []
    verdicts = storage.read_json(job.selection_path)["checkpoints"]
    return verdicts if upto is None else [c for c in verdicts if c["iteration"] <= upto]


def served_checkpoint(verdicts: list[dict]) -> dict | None:
    """Among the checkpoints' ``verdicts``, the highest FQE lower bound (a tie: the later; an estimator that
    abstained, NaN, ranks last); None without any."""
    return verdicts[best_bound([c["fqe_low"] for c in verdicts])] if verdicts else None


def after(algo, job: OfflineJobConfig) -> None:
    """The gate's verdict on the logs, and the truth from the simulator, for the last iterate or (``select_from``)
    the checkpoint with the highest FQE lower bound."""
    if job.select_from is not None:
        verdicts = read_selection(job, upto=algo.iteration)
        if gradient_steps(algo, job) >= job.select_from and algo.iteration not in {c["iteration"] for c in verdicts}:
            # its checkpoint saved but not judged (the job stopped between the two): judge it now
            at_checkpoint(algo, job, checkpoint_path(job.checkpoint_dir, algo.iteration))
            verdicts = read_selection(job, upto=algo.iteration)
        served = served_checkpoint(verdicts)
        if served is None:
            print(f"select_from {job.select_from}: no checkpoint at or after that many steps; serving the last iterate")
        else:
            print(
                f"served: {served['checkpoint']} ({served['steps']} steps), the highest FQE lower bound "
                f"({served['fqe_low']:.2f}) of {len(verdicts)} checkpoint(s) from {job.select_from} steps",
                flush=True,
            )
            if served["iteration"] != algo.iteration:
                restored = restore_checkpoint(served["checkpoint"])
                try:
                    return evaluate(restored, job)
                finally:
                    restored.stop()
                    del restored
                    gc.collect()  # its Ray Data iterators, while Ray is up (``ShippedOffline.stop``)
    evaluate(algo, job)


def evaluate(algo, job: OfflineJobConfig) -> None:
    rows = read_rows(job.dataset)
    initial_obs = rows["obs"][rows["t"] == 0]
    policy, estimate = policy_of(algo, job, initial_obs)
    decision = judge(policy, job, rows)
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
    return job_main(
        OfflineJobConfig,
        build,
        progress,
        argv,
        description=__doc__,
        before=before,
        after=after,
        before_call=before_call,
        at_checkpoint=at_checkpoint,
    )


if __name__ == "__main__":
    sys.exit(main())
