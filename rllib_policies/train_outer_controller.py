"""Train the outer controller: the `ray job submit` entrypoint (rllib_policies.jobs runs it).

    ray job submit --working-dir . -- python -m rllib_policies.train_outer_controller \\
        --config rllib_policies/configs/outer_controller.yaml
    python -m rllib_policies.train_outer_controller --config … --resume latest   # continue a run

Prints one progress line per iteration, checkpoints every ``checkpoint_every`` iterations (and at
the end) under ``checkpoint_dir/iter_NNNNNN`` (relative: under the storage root, ``storage`` / $MORL_STORAGE /
~/morl-runs, a local path or URI; see rllib_policies.storage), writes TensorBoard scalars to
``checkpoint_dir/tensorboard`` (a local mirror's when it is a URI). ``--resume latest`` (or a checkpoint
path) restores the algorithm with its learner, optimizer, baselines, KPI gate counter and KL reference,
and goes on from there.
Optional: ``warm_start_trajectories`` (behaviour cloning on logged sessions before training),
``push_inner_reward_url`` (PUT the fitted inner-reward weights to that service at the end) and
``serve_store_prefix`` (after do no harm's promotion check, publish the promoted policy — the trained one, or
the start when training did not beat it — to the recommend app with that ``store_prefix`` on the same
cluster, a versioned hot update it serves with ``ranking_policy: outer_controller`` or an arm of that policy;
``actors.served_policies``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from rllib_policies.envs import SessionEnv
from rllib_policies.jobs import AlgorithmJobConfig, job_main
from rllib_policies.outer_controller import OuterController, OuterControllerConfig
from rllib_policies.outer_controller.rails import push_inner_reward_weights


@dataclass
class TrainJobConfig(AlgorithmJobConfig):
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 2000}})
    outer_controller: dict = field(default_factory=dict)  # OuterControllerConfig.outer_controller(...) options
    env_runners: dict = field(default_factory=lambda: {"num_env_runners": 0, "num_envs_per_env_runner": 8})
    checkpoint_dir: str = "outer_controller"  # under the storage root (rllib_policies.storage)
    warm_start_trajectories: str | None = None
    warm_start_iterations: int = 20
    push_inner_reward_url: str | None = None
    serve_store_prefix: str | None = None


def build(job: TrainJobConfig) -> OuterController:
    config = job.algorithm_config(OuterControllerConfig(), SessionEnv)
    return config.env_runners(**job.env_runners).outer_controller(**job.outer_controller).build_algo()


def progress(result: dict) -> str:
    oc, learner = result["outer_controller"], result["learners"]["default_policy"]
    return (
        f"sessions {int(oc['sessions_seen']):7d} | κ {oc['kappa']:.2f} | KL step {oc['kl_step']:.3f} "
        f"({int(oc['epochs'])} epochs) | KL from start {oc['kl_from_reference']:.3f} "
        f"| rollbacks {int(oc['rollbacks'])} | inner {oc['inner_reward_mean']:.2f} "
        f"| outer {oc['outer_reward_mean']:.2f} | ndcg {oc.get('kpi_ndcg', float('nan')):.3f} "
        f"| pg_loss {learner['pg_loss']:.3f}"
    )


def before(algo: OuterController, job: TrainJobConfig) -> None:
    """A fresh run: behaviour cloning on logged sessions first, when configured."""
    if job.warm_start_trajectories:
        print(f"warm start: {algo.warm_start(job.warm_start_trajectories, job.warm_start_iterations)}", flush=True)


def after(algo: OuterController, job: TrainJobConfig) -> None:
    """Push the inner-reward weights fitted to the last batch's credit, and publish the policy to serving,
    when configured."""
    if job.push_inner_reward_url and algo.last_batch is not None:
        state = push_inner_reward_weights(job.push_inner_reward_url, algo.inner_reward_weights(algo.last_batch))
        print(f"inner-reward weights → {job.push_inner_reward_url}: {json.dumps(state)}", flush=True)
    if job.serve_store_prefix:  # do no harm first: the trained policy, or the start if it is not better
        promotion = algo.promote()
        ack = algo.publish_to_serve(job.serve_store_prefix)
        print(
            f"outer controller policy → serving ({job.serve_store_prefix!r}): version {ack['version']}, the "
            f"{promotion['promoted']} policy (J {promotion['j_trained']:.3f} trained vs {promotion['j_start']:.3f} "
            f"start, paired difference {promotion['difference']:+.3f} ± {promotion['half_width']:.3f})",
            flush=True,
        )
        if not ack.get("readers_live"):
            print(
                f"warning: no recommend replica follows {job.serve_store_prefix!r} on this cluster (a typo, or a "
                "job outside `ray job submit`?): published, but nothing serves it yet",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(job_main(TrainJobConfig, build, progress, description=__doc__, before=before, after=after))
