"""Train the outer controller: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m rllib_policies.train_outer_controller \\
        --config rllib_policies/configs/outer_controller.yaml
    python -m rllib_policies.train_outer_controller --config … --resume latest   # continue a run

Prints one progress line per iteration, checkpoints every ``checkpoint_every`` iterations (and at
the end) under ``checkpoint_dir/iter_NNNNNN``, writes TensorBoard scalars to
``checkpoint_dir/tensorboard``. ``--resume latest`` (or a checkpoint path) restores the algorithm
with its learner, optimizer, baselines, KPI gate counter and KL reference, and goes on from there.
Optional: ``warm_start_trajectories`` (behaviour cloning on logged sessions before training) and
``push_inner_reward_url`` (PUT the fitted inner-reward weights to that service at the end).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from rllib_policies.jobs import config_from_yaml, init_ray


@dataclass
class TrainJobConfig:
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 2000}})
    outer_controller: dict = field(default_factory=dict)      # OuterControllerConfig.outer_controller(...) options
    training: dict = field(default_factory=dict)              # lr, num_epochs, gamma, …
    learners: dict = field(default_factory=dict)              # num_learners, num_cpus_per_learner, …
    env_runners: dict = field(default_factory=lambda: {"num_env_runners": 0, "num_envs_per_env_runner": 8})
    iterations: int = 20
    checkpoint_dir: str = "runs/outer_controller"
    checkpoint_every: int = 5
    seed: int = 0
    warm_start_trajectories: str | None = None
    warm_start_iterations: int = 20
    push_inner_reward_url: str | None = None
    num_cpus: int | None = None                               # only when starting a local Ray (not under a job)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainJobConfig":
        return config_from_yaml(cls, path)


def build_algo_config(job: TrainJobConfig):
    from rllib_policies.envs import SessionEnv
    from rllib_policies.outer_controller import OuterControllerConfig

    return (OuterControllerConfig()
            .environment(SessionEnv, env_config={**job.env_config, "seed": job.seed})
            .env_runners(**job.env_runners).learners(**job.learners).training(**job.training)
            .debugging(seed=job.seed, log_level="ERROR")
            .outer_controller(**job.outer_controller))


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(checkpoint_dir, "iter_*")))
    return found[-1] if found else None


def progress_line(it: int, result: dict, seconds: float) -> str:
    oc, lr = result["outer_controller"], result["learners"]["default_policy"]
    return (f"iter {it:4d} | sessions {int(oc['sessions_seen']):7d} | κ {oc['kappa']:.2f} | KL {oc['kl_from_reference']:.3f} "
            f"| rollbacks {int(oc['rollbacks'])} | inner {oc['inner_reward_mean']:.2f} | outer {oc['outer_reward_mean']:.2f} "
            f"| ndcg {oc.get('kpi_ndcg', float('nan')):.3f} | pg_loss {lr['pg_loss']:.3f} | {seconds:.1f} s")


def scalars(result: dict) -> dict[str, float]:
    """The iteration's finite numeric metrics, by TensorBoard tag."""
    out = {f"outer_controller/{k}": v for k, v in result["outer_controller"].items()}
    out.update({f"learner/{k}": v for k, v in result["learners"]["default_policy"].items()})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float, np.number)) and np.isfinite(v)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with TrainJobConfig fields")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--iterations", type=int, default=None,
                   help="run this many more iterations (default: up to the config's total, counting resumed ones)")
    args = p.parse_args(argv)
    job = TrainJobConfig.from_yaml(args.config)

    from ray.rllib.algorithms.algorithm import Algorithm
    from tensorboardX import SummaryWriter

    init_ray(job.num_cpus)
    os.makedirs(job.checkpoint_dir, exist_ok=True)
    resume = latest_checkpoint(job.checkpoint_dir) if args.resume == "latest" else args.resume
    if resume:
        algo = Algorithm.from_checkpoint(os.path.abspath(resume))
        print(f"resumed from {resume} at iteration {algo.iteration}", flush=True)
    else:
        algo = build_algo_config(job).build_algo()
        if job.warm_start_trajectories:
            print(f"warm start: {algo.warm_start(job.warm_start_trajectories, job.warm_start_iterations)}", flush=True)
    # --iterations: that many more; otherwise up to the config's total (a resumed run finishes the plan)
    iterations = args.iterations if args.iterations is not None else max(job.iterations - algo.iteration, 0)
    writer = SummaryWriter(os.path.join(job.checkpoint_dir, "tensorboard"))
    start_iter = algo.iteration
    for _ in range(iterations):
        t0 = time.perf_counter()
        result = algo.train()
        it = algo.iteration
        print(progress_line(it, result, time.perf_counter() - t0), flush=True)
        for tag, value in scalars(result).items():
            writer.add_scalar(tag, float(value), it)
        if it % job.checkpoint_every == 0 or it == start_iter + iterations:
            path = algo.save_to_path(os.path.abspath(os.path.join(job.checkpoint_dir, f"iter_{it:06d}")))
            print(f"checkpoint {path}", flush=True)
    writer.close()
    if job.push_inner_reward_url and algo.last_batch is not None:
        from rllib_policies.outer_controller.rails import push_inner_reward_weights

        weights = algo.inner_reward_weights(algo.last_batch)
        print(f"inner-reward weights → {job.push_inner_reward_url}: {json.dumps(push_inner_reward_weights(job.push_inner_reward_url, weights))}")
    algo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
