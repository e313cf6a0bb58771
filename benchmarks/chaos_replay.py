"""Chaos at the ingress (issue 18, part 3): does HAProxy replay a request whose replica is killed while answering it?

    python benchmarks/chaos_replay.py            # ~10 min; writes its section of benchmarks/results/chaos.md
    python benchmarks/chaos_replay.py --trials 3 --quick

`benchmarks/chaos.py` kills a replica under a steady /recommend load, where a request is in flight on the victim at
the kill only by chance (a /recommend answer takes ~5 ms). Here each trial makes that certain: a deployment of 2
replicas behind Serve's HAProxy ingress answers a request after ``--hold`` s; 0.8 s into one, the replica holding it
(it names itself) is `ray.kill`ed, and the client's outcome is recorded. The next trial waits until Serve has
replaced the replica. Each HAProxy retry policy runs on its own local Ray (Ray reads it when the ingress starts):

    ray default   RAY_SERVE_HAPROXY_RETRY_ON=conn-failure (Ray's own default: replay only what never reached a server)
    launch.py     serve_apps/launch.py's HAPROXY_RETRY_ENV (also replay a request whose server closed without an
                  answer: safe for this project's apps, whose every route is idempotent)
    launch.py, round robin / 6 retries   the same with HAProxy's other balance algorithm / twice Ray's 3 retries:
                  alternatives tried before keeping launch.py's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine, write_marked_section  # noqa: E402
from serve_apps.launch import HAPROXY_RETRY_ENV  # noqa: E402
from tests.conftest import free_port  # noqa: E402

POLICIES = {
    "ray default": {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure"},
    "launch.py": HAPROXY_RETRY_ENV,
    "launch.py, round robin": {**HAPROXY_RETRY_ENV, "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "roundrobin"},
    "launch.py, 6 retries": {**HAPROXY_RETRY_ENV, "RAY_SERVE_HAPROXY_RETRIES": "6"},
}


def held_app(mark: str):
    """Two replicas that answer after ``?hold=`` s and write their replica id to ``mark`` when a request arrives."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25})
    class Held:
        async def __call__(self, request: Request) -> dict:
            import asyncio

            replica = serve.get_replica_context().replica_id.unique_id
            with open(mark, "w") as f:
                f.write(replica)
            await asyncio.sleep(float(request.query_params.get("hold", "0")))
            return {"replica": replica}

    return Held.bind()


def replicas() -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::held")
    )


def trials(policy: str, count: int, hold_s: float) -> list[dict]:
    """``count`` trials on a fresh local Ray with ``policy``'s HAProxy retry setting."""
    import ray
    from ray import serve

    from serve_apps.launch import start_local_ray

    ports = {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    start_local_ray(num_cpus=2, ingress="haproxy", env={**ports, **POLICIES[policy]})
    port, mark = free_port(), tempfile.mktemp(prefix="morl-held-")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    serve.run(held_app(mark), name="held", route_prefix="/held")
    url = f"http://127.0.0.1:{port}/held"
    httpx.get(url, timeout=30)
    rows = []
    for _ in range(count):
        names = replicas()
        outcome: dict = {}

        def call(outcome: dict = outcome) -> None:
            t0 = time.monotonic()
            try:
                r = httpx.post(url, params={"hold": hold_s}, json={"trial": len(rows)}, timeout=30)
                outcome["result"] = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                outcome["result"] = type(e).__name__
            outcome["latency_s"] = time.monotonic() - t0

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.8)
        holder = open(mark).read()
        victim = next(n for n in names if n.endswith(f"#{holder}"))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        thread.join()
        rows.append(outcome)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(replicas()) < 2 or victim in replicas()):
            time.sleep(0.2)
        while serve.status().applications["held"].status != "RUNNING":
            time.sleep(0.2)
        time.sleep(2.0)  # the replacement in HAProxy's server list
    serve.shutdown()
    ray.shutdown()
    return rows


def settings(env: dict[str, str]) -> str:
    """A policy's Ray environment variables, without their common ``RAY_SERVE_HAPROXY_`` prefix."""
    return ", ".join(f"`{k.removeprefix('RAY_SERVE_HAPROXY_')}={v}`" for k, v in env.items())


def markdown(results: dict[str, list[dict]], hold_s: float, wall: float) -> str:
    lines = [
        "## HAProxy replaying a request whose replica was killed while answering it",
        "",
        f"`benchmarks/chaos_replay.py` — {machine()}; one run, {wall:.0f} s. Per trial: a POST held {hold_s:g} s by "
        "one of 2 replicas behind the HAProxy ingress; 0.8 s in, that replica is `ray.kill`ed; the client's outcome "
        "is recorded; Serve replaces the replica before the next trial. Each retry policy on its own local Ray.",
        "",
        "| HAProxy retry policy | settings | trials | answered 200 | failed | outcomes | "
        "median latency of the 200s s |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for policy, rows in results.items():
        ok = [r["latency_s"] for r in rows if r["result"] == "HTTP 200"]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["result"]] = counts.get(r["result"], 0) + 1
        median = f"{sorted(ok)[len(ok) // 2]:.1f}" if ok else "—"
        lines.append(
            f"| {policy} | {settings(POLICIES[policy])} | {len(rows)} | {len(ok)} | "
            f"{len(rows) - len(ok)} | {', '.join(f'{k} × {v}' for k, v in counts.items())} | {median} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--hold", type=float, default=2.0, help="s each request is held by its replica")
    parser.add_argument("--quick", action="store_true", help="no files written")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--one", choices=list(POLICIES), help=argparse.SUPPRESS)  # a policy's trials, as JSON
    args = parser.parse_args()
    if args.one:
        print("TRIALS " + json.dumps(trials(args.one, args.trials, args.hold)), flush=True)
        return
    started, results = time.time(), {}
    for policy in args.policies:  # each on its own Ray: the ingress reads its retry policy when it starts
        cmd = [sys.executable, __file__, "--one", policy, "--trials", str(args.trials), "--hold", str(args.hold)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        found = [line for line in out.stdout.splitlines() if line.startswith("TRIALS ")]
        if not found:
            raise RuntimeError(f"{policy}: no trials\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        results[policy] = json.loads(found[-1][len("TRIALS ") :])
        print(f"{policy}: {[r['result'] for r in results[policy]]}", flush=True)
    section = markdown(results, args.hold, time.time() - started)
    print(section)
    if not args.quick:
        path = os.path.join(ROOT, "benchmarks", "results", "chaos.md")
        write_marked_section(path, "ingress_replay", section, "Chaos under load")


if __name__ == "__main__":
    main()
