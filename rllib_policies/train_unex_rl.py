"""Train UNEX-RL's stage policies and global critic: the `ray job submit` entrypoint (rllib_policies.jobs runs it).

    ray job submit --working-dir . -- python -m rllib_policies.train_unex_rl \\
        --config rllib_policies/configs/unex_rl.yaml
    python -m rllib_policies.train_unex_rl --config … --resume latest      # continue a run

One progress line per iteration; checkpoints every ``checkpoint_every`` iterations (and at the end)
under ``checkpoint_dir/iter_NNNNNN`` (relative: under the storage root, see rllib_policies.storage) with
the learners, optimizers, target networks, replay buffer and CQR cells; ``--resume latest`` (or a path)
goes on from there. At the end, the deterministic stage policies are evaluated on ``eval_sessions``
simulated sessions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from rllib_policies.envs import MultiStageEnv
from rllib_policies.jobs import AlgorithmJobConfig, job_main
from rllib_policies.unex_rl import UnexRL, UnexRLConfig
from rllib_policies.unex_rl.learner import CRITIC


@dataclass
class UnexJobConfig(AlgorithmJobConfig):
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 3000}})
    unex_rl: dict = field(default_factory=lambda: {"arm": "unex_rl"})  # UnexRLConfig.unex_rl(...) options
    iterations: int = 30
    checkpoint_dir: str = "unex_rl"  # under the storage root (rllib_policies.storage)
    checkpoint_every: int = 10
    eval_sessions: int = 300


def build(job: UnexJobConfig) -> UnexRL:
    return job.algorithm_config(UnexRLConfig(), MultiStageEnv).unex_rl(**job.unex_rl).build_algo()


def progress(result: dict) -> str:
    unex, learner = result["unex_rl"], result["learners"][CRITIC]
    return (
        f"sessions {int(unex['sessions_seen']):6d} | usage {unex['usage_s_per_session']:6.1f} s | "
        f"return {unex['return_rate']:.3f} | ndcg {unex['ndcg_at_10']:.3f} | critic {learner['critic_loss']:.4f} | "
        f"actor {learner['actor_loss']:.3f}"
    )


def after(algo: UnexRL, job: UnexJobConfig) -> None:
    """The deterministic stage policies on ``eval_sessions`` simulated sessions."""
    evaluation = algo.evaluate_policy(job.eval_sessions)
    print(f"evaluation (deterministic policies, {job.eval_sessions} sessions): {evaluation}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return job_main(UnexJobConfig, build, progress, argv, description=__doc__, after=after)


if __name__ == "__main__":
    sys.exit(main())
