"""One real local Ray (and Serve) per test session, in a private temp dir."""

import os
import shutil
import socket

import pytest

pytest_plugins = ("tests.ray_jobs",)  # the ray_head fixture: a local `ray start --head` for `ray job submit` tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from serve_apps.launch import start_local_ray

    start_local_ray(num_cpus=4)
    yield ray
    ray.shutdown()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def serve_url(ray_session):
    """Base URL of a real Serve HTTP proxy on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
