"""A real `ray job submit` of the training entrypoint against a local `ray start --head`:
it trains, checkpoints, writes TensorBoard events, and a second submission resumes."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

JOB_CONFIG = """
env_config: {world: {n_items: 2000, n_users: 300}, pipeline: {k_matching: 100, k_pre_ranking: 20, k_slate: 6}}
outer_controller: {sessions_per_iteration: 6, min_sessions_for_kpi: 12, kl_rollback_threshold: null}
env_runners: {num_env_runners: 0, num_envs_per_env_runner: 2}
iterations: 2
checkpoint_every: 1
checkpoint_dir: {ckpt}
"""


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` in its own process group: stopping it stops only this cluster
    (`ray stop` would also stop the test session's own Ray)."""
    tmp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # every port explicit: the test session's own Ray already holds the defaults (e.g. the agent's 52365)
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    ]
    proc = subprocess.Popen(
        [
            f"{BIN}/ray",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
            *ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            import httpx

            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield env, address, tmp
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def ray_cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([f"{BIN}/ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(env, address, config_path, *extra) -> str:
    """Submit, wait for the job to finish (bounded), return its logs."""
    job_id = f"oc-{uuid.uuid4().hex[:8]}"
    env = {**env, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
    for _ in range(20):  # the first submits after start may find no agent yet (~15-60 s under load)
        out = ray_cli(
            env,
            "job",
            "submit",
            f"--address={address}",
            f"--submission-id={job_id}",
            "--no-wait",
            f"--working-dir={ROOT}",
            f"--runtime-env={ROOT}/cluster/job-runtime-env.yaml",
            "--",
            "python",
            "-m",
            "rllib_policies.train_outer_controller",
            "--config",
            config_path,
            *extra,
        )
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline, status = time.time() + 240, ""
    while time.time() < deadline:
        status = ray_cli(env, "job", "status", f"--address={address}", job_id).stdout.upper()
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    logs = ray_cli(env, "job", "logs", f"--address={address}", job_id).stdout
    assert "SUCCEEDED" in status, f"{status[-1000:]}\n--- job logs ---\n{logs[-4000:]}"
    return logs


@pytest.mark.ray
def test_job_submission_trains_checkpoints_and_resumes(head, tmp_path):
    env, address, _ = head
    ckpt = tmp_path / "run"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(JOB_CONFIG.replace("{ckpt}", str(ckpt)))
    first = submit(env, address, str(cfg))
    assert "iter    1 |" in first and "iter    2 |" in first, first[-2000:]
    assert sorted(os.path.basename(p) for p in glob.glob(str(ckpt / "iter_*"))) == ["iter_000001", "iter_000002"]
    assert glob.glob(str(ckpt / "tensorboard" / "events.out.tfevents.*"))
    second = submit(env, address, str(cfg), "--resume", "latest", "--iterations", "1")
    assert "resumed from" in second and "iter    3 |" in second, second[-2000:]
    assert (ckpt / "iter_000003").exists()
