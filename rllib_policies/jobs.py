"""The job runner every `ray job submit` entrypoint uses: config file → train loop → progress lines →
checkpoints → ``--resume latest``.

    @dataclass
    class MyJob(JobConfig):
        my_options: dict = field(default_factory=dict)

    def build(job: MyJob) -> Algorithm: ...                  # a fresh algorithm from the job config
    def progress(result: dict) -> str: ...                   # one line per iteration

    if __name__ == "__main__":
        sys.exit(job_main(MyJob, build, progress, description=__doc__))

``run_training`` prints ``iter N | <progress> | <seconds> s`` per iteration, writes the iteration's
finite scalars to TensorBoard under ``checkpoint_dir/tensorboard``, and checkpoints every
``checkpoint_every`` iterations (and at the end) to ``checkpoint_dir/iter_NNNNNN``. ``--resume latest``
(or a checkpoint path) restores the algorithm with everything it saved and finishes the plan.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import ray
import yaml
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from tensorboardX import SummaryWriter

J = TypeVar("J", bound="JobConfig")


@dataclass
class JobConfig:
    """What every training job has; a job's config subclasses it with its algorithm's options."""

    iterations: int = 20  # total training iterations (a resumed run finishes the plan)
    checkpoint_dir: str = "runs/job"
    checkpoint_every: int = 5
    seed: int = 0
    num_cpus: int | None = None  # only when starting a local Ray (not under a job)

    @classmethod
    def from_yaml(cls: type[J], path: str) -> J:
        return config_from_yaml(cls, path)


@dataclass
class AlgorithmJobConfig(JobConfig):
    """A job that trains one algorithm on a world env, with RLlib's config sections as mappings."""

    env_config: dict = field(default_factory=dict)  # the world: {"preset", "world": {…}, "pipeline": {…}}
    training: dict = field(default_factory=dict)  # AlgorithmConfig.training(...): lr, gamma, …
    learners: dict = field(default_factory=dict)  # AlgorithmConfig.learners(...): num_learners, …

    def algorithm_config(self, config: AlgorithmConfig, env) -> AlgorithmConfig:
        """``config`` with this job's env (seeded), training and learner sections, and seed."""
        return (
            config.environment(env, env_config={**self.env_config, "seed": self.seed})
            .training(**self.training)
            .learners(**self.learners)
            .debugging(seed=self.seed, log_level="ERROR")
        )


def config_from_yaml(cls, path: str):
    """A dataclass from a YAML mapping of its fields; unknown keys are an error naming them."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**raw)


def init_ray(num_cpus: int | None = None) -> None:
    """Inside `ray job submit` (RAY_ADDRESS set) join the job's cluster; otherwise start a local Ray
    (never attach to some other cluster on the machine)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest ``iter_NNNNNN`` checkpoint under ``checkpoint_dir``, or None."""
    found = sorted(glob.glob(os.path.join(checkpoint_dir, "iter_*")))
    return found[-1] if found else None


def scalars(result: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number in a (nested) result dict, by slash-joined tag."""
    out: dict[str, float] = {}
    for k, v in result.items():
        tag = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(scalars(v, tag))
        elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v):
            out[tag] = float(v)
    return out


def run_training(
    algo,
    iterations: int,
    checkpoint_dir: str,
    checkpoint_every: int,
    progress: Callable[[dict], str],
    log: Callable[[str], Any] = print,
    tensorboard: bool = True,
) -> dict | None:
    """Train ``iterations`` more iterations with progress lines, TensorBoard scalars and checkpoints;
    returns the last result (None when there was nothing to do)."""
    writer = None
    if tensorboard:
        writer = SummaryWriter(os.path.join(checkpoint_dir, "tensorboard"))
    os.makedirs(checkpoint_dir, exist_ok=True)
    start, result = algo.iteration, None
    for _ in range(iterations):
        t0 = time.perf_counter()
        result = algo.train()
        it = algo.iteration
        log(f"iter {it:4d} | {progress(result)} | {time.perf_counter() - t0:.1f} s")
        if writer is not None:
            for tag, value in scalars(result).items():
                writer.add_scalar(tag, value, it)
        if it % checkpoint_every == 0 or it == start + iterations:
            path = algo.save_to_path(os.path.abspath(os.path.join(checkpoint_dir, f"iter_{it:06d}")))
            log(f"checkpoint {path}")
    if writer is not None:
        writer.close()
    return result


def job_main(
    config_cls: type[J],
    build: Callable[[J], Any],
    progress: Callable[[dict], str],
    argv: list[str] | None = None,
    description: str | None = None,
    before: Callable[[Any, J], None] | None = None,
    after: Callable[[Any, J], None] | None = None,
) -> int:
    """The whole entrypoint: parse ``--config`` / ``--resume`` / ``--iterations``, join or start Ray,
    build or restore the algorithm, ``before(algo, job)`` on a fresh run (e.g. a warm start), train,
    ``after(algo, job)`` (e.g. evaluate, push), stop."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML with {config_cls.__name__} fields")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="run this many more iterations (default: up to the config's total, counting resumed ones)",
    )
    args = p.parse_args(argv)
    job = config_cls.from_yaml(args.config)

    def log(line: str) -> None:
        print(line, flush=True)

    init_ray(job.num_cpus)
    resume = latest_checkpoint(job.checkpoint_dir) if args.resume == "latest" else args.resume
    if resume:
        algo = Algorithm.from_checkpoint(os.path.abspath(resume))
        log(f"resumed from {resume} at iteration {algo.iteration}")
    else:
        if args.resume == "latest":
            log(f"no checkpoint under {job.checkpoint_dir}: starting a new run")
        algo = build(job)
        if before is not None:
            before(algo, job)
    iterations = args.iterations if args.iterations is not None else max(job.iterations - algo.iteration, 0)
    run_training(algo, iterations, job.checkpoint_dir, job.checkpoint_every, progress, log)
    if after is not None:
        after(algo, job)
    algo.stop()
    return 0
