"""The Serve config launcher: ingress key validation and the builder's argument checks."""

import pytest
import yaml

from serve_apps.inner_reward import app_builder
from serve_apps.launch import HAPROXY_RETRY_ENV, INGRESS_ENV, load_config


def test_ingress_key_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"ingress": "nginx", "applications": [{"import_path": "x:y"}]}))
    with pytest.raises(ValueError, match="ingress must be one of"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"applications": []}))
    with pytest.raises(ValueError, match="non-empty 'applications'"):
        load_config(str(path))
    assert INGRESS_ENV["haproxy"] == {"RAY_SERVE_ENABLE_HA_PROXY": "1", **HAPROXY_RETRY_ENV}
    assert "503" not in HAPROXY_RETRY_ENV["RAY_SERVE_HAPROXY_RETRY_ON"]  # a replica's backpressure is not replayed


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
    import sys

    from benchmarks.common import sigterm_when_ready
    from serve_apps.launch import STOP_DEADLINE_S
    from tests.conftest import free_port

    config = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../serve_apps/configs/inner_reward.yaml")))
    config["http_options"]["port"] = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}  # the launcher makes its own, short path
    # HAProxy's metrics and stats listeners default to fixed ports (9101, 8404): free ones, beside any other HAProxy
    env.update(RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "serve_apps.launch", str(path), "--block", "--num-cpus", "2"]
    run = sigterm_when_ready(cmd, "serving ", env, timeout_s=STOP_DEADLINE_S + 10, grace_s=5)
    assert run["returncode"] == 0 and "stopped in" in run["output"], run["output"][-3000:]
    assert run["stop_s"] < STOP_DEADLINE_S + 5, run["stop_s"]
    assert not run["left"], run["left"]
