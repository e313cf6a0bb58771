"""A real `ray job submit` of the training entrypoint against a local `ray start --head`:
it trains, checkpoints, writes TensorBoard events, and a second submission resumes."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

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
    tmp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")          # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": tmp}
    gcs, dash = free_port(), free_port()
    subprocess.run([f"{BIN}/ray", "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={tmp}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    yield env, f"http://127.0.0.1:{dash}", tmp
    subprocess.run([f"{BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)


def submit(env, address, config_path, *extra) -> str:
    cmd = [f"{BIN}/ray", "job", "submit", f"--address={address}", f"--working-dir={ROOT}",
           f"--runtime-env={ROOT}/cluster/job-runtime-env.yaml", "--",
           "python", "-m", "rllib_policies.train_outer_controller", "--config", config_path, *extra]
    env = {**env, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
    for attempt in range(3):   # the first submit after start may find no agent yet
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


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
