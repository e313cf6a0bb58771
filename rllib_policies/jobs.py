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

A lost node or actor (an env runner or learner whose process or node died: ``lost_worker``) does not end the job:
``job_main`` stops what is left of the algorithm, restores the latest complete checkpoint on the nodes still there
(else the one it resumed from, else a new run) and finishes the plan, up to ``max_failures`` times (Ray Train's
``FailureConfig`` has the same knob). What was trained after that checkpoint is trained again; nothing before it is
lost. RLlib itself restarts a failed env runner between iterations (``restart_failed_env_runners``, on by default);
a learner has no such restart, hence this.

Artifacts outlive the job: ``job_main`` resolves every artifact path (``checkpoint_dir``, ``out_dir``,
``events_root``, ``dataset``) with ``storage.resolve(path, job.storage)``, so a relative path lands under the
storage root (``storage``, else ``$MORL_STORAGE``, else ``~/morl-runs``; a local path or any ``pyarrow.fs`` URI such as
``s3://bucket/prefix``), never in the job's temporary working directory. Checkpoints and ``--resume latest``
work on URIs; TensorBoard is local only: with a URI ``checkpoint_dir`` its events go to
``storage.mirror(checkpoint_dir)/tensorboard`` on the driver's node.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import ray
import yaml
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import (
    COMPONENT_ENV_TO_MODULE_CONNECTOR,
    COMPONENT_LEARNER,
    COMPONENT_MODULE_TO_ENV_CONNECTOR,
    COMPONENT_RL_MODULE,
)
from ray.rllib.utils import force_list
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME
from tensorboardX import SummaryWriter

from rllib_policies import storage

J = TypeVar("J", bound="JobConfig")
ARTIFACT_FIELDS = ("checkpoint_dir", "out_dir", "events_root", "dataset")  # resolved under the storage root
CHECKPOINT_NAME = re.compile(r"^iter_\d{6}$")
COMPLETE = ".complete"  # the last file save_checkpoint writes: a checkpoint without it is not resumed from


class LearnerLost(RuntimeError):
    """A remote learner died while a checkpoint was written: RLlib saved without it, so the checkpoint is cut short."""


# A worker process or its node died: the algorithm's remote state is gone, the checkpoint on storage is not.
LOST_WORKER = (
    LearnerLost,
    ray.exceptions.RayActorError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.WorkerCrashedError,
)


@dataclass
class JobConfig:
    """What every training job has; a job's config subclasses it with its algorithm's options."""

    iterations: int = 20  # total training iterations (a resumed run finishes the plan)
    checkpoint_dir: str = "job"  # relative: under the storage root
    checkpoint_every: int = 5
    max_failures: int = 3  # lost workers survived by restoring the latest checkpoint (0: the first loss ends the job)
    seed: int = 0
    num_cpus: int | None = None  # only when starting a local Ray (not under a job)
    storage: str | None = None  # storage root: absolute path or URI; None: $MORL_STORAGE, else ~/morl-runs

    @classmethod
    def from_yaml(cls: type[J], path: str) -> J:
        return config_from_yaml(cls, path)

    def resolve_paths(self) -> dict[str, str]:
        """Resolve every artifact path field (``ARTIFACT_FIELDS`` this config has and sets) under the
        storage root, in place; returns them by name."""
        out = {}
        for name in ARTIFACT_FIELDS:
            value = getattr(self, name, None)
            if value is not None:
                out[name] = storage.resolve(value, self.storage)
                setattr(self, name, out[name])
        return out


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


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time: a second SIGTERM must not cut the clean-up
    raise KeyboardInterrupt(f"signal {signum}")


def arm_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread. Inside ``stops_cleanly`` call it again right after
    ``ray.init``: Ray's core worker installs its own SIGTERM handler (here it aborted the driver, exit −6, skipping
    every ``finally``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def stops_cleanly(log: Callable[[str], Any] = print) -> Iterator[None]:
    """Run an entrypoint's body so that SIGTERM (what Kubernetes, systemd and `ray job stop` send) stops it like
    Ctrl-C: ``finally`` blocks run (algorithms stop their actors), the Ray the body started is shut down (a local
    cluster goes with it; a joined one is only left; a Ray running before the body is left alone), and the process
    exits with 130. Outside the main thread (no signal handlers there) only the shutdown part applies."""
    owned = not ray.is_initialized()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    arm_sigterm()
    try:
        yield
    except KeyboardInterrupt:
        log("interrupted: stopping (the last checkpoint stays; --resume latest continues from it)")
        raise SystemExit(130) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a signal now must not cut the shutdown short
        if owned:
            ray.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest complete ``iter_NNNNNN`` checkpoint under ``checkpoint_dir`` (a local path or URI), or None.
    Complete: it holds ``COMPLETE`` (``save_checkpoint`` writes it last; a checkpoint without it was cut short when
    its writer or a learner died, or predates the marker: pass such a one as ``--resume PATH``)."""
    found = sorted(name for name in storage.list_dir(checkpoint_dir) if CHECKPOINT_NAME.match(name))
    for name in reversed(found):  # one existence check per checkpoint tried (a HEAD request on S3)
        if storage.exists(storage.join(checkpoint_dir, name, COMPLETE)):
            return storage.join(checkpoint_dir, name)
    return None


def tensorboard_dir(checkpoint_dir: str) -> str:
    """``checkpoint_dir/tensorboard``; for a URI its local mirror's (TensorBoard writes local files)."""
    return os.path.join(storage.mirror(checkpoint_dir), "tensorboard")


def checkpoint_path(checkpoint_dir: str, iteration: int) -> str:
    """Where ``run_training`` saves the checkpoint of ``iteration``."""
    return storage.join(checkpoint_dir, f"iter_{iteration:06d}")


def save_checkpoint(algo, path: str) -> str:
    """``algo.save_to_path`` at a local path or URI, then ``COMPLETE`` in it; returns ``path`` (absolute when
    local). A checkpoint cut short at this path before is deleted first, not written over. Raises ``LearnerLost``
    (and leaves the checkpoint unmarked) when a learner died while it was written."""
    fs, inner = storage.filesystem(path)
    if storage.exists(path):
        fs.delete_dir(inner)
    algo.save_to_path(inner, filesystem=fs)
    failed = learners_out_of_service(algo)  # a learner that failed to write its state
    if any(is_dead(a) for a in failed):
        raise LearnerLost(f"a learner died while {path} was written: it is not marked {COMPLETE}")
    if failed:
        raise RuntimeError(f"a learner failed to write its state to {path} (RLlib drops why: see the learner's log)")
    storage.write_bytes(storage.join(path, COMPLETE), b"")
    return path if storage.is_uri(path) else inner


def restore_checkpoint(path: str) -> Algorithm:
    """The algorithm at a checkpoint (a local path or URI), built as ``Algorithm.from_checkpoint`` builds it (from the
    checkpoint's class and constructor arguments; without that method's fallback for a pickle from another
    version), with every EnvRunner acting with the restored weights. RLlib's ``restore_from_path`` syncs connector
    states and weights only when it finds them on the local disk (not for a URI), and its weight sync to remote
    EnvRunners is asynchronous (a sample can precede it), so this restores the connectors for a URI and pushes the
    weights synchronously. An offline algorithm without EnvRunners (RLlib 2.60's BC, CQL, IQL: ``env_runner_group``
    None) is restored by ``Checkpointable``'s ``restore_from_path``: ``Algorithm``'s syncs the EnvRunners it lacks
    (AttributeError)."""
    if not storage.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(f"{inner}/{Algorithm.CLASS_AND_CTOR_ARGS_FILE_NAME}") as f:
        saved = pickle.load(f)  # what Algorithm.from_checkpoint builds from
    args, kwargs = saved["ctor_args_and_kwargs"]
    algo = saved["class"](*force_list(args), **kwargs)
    runners = getattr(algo, "env_runner_group", None)
    if runners is None:  # an offline algorithm (RLlib's BC, CQL, IQL): Algorithm's override syncs EnvRunners it lacks
        Checkpointable.restore_from_path(algo, inner, filesystem=fs)
        return algo
    algo.restore_from_path(inner, filesystem=fs)
    if storage.is_uri(path) and runners.num_remote_env_runners() > 0 and not algo.env_runner:
        for name, connector in (
            (COMPONENT_ENV_TO_MODULE_CONNECTOR, algo.env_to_module_connector),
            (COMPONENT_MODULE_TO_ENV_CONNECTOR, algo.module_to_env_connector),
        ):
            if connector is not None and storage.exists(storage.join(path, name)):
                connector.restore_from_path(f"{inner}/{name}", filesystem=fs)
        runners.sync_env_runner_states(
            config=algo.config,
            from_worker=None,
            env_steps_sampled=algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0),
            env_to_module=algo.env_to_module_connector,
            module_to_env=algo.module_to_env_connector,
        )
    module = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=True)
    state = {COMPONENT_RL_MODULE: module[COMPONENT_LEARNER][COMPONENT_RL_MODULE]}
    runners.foreach_env_runner(lambda runner: runner.set_state(state), local_env_runner=True)
    return algo


def env_steps(algo) -> int:
    """The env steps the algorithm has sampled over its life (what a checkpoint carries and a restore continues)."""
    return int(algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))


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
    before_call: Callable[[Any], None] | None = None,
    at_checkpoint: Callable[[Any, str], None] | None = None,
) -> dict | None:
    """Train ``iterations`` more iterations with progress lines, TensorBoard scalars and checkpoints
    (``checkpoint_dir``: a local path or URI); ``before_call(algo)`` runs before each ``train()`` call and
    ``at_checkpoint(algo, path)`` after each checkpoint is complete. Returns the last result (None when there was
    nothing to do)."""
    writer = None
    if tensorboard:
        logdir = tensorboard_dir(checkpoint_dir)
        if storage.is_uri(checkpoint_dir):
            log(f"TensorBoard writes local files only: scalars → {logdir} (checkpoints → {checkpoint_dir})")
        writer = SummaryWriter(logdir)
    storage.makedirs(checkpoint_dir)
    start, result = algo.iteration, None
    try:
        for _ in range(iterations):
            t0 = time.perf_counter()
            if before_call is not None:
                before_call(algo)
            result = algo.train()
            it = algo.iteration
            log(f"iter {it:4d} | {progress(result)} | {time.perf_counter() - t0:.1f} s")
            if writer is not None:
                for tag, value in scalars(result).items():
                    writer.add_scalar(tag, value, it)
            if it % checkpoint_every == 0 or it == start + iterations:
                path = save_checkpoint(algo, checkpoint_path(checkpoint_dir, it))
                log(f"checkpoint {path} ({env_steps(algo)} env steps)")
                if at_checkpoint is not None:
                    at_checkpoint(algo, path)
    finally:
        if writer is not None:
            writer.close()
    return result


def learners_out_of_service(algo) -> list:
    """The remote learners RLlib has taken out of service ([] for a local learner). Its LearnerGroup does that to a
    learner whose call failed, whether its process died or its code raised; its same-node save carries on without
    it, and a later call can fail on the empty list of healthy learners (``IndexError``)."""
    manager = getattr(getattr(algo, "learner_group", None), "_worker_manager", None)
    if manager is None:
        return []
    return [manager._actors[i] for i in manager.actor_ids() if not manager.is_actor_healthy(i)]


def is_dead(actor, timeout_s: float = 10.0) -> bool:
    """Whether ``actor`` does not answer Ray's built-in ``__ray_ready__`` (its process or node is gone)."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return True
    return False


def lost_worker(error: Exception, algo) -> bool:
    """Whether ``error`` came from a dead worker: one of ``LOST_WORKER``, or anything raised while a remote learner
    is dead. A learner out of service that still answers raised in its own code: a bug, not a loss."""
    return isinstance(error, LOST_WORKER) or any(is_dead(a) for a in learners_out_of_service(algo))


def first_line(error: BaseException) -> str:
    """An exception's message up to its first line break (Ray's carry whole tracebacks)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def job_main(
    config_cls: type[J],
    build: Callable[[J], Any],
    progress: Callable[[dict], str],
    argv: list[str] | None = None,
    description: str | None = None,
    before: Callable[[Any, J], None] | None = None,
    after: Callable[[Any, J], None] | None = None,
    prepare: Callable[[J], None] | None = None,
    before_call: Callable[[Any, J], None] | None = None,
    at_checkpoint: Callable[[Any, J, str], None] | None = None,
) -> int:
    """The whole entrypoint: parse ``--config`` / ``--resume`` / ``--iterations``, resolve the artifact
    paths under the storage root (named once), ``prepare(job)`` (e.g. fetch inputs to this node), join or
    start Ray, build or restore the algorithm, ``before(algo, job)`` on a fresh run (e.g. a warm start),
    train (``before_call(algo, job)`` before each ``train()`` call, ``at_checkpoint(algo, job, path)`` after each
    checkpoint), ``after(algo, job)`` (e.g. evaluate, push), stop."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML with {config_cls.__name__} fields")
    p.add_argument(
        "--resume", default=None, help="'latest' or a checkpoint (a path relative to the storage root, or a URI)"
    )
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

    paths = job.resolve_paths()
    log("artifacts → " + ", ".join(f"{name} {path}" for name, path in paths.items()))
    if prepare is not None:
        prepare(job)

    with stops_cleanly(log):
        init_ray(job.num_cpus)
        arm_sigterm()  # again: ray.init replaced the handler
        if args.resume == "latest":
            resume = latest_checkpoint(job.checkpoint_dir)
            if resume is None:
                log(f"no complete checkpoint under {job.checkpoint_dir}: starting a new run")
        else:
            resume = storage.resolve(args.resume, job.storage) if args.resume else None

        def start(checkpoint: str | None, failure: str) -> Any:
            """Restore ``checkpoint``, or build a new algorithm (warm-started by ``before``) when there is none."""
            if checkpoint is None:
                algo = build(job)
                if before is not None:
                    before(algo, job)
                if failure:
                    log(f"no checkpoint yet: starting a new run ({failure})")
                return algo
            algo = restore_checkpoint(checkpoint)
            steps = f"{env_steps(algo)} env steps" + (f"; {failure}" if failure else "")
            log(f"resumed from {checkpoint} at iteration {algo.iteration} ({steps})")
            return algo

        # A lost worker while training, checkpointing or restoring: restore the latest complete checkpoint (else
        # the one resumed from, else a new run) and go on. An algorithm whose restore raised is not ours to stop:
        # Ray reclaims its actors with the job.
        algo, until, failures, start_from = None, None, 0, resume
        try:
            while True:
                try:
                    if algo is None:
                        algo = start(start_from, f"failure {failures} of {job.max_failures}" if failures else "")
                    if until is None:  # fixed by the first start: a recovery finishes the same plan
                        until = algo.iteration + args.iterations if args.iterations is not None else job.iterations
                    run_training(
                        algo,
                        max(until - algo.iteration, 0),
                        job.checkpoint_dir,
                        job.checkpoint_every,
                        progress,
                        log,
                        before_call=None if before_call is None else lambda a: before_call(a, job),
                        at_checkpoint=None if at_checkpoint is None else lambda a, path: at_checkpoint(a, job, path),
                    )
                    break
                except Exception as e:
                    if not lost_worker(e, algo):
                        raise
                    failures += 1
                    if failures > job.max_failures:
                        log(f"lost a worker ({type(e).__name__}) {failures} times: max_failures is {job.max_failures}")
                        raise
                    if algo is None:
                        where = "while restoring"
                    elif isinstance(e, LearnerLost):
                        where = f"while checkpointing iteration {algo.iteration}"
                    else:
                        where = f"during iteration {algo.iteration + 1}"
                    log(f"lost a worker {where}: {type(e).__name__}: {first_line(e)}")
                    if algo is not None:
                        with contextlib.suppress(Exception):  # what is left of it; its dead actors cannot answer
                            algo.stop()
                    algo, start_from = None, latest_checkpoint(job.checkpoint_dir) or resume
            if after is not None:
                after(algo, job)
        finally:
            if algo is not None:
                algo.stop()
                algo = None
                gc.collect()  # an offline algorithm's Ray Data iterators, while Ray is up (after: a traceback each)
    return 0
