"""A local `ray start --head` with a dashboard for real `ray job submit` tests, and the submit helper.
``ray_head`` is a plugin fixture (tests/conftest.py), session-scoped: the tests that ask for it run last
(tests/conftest.py sorts them there) and share one head."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def ray_head():
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
            "--num-cpus=4",  # logical: Serve replicas and a learner side by side
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
            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield env, address, tmp
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # a graceful stop takes ~30 s on 2 cores; this cluster and its temp dir are thrown away anyway
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    shutil.rmtree(tmp, ignore_errors=True)


def ray_cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([f"{BIN}/ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(env, address, *entrypoint, timeout_s: float = 240) -> str:
    """Submit ``entrypoint`` (argv after ``--``), wait for the job to finish (bounded), return its logs."""
    job_id = f"job-{uuid.uuid4().hex[:8]}"
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
            *entrypoint,
        )
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # status and logs over the job server's REST API: polling with the CLI would start a Python that
    # imports Ray every 2 s, half a core on a 2-core machine
    deadline, status = time.time() + timeout_s, ""
    while time.time() < deadline:
        try:
            status = httpx.get(f"{address}/api/jobs/{job_id}", timeout=30).json().get("status", "")
        except (httpx.HTTPError, ValueError):  # a busy dashboard: ask again
            pass
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    else:  # out of time: the job must not run on beside the next test
        httpx.post(f"{address}/api/jobs/{job_id}/stop", timeout=30)
    logs = httpx.get(f"{address}/api/jobs/{job_id}/logs", timeout=30).json().get("logs", "")
    assert status == "SUCCEEDED", f"{status}\n--- job logs ---\n{logs[-4000:]}"
    return logs


def delete_serve_apps(address: str) -> None:
    """Delete every Serve application on the head (a job's apps outlive the job), so later jobs run alone."""
    httpx.delete(f"{address}/api/serve/applications/", timeout=120)
