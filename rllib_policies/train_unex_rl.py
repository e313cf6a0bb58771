"""Train UNEX-RL's stage agents and global critic: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m rllib_policies.train_unex_rl \\
        --config rllib_policies/configs/unex_rl.yaml
    python -m rllib_policies.train_unex_rl --config … --resume latest      # continue a run

One progress line per iteration; checkpoints every ``checkpoint_every`` iterations (and at the end)
under ``checkpoint_dir/iter_NNNNNN`` with the learners, optimizers, target networks, replay buffer
and CQR cells; ``--resume latest`` (or a path) goes on from there.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass, field

from rllib_policies.jobs import config_from_yaml, init_ray


@dataclass
class UnexJobConfig:
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 3000}})
    unex_rl: dict = field(default_factory=lambda: {"arm": "unex_rl"})   # UnexRLConfig.unex_rl(...) options
    training: dict = field(default_factory=dict)                       # lr, gamma
    learners: dict = field(default_factory=dict)                       # num_learners, …
    iterations: int = 30
    checkpoint_dir: str = "runs/unex_rl"
    checkpoint_every: int = 10
    eval_sessions: int = 300
    seed: int = 0
    num_cpus: int | None = None


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(checkpoint_dir, "iter_*")))
    return found[-1] if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with UnexJobConfig fields")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    args = p.parse_args(argv)
    job = config_from_yaml(UnexJobConfig, args.config)
    init_ray(job.num_cpus)
    from rllib_policies.envs import MultiStageEnv
    from rllib_policies.unex_rl import UnexRL, UnexRLConfig

    resume = latest_checkpoint(job.checkpoint_dir) if args.resume == "latest" else args.resume
    if resume:
        algo = UnexRL.from_checkpoint(os.path.abspath(resume))
        print(f"resumed from {resume} at iteration {algo.iteration}", flush=True)
    else:
        algo = (UnexRLConfig().environment(MultiStageEnv, env_config={**job.env_config, "seed": job.seed})
                .unex_rl(**job.unex_rl).training(**job.training).learners(**job.learners)
                .debugging(seed=job.seed, log_level="ERROR").build_algo())
    os.makedirs(job.checkpoint_dir, exist_ok=True)
    start = algo.iteration
    for _ in range(max(job.iterations - start, 0)):
        t0 = time.perf_counter()
        res = algo.train()
        it, u, lr = algo.iteration, res["unex_rl"], res["learners"]["global_critic"]
        print(f"iter {it:4d} | sessions {int(u['sessions_seen']):6d} | usage {u['usage_s_per_session']:6.1f} s | "
              f"return {u['return_rate']:.3f} | ndcg {u['ndcg_at_10']:.3f} | critic {lr['critic_loss']:.4f} | "
              f"actor {lr['actor_loss']:.3f} | {time.perf_counter() - t0:.1f} s", flush=True)
        if it % job.checkpoint_every == 0 or it == job.iterations:
            path = algo.save_to_path(os.path.abspath(os.path.join(job.checkpoint_dir, f"iter_{it:06d}")))
            print(f"checkpoint {path}", flush=True)
    print(f"evaluation (deterministic policies, {job.eval_sessions} sessions): {algo.evaluate_policy(job.eval_sessions)}",
          flush=True)
    algo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
