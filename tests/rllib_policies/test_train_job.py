"""A real `ray job submit` of the training entrypoint against a local `ray start --head`:
it trains, checkpoints under the storage root (a relative ``checkpoint_dir``, as in the shipped
configs, never lands in the job's temporary working directory), writes TensorBoard events, and a
second submission resumes."""

import glob
import os

import pytest
import ray

from tests.ray_jobs import submit

JOB_CONFIG = """
env_config: {world: {n_items: 2000, n_users: 300}, pipeline: {k_matching: 100, k_pre_ranking: 20, k_slate: 6}}
outer_controller: {sessions_per_iteration: 6, min_sessions_for_kpi: 12, kl_rollback_threshold: null}
env_runners: {num_env_runners: 0, num_envs_per_env_runner: 2}
iterations: 2
checkpoint_every: 1
checkpoint_dir: run
storage: {storage}
"""


def submit_training(env, address, config_path, *extra) -> str:
    return submit(
        env, address, "python", "-m", "rllib_policies.train_outer_controller", "--config", config_path, *extra
    )


@pytest.mark.ray
def test_job_submission_trains_checkpoints_and_resumes(ray_head, tmp_path):
    env, address, ray_tmp = ray_head
    ckpt = tmp_path / "store" / "run"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(JOB_CONFIG.replace("{storage}", str(tmp_path / "store")))
    first = submit_training(env, address, str(cfg))
    assert "iter    1 |" in first and "iter    2 |" in first, first[-2000:]
    assert f"artifacts → checkpoint_dir {ckpt}" in first, first[-2000:]
    assert sorted(os.path.basename(p) for p in glob.glob(str(ckpt / "iter_*"))) == ["iter_000001", "iter_000002"]
    assert glob.glob(str(ckpt / "tensorboard" / "events.out.tfevents.*"))
    second = submit_training(env, address, str(cfg), "--resume", "latest", "--iterations", "1")
    assert "resumed from" in second and "iter    3 |" in second, second[-2000:]
    assert (ckpt / "iter_000003").exists()
    # nothing in the job's temporary working directory (runtime_resources/working_dir_files/_ray_pkg_…)
    assert not glob.glob(os.path.join(ray_tmp, "**", "iter_0000*"), recursive=True)


@pytest.mark.ray
def test_sigterm_stops_a_training_job_and_the_ray_it_started(tmp_path):
    """SIGTERM mid-training (what Kubernetes sends a pod, what `ray job stop` sends a driver): the job stops its
    algorithm and the local Ray it started within a bounded time, exits 130, and its checkpoints stay."""
    import sys
    import tempfile

    from benchmarks.common import sigterm_when_ready

    cfg = tmp_path / "job.yaml"
    cfg.write_text(JOB_CONFIG.replace("{storage}", str(tmp_path / "store")).replace("iterations: 2", "iterations: 50"))
    ray_tmp = tempfile.mkdtemp(prefix="morl-sig-", dir="/tmp")  # short: Ray's socket paths
    os.makedirs(os.path.join(ray_tmp, "ray"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "rllib_policies.train_outer_controller", "--config", str(cfg)]
    run = sigterm_when_ready(cmd, "checkpoint ", env, timeout_s=60, grace_s=10)
    assert run["returncode"] == 130 and "interrupted: stopping" in run["output"], run["output"][-3000:]
    assert run["stop_s"] < 30 and not run["left"], (run["stop_s"], run["left"])
    assert (tmp_path / "store" / "run" / "iter_000001").exists()


@pytest.mark.ray
def test_a_lost_learner_is_restored_from_the_last_checkpoint(ray_session, tmp_path, capsys):
    """The learner's process dies mid-training (benchmarks/chaos_training.py kills its whole node): job_main stops
    what is left, restores the latest checkpoint with the env steps it recorded, and finishes the plan."""
    import re
    import signal
    import threading
    import time

    from rllib_policies.jobs import job_main
    from rllib_policies.train_outer_controller import TrainJobConfig, build, progress

    def learners() -> set[int]:
        """The pids of the live learner actors (a remote learner runs in a Ray Train worker actor)."""
        table = ray._private.state.actors().values()
        return {a["Pid"] for a in table if a["State"] == "ALIVE" and "_WrappedExecutable" in a["ActorClassName"]}

    cfg = tmp_path / "job.yaml"
    text = JOB_CONFIG.replace("{storage}", str(tmp_path / "store")).replace("iterations: 2", "iterations: 5")
    cfg.write_text(text + "learners: {num_learners: 1}\n")
    ckpt, before, killed = tmp_path / "store" / "run", learners(), []

    def kill_the_learner() -> None:
        deadline = time.monotonic() + 120
        while not (ckpt / "iter_000002").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in learners() - before:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=kill_the_learner, daemon=True).start()
    assert job_main(TrainJobConfig, build, progress, argv=["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert killed and re.search(r"lost a worker (during|while checkpointing) iteration", out), out[-3000:]
    resumed = re.search(r"resumed from \S+/iter_(\d{6}) at iteration (\d+) \((\d+) env steps; failure 1 of 3\)", out)
    assert resumed, out[-3000:]
    steps = re.search(rf"checkpoint \S+/iter_{resumed.group(1)} \((\d+) env steps\)", out)
    assert steps and steps.group(1) == resumed.group(3), out[-3000:]  # nothing before the checkpoint was lost
    assert "iter    5 |" in out and (ckpt / "iter_000005").exists(), out[-3000:]


@pytest.mark.parametrize(
    "error, lost",
    [
        (ray.exceptions.RayActorError(), True),
        (ray.exceptions.NodeDiedError("node 1 died"), True),
        (ray.exceptions.WorkerCrashedError(), True),
        (IndexError("list index out of range"), False),  # with no dead learner: a bug
        (ValueError("bad config"), False),
    ],
)
def test_lost_worker_by_the_error_alone(error, lost):
    """Without an algorithm (or with a local learner) only the error's type tells; a dead remote learner makes any
    error a loss (tests/rllib_policies/test_storage.py, with real learners)."""
    from rllib_policies.jobs import LearnerLost, lost_worker

    assert lost_worker(error, None) is lost
    assert lost_worker(LearnerLost("cut short"), None)
