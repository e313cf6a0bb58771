"""The Serve config launcher: ingress key validation and the builder's argument checks."""

import pytest
import yaml

from serve_apps.inner_reward import app_builder
from serve_apps.launch import INGRESS_ENV, load_config


def test_ingress_key_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ingress": "nginx", "applications": [{"import_path": "x:y"}]}))
    with pytest.raises(ValueError, match="ingress must be one of"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"applications": []}))
    with pytest.raises(ValueError, match="non-empty 'applications'"):
        load_config(str(path))
    assert INGRESS_ENV["haproxy"] == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def test_builder_rejects_unknown_and_bad_args():
    with pytest.raises(ValueError, match="unknown inner-reward args: \\['max_slate'\\]"):
        app_builder({"max_slate": 3})
    with pytest.raises(ValueError, match="max_slate_size must be >= 1"):
        app_builder({"max_slate_size": 0})
    with pytest.raises(ValueError, match="clip_lo"):
        app_builder({"initial_weights": {"clip_lo": 2, "clip_hi": 1}})


@pytest.mark.ray
@pytest.mark.serve
def test_sigterm_drains_and_stops_everything_the_launcher_started(tmp_path):
    """What Kubernetes and systemd send: SIGTERM to `python -m serve_apps.launch … --block` (HAProxy ingress) stops
    the applications and the Ray it started — GCS, raylet, workers, replicas, HAProxy — within the deadline."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from benchmarks.common import descendants, still_running
    from serve_apps.launch import STOP_DEADLINE_S
    from tests.conftest import free_port

    config = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../serve_apps/configs/inner_reward.yaml")))
    config["http_options"]["port"] = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}  # the launcher makes its own, short path
    # HAProxy's metrics and stats listeners default to fixed ports (9101, 8404): free ones, beside any other HAProxy
    env.update(RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_apps.launch", str(path), "--block", "--num-cpus", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert proc.poll() is None, "".join(lines)
        started = descendants(proc.pid)
        assert len(started) >= 3, "".join(lines)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=STOP_DEADLINE_S + 10)
        stopped = time.monotonic() - t0
        assert proc.returncode == 0, out
        assert "stopped in" in out and stopped < STOP_DEADLINE_S + 5, (stopped, out)
        deadline = time.monotonic() + 5
        while still_running(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p, _ in still_running(started)]
        assert not left, [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:120] for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
