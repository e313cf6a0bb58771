"""One real local Ray (and Serve) per test session, in a private temp dir."""

import os
import shutil
import socket
import time

import pytest

pytest_plugins = ("tests.ray_jobs",)  # the ray_head fixture: a local `ray start --head` for `ray job submit` tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readers_registered(store, reader_ids, timeout_s: float = 30.0) -> None:
    """Wait until a param store has seen each follower's first poll (a follower is live to a put only then).
    Under CI load, with two Rays on two cores, a first poll has lagged by seconds."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not set(reader_ids) <= set(ray.get(store.readers.remote())) and time.monotonic() < deadline:
        time.sleep(0.05)


def pytest_collection_modifyitems(items):
    """Tests that submit Ray jobs run last, side by side: they share one `ray start --head` (``ray_head``,
    session-scoped), which then never idles beside the rest of the suite on a 2-core machine."""
    items.sort(key=lambda item: "ray_head" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True, scope="module")
def _end_what_a_module_left_running():
    """Serve applications and the project's named actors (namespace "morl") a test module created end with the
    module (param stores are detached by design). Left running — a test that failed before its own cleanup, or
    one that has none — they hold the session's logical CPUs (a Serve replica takes 0.25 of 4) until a later
    module's replicas cannot be placed and its deployment waits out the test timeout."""
    import ray

    def running():
        if not ray.is_initialized():
            return set(), set()
        actors = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
        apps = set()
        if ("serve", "SERVE_CONTROLLER_ACTOR") in actors:
            from ray import serve

            apps = set(serve.status().applications)
        return actors, apps

    actors_before, apps_before = running()
    yield
    actors_after, apps_after = running()
    if apps_after - apps_before:
        from ray import serve

        for app in apps_after - apps_before:
            serve.delete(app)
    for namespace, name in actors_after - actors_before:
        if namespace != "morl":  # only the project's own (actors.param_store); Serve's and Ray Data's stay
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone meanwhile
            pass


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
