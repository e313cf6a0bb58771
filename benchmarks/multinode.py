"""Multi-node Ray on one machine: a training job whose env runners and learner sit on different nodes, Serve
replicas spread over nodes, and the autoscaler adding nodes under load and removing them after.

    python benchmarks/multinode.py            # ~4 min; writes benchmarks/results/multinode.{md,png,json}

Ray's fake multi-node provider (what Ray's own autoscaler tests use; `ray.cluster_utils.AutoscalingCluster` wraps
it): `ray start --head --autoscaling-config=…` with RAY_FAKE_CLUSTER=1. Every worker node the autoscaler launches
is a real raylet on this machine with its own resources (here 1 CPU each), joined over loopback; the head has no
CPU, so every task and actor runs on a launched node, as on the KubeRay clusters in cluster/ (head num-cpus 0).

1. Training: the outer controller (rllib_policies/train_outer_controller.py's build) with 2 env runners and 1
   learner of 1 CPU each on an empty cluster: the autoscaler launches nodes for them; each actor's node is read
   from inside it, two iterations train across the nodes, the algorithm stops, the nodes go idle.
2. Serving: the inner-reward app deployed declaratively (as KubeRay applies a RayService's serveConfigV2) with
   Serve autoscaling (1–4 replicas of 1 CPU) behind the head's proxy; a closed-loop load of 16 clients for 60 s,
   then none. Sampled every second: alive worker nodes, running replicas, completed requests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import descendants, machine, save_plot, stop_processes, write_results  # noqa: E402
from tests.conftest import free_port  # noqa: E402

BIN = os.path.dirname(sys.executable)
IDLE_TIMEOUT_MIN = 0.25  # a worker node idle this long is removed


def fake_cluster_config(max_workers: int, gcs_address: str) -> dict:
    """The autoscaler's cluster config for the fake multi-node provider: a CPU-less head, 1-CPU workers that join
    the head's GCS at ``gcs_address`` (the provider assumes port 6379 otherwise)."""
    return {
        "cluster_name": "morl_multinode",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {
                "resources": {"CPU": 1, "object_store_memory": 200 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def start_head(tmp: str, max_workers: int) -> tuple[subprocess.Popen, str, dict]:
    """`ray start --head --block` with the fake autoscaler, in its own process group → (process, GCS address, env)."""
    import ray

    port = free_port()
    config = os.path.join(tmp, "autoscaling.json")
    with open(config, "w") as f:
        json.dump(fake_cluster_config(max_workers, f"{ray.util.get_node_ip_address()}:{port}"), f)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": tmp}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            f"{BIN}/ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=0",
            f"--autoscaling-config={config}",
            f"--temp-dir={tmp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, f"127.0.0.1:{port}", env


def worker_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def wait_for_nodes(count: int, timeout_s: float) -> float:
    """Seconds until at most ``count`` worker nodes are alive (the autoscaler removing idle ones), or the timeout."""
    t0 = time.monotonic()
    while len(worker_nodes()) > count and time.monotonic() - t0 < timeout_s:
        time.sleep(1)
    return time.monotonic() - t0


def training_placement(log) -> dict:
    """The outer controller with 2 env runners and 1 learner on the empty cluster: where each actor runs."""
    import ray

    from rllib_policies.train_outer_controller import TrainJobConfig, build

    job = TrainJobConfig(
        env_config={"world": {"n_items": 2000, "n_users": 300}, "pipeline": {"k_matching": 100, "k_pre_ranking": 20}},
        outer_controller={"sessions_per_iteration": 8, "min_sessions_for_kpi": 16, "kl_rollback_threshold": None},
        env_runners={"num_env_runners": 2, "num_envs_per_env_runner": 2},
        learners={"num_learners": 1},
        iterations=2,
    )
    t0 = time.perf_counter()
    algo = build(job)
    t_built = time.perf_counter() - t0
    runners = algo.env_runner_group.foreach_env_runner(
        lambda r: ray.get_runtime_context().get_node_id(), local_env_runner=False
    )
    learners = [r.get() for r in algo.learner_group.foreach_learner(lambda _: ray.get_runtime_context().get_node_id())]
    driver = ray.get_runtime_context().get_node_id()
    log(f"training: built in {t_built:.0f} s on {len(worker_nodes())} worker nodes; training 2 iterations")
    returns = []
    for _ in range(2):
        result = algo.train()
        returns.append(float(result["outer_controller"]["outer_reward_mean"]))
    algo.stop()
    return {
        "driver_node": driver,
        "env_runner_nodes": list(runners),
        "learner_nodes": learners,
        "nodes_after_build": len(worker_nodes()),
        "build_s": t_built,
        "train_s": time.perf_counter() - t0 - t_built,
        "outer_reward_mean": returns,
    }


def serving_timeline(load_s: float, settle_s: float, clients: int, log) -> dict:
    """Deploy the inner-reward app with Serve autoscaling; load it, then let it go idle; sample every second."""
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    config = {
        "applications": [
            {
                "name": "inner_reward",
                "route_prefix": "/",
                "import_path": "serve_apps.inner_reward:app_builder",
                "args": {"weights_store": "multinode_weights"},
                "deployments": [
                    {
                        "name": "InnerRewardService",
                        "max_ongoing_requests": 8,
                        "autoscaling_config": {
                            "min_replicas": 1,
                            "max_replicas": 4,
                            "target_ongoing_requests": 2,
                            "upscale_delay_s": 3,
                            "downscale_delay_s": 10,
                            "metrics_interval_s": 1,
                            "look_back_period_s": 3,
                        },
                        "ray_actor_options": {"num_cpus": 1},
                    }
                ],
            }
        ]
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    rng = np.random.default_rng(0)
    slates = [
        {
            "clicked": (rng.random(200) < 0.2).tolist(),
            "dwell_s": rng.exponential(10, 200).round(2).tolist(),
            "skipped": (rng.random(200) < 0.3).tolist(),
            "relevance": rng.random(200).round(3).tolist(),
        }
        for _ in range(32)
    ]
    body = {"slates": slates}
    url = f"http://127.0.0.1:{port}/reward"
    stop_load, done, errors, codes = threading.Event(), [0], [0], {}

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop_load.is_set():
                try:
                    code = c.post(url, json=body).status_code
                except httpx.HTTPError as err:
                    code = type(err).__name__
                done[0] += code == 200
                errors[0] += code != 200
                if code != 200:
                    codes[code] = codes.get(code, 0) + 1

    samples, t0 = [], time.monotonic()
    threads: list[threading.Thread] = []

    def sample(phase: str) -> None:
        status = serve.status().applications["inner_reward"].deployments["InnerRewardService"]
        samples.append(
            {
                "t": round(time.monotonic() - t0, 1),
                "phase": phase,
                "worker_nodes": len(worker_nodes()),
                "replicas": int(status.replica_states.get("RUNNING", 0)),
                "requests": done[0],
                "errors": errors[0],
            }
        )

    for _ in range(5):
        sample("idle")
        time.sleep(1)
    log(f"serving: {clients} clients for {load_s:.0f} s")
    for _ in range(clients):
        threads.append(threading.Thread(target=client, daemon=True))
        threads[-1].start()
    while time.monotonic() - t0 < 5 + load_s:
        sample("load")
        time.sleep(1)
    stop_load.set()
    for th in threads:
        th.join()
    log(f"serving: load off; waiting up to {settle_s:.0f} s for the cluster to shrink")
    while time.monotonic() - t0 < 5 + load_s + settle_s:
        sample("after")
        if samples[-1]["replicas"] == 1 and samples[-1]["worker_nodes"] <= 1:
            break
        time.sleep(1)
    serve.shutdown()
    return {
        "samples": samples,
        "requests": done[0],
        "errors": errors[0],
        "error_codes": {str(k): v for k, v in codes.items()},
    }


def report(result: dict, path: str, wall: float) -> None:
    tr, sv = result["training"], result["serving"]
    nodes = set(tr["env_runner_nodes"]) | set(tr["learner_nodes"])
    s = sv["samples"]
    peak = max(x["worker_nodes"] for x in s)
    load = [x for x in s if x["phase"] == "load"]
    first_up = next((x["t"] for x in load if x["worker_nodes"] > load[0]["worker_nodes"]), None)
    last = s[-1]
    rows = [x for i, x in enumerate(s) if i % 5 == 0 or x is last]
    table = "\n".join(
        f"| {x['t']:.0f} | {x['phase']} | {x['worker_nodes']} | {x['replicas']} | {x['requests']} | {x['errors']} |"
        for x in rows
    )
    short = {n: f"node {i + 1}" for i, n in enumerate(dict.fromkeys([*tr["env_runner_nodes"], *tr["learner_nodes"]]))}
    sections = [
        "# Multi-node on one machine: training across nodes, Serve replicas across nodes, autoscaling\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. Command: "
        f"`python benchmarks/multinode.py`; total wall time {wall:.0f} s. Ray's fake multi-node autoscaler: a "
        "CPU-less head and up to 4 worker nodes of 1 CPU each, each a real raylet on this machine joined over "
        f"loopback, removed after {IDLE_TIMEOUT_MIN * 60:.0f} s idle (benchmarks/multinode.py's docstring).\n",
        "## 1. A training job across nodes\n\n"
        "The outer controller with 2 env runners and 1 learner (1 CPU each) started on an empty cluster: the "
        f"autoscaler launched {tr['nodes_after_build']} worker nodes in {tr['build_s']:.0f} s, and each actor reports "
        "its node from inside:\n\n| actor | node |\n|---|---|\n"
        + "\n".join(f"| env runner {i + 1} | {short[n]} |" for i, n in enumerate(tr["env_runner_nodes"]))
        + "\n"
        + "\n".join(f"| learner {i + 1} | {short[n]} |" for i, n in enumerate(tr["learner_nodes"]))
        + f"\n\n{len(nodes)} distinct nodes; the driver runs on the head. Two iterations trained across them in "
        f"{tr['train_s']:.0f} s (outer reward per session {', '.join(f'{r:.2f}' for r in tr['outer_reward_mean'])}); "
        f"after the algorithm stopped, the autoscaler removed its nodes within {tr['idle_removal_s']:.0f} s.\n",
        "## 2. Serve replicas and nodes under load\n\n"
        "The inner-reward app deployed declaratively (Serve autoscaling 1–4 replicas, target 2 ongoing requests, "
        "1 CPU each), 16 closed-loop clients posting 32 slates × 200 items for 60 s, then none. Worker nodes "
        f"went from {s[0]['worker_nodes']} to a peak of {peak}"
        + (f" (the first added {first_up - load[0]['t']:.0f} s into the load)" if first_up is not None else "")
        + f" and back to {last['worker_nodes']} at t = {last['t']:.0f} s with {last['replicas']} replica(s); "
        f"{sv['requests']} requests answered, {sv['errors']} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sv['error_codes'].items())})" if sv["errors"] else "")
        + ".\n\n"
        "| t (s) | phase | worker nodes | running replicas | requests done | failed |\n|---:|---|---:|---:|---:|---:|\n"
        + table
        + "\n\n![nodes and replicas over time](multinode.png)\n",
    ]
    write_results(path, sections, partial=False)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["serving"]["samples"]
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.step(t, [x["worker_nodes"] for x in s], where="post", label="worker nodes")
    ax.step(t, [x["replicas"] for x in s], where="post", label="running replicas", linestyle="--")
    load = [x["t"] for x in s if x["phase"] == "load"]
    ax.axvspan(load[0], load[-1], color="0.9", label="load on")
    ax.set_xlabel("t (s)")
    ax.set_ylabel("count")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="center right")
    ax.set_title("Serve autoscaling and the Ray autoscaler on one machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-s", type=float, default=60)
    parser.add_argument("--settle-s", type=float, default=120)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))  # stop the cluster too
    tmp = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # short: Ray's socket paths
    head, address, env = start_head(tmp, max_workers=4)

    def log(line: str) -> None:
        print(f"[multinode] {line}", flush=True)

    started: set = set()
    try:
        import ray

        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_TMPDIR")})
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                break
            except Exception:  # the head is still starting
                if time.time() > deadline:
                    raise
                time.sleep(2)
        log(f"head up at {address}; worker nodes: {len(worker_nodes())}")
        result = {"training": training_placement(log)}
        log(f"training placement: {result['training']}")
        started |= descendants(head.pid)
        result["training"]["idle_removal_s"] = wait_for_nodes(0, 120)
        log(f"training's nodes removed after {result['training']['idle_removal_s']:.0f} s idle")
        result["serving"] = serving_timeline(args.load_s, args.settle_s, args.clients, log)
        started |= descendants(head.pid)
        ray.shutdown()
    finally:
        started |= descendants(head.pid)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        stop_processes(started)
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "multinode.json"), "w") as f:
        json.dump(result, f, indent=1)
    save_plot(os.path.join(args.results_dir, "multinode.png"), lambda path: plot(result, path))
    report(result, os.path.join(args.results_dir, "multinode.md"), time.perf_counter() - t0)
    log(f"wrote {os.path.join(args.results_dir, 'multinode.md')} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
