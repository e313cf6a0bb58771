"""Chaos under steady load (issue 18, part 3): a Serve replica killed while /recommend is served at a steady rate.

    python benchmarks/chaos.py                 # ~4 min; writes benchmarks/results/chaos.{md,json,png}
    python benchmarks/chaos.py --quick         # one short scenario, no files

Each scenario deploys the recommend app (and the inner-reward app) on a private local Ray, sends an open-loop
load (request i due at t0 + i/rate, each on its own task, so a stalled request never delays the next), and
`ray.kill`s one replica at ``--kill-at`` s: the fused ingress (RecommendService, 2 replicas), or one of two
replicas of a composed stage (matching, pre_ranking, ranking). Serve's controller replaces the dead replica.

Per request: the first attempt's outcome, and one client retry on a connection error or a 5xx (a slate request
has no side effect a retry could double: a slate never fed back is never logged). Reported: requests failed on
the first attempt and after the retry, the disruption (kill → last failed first attempt) and the recovery (kill
→ the deployment back at its replica count). The composed ingress also resends a stage call that meets a dying
stage replica (serve_apps/recommend.py, STAGE_REPLICA_GONE), so a stage kill should not reach the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.param_store import SNAPSHOT_DIR_ENV  # noqa: E402
from benchmarks.common import machine, save_plot, write_marked_section  # noqa: E402
from serve_apps.launch import INGRESS_ENV  # noqa: E402
from tests.conftest import free_port  # noqa: E402

WORLD = {"world": {"n_items": 3000, "n_users": 500}, "pipeline": {"k_matching": 200, "k_pre_ranking": 30, "k_slate": 8}}
COMPOSED = {"cascade": "composed", "stage_replicas": 2}
SCENARIOS = {  # name → (recommend args, the deployment whose replica is killed, the load in req/s)
    "ingress (fused, 2 replicas)": ({"num_replicas": 2}, "RecommendService", 30),
    "matching (composed, 2 replicas per stage)": (COMPOSED, "Stage_matching", 15),
    "pre_ranking (composed, 2 replicas per stage)": (COMPOSED, "Stage_pre_ranking", 15),
    "ranking (composed, 2 replicas per stage)": (COMPOSED, "Stage_ranking", 15),
    "matching (composed) at 30 req/s": (COMPOSED, "Stage_matching", 30),
}
OVERLOAD = {"matching (composed) at 30 req/s"}  # more than 8 replicas on 2 cores serve: it fails before the kill


def replicas(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


async def one_request(client: httpx.AsyncClient, user: int) -> tuple[str, float]:
    started = time.monotonic()
    try:
        r = await client.post("/recommend", json={"user_id": user})
        outcome = "ok" if r.status_code == 200 else f"HTTP {r.status_code}"
    except httpx.HTTPError as e:
        outcome = type(e).__name__
    return outcome, time.monotonic() - started


async def steady_load(url: str, rate: float, duration: float, kill_at: float, kill) -> tuple[list[dict], float, int]:
    """Open-loop load; ``kill()`` runs right after the first request due at ``kill_at`` s is sent, so the kill lands
    while a request is being answered. Returns one record per request, the kill's time and the requests in flight
    at it."""
    records, t_kill, in_flight, at_kill = [], None, [0], 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits) as client:

        async def request(i: int, due: float) -> None:
            in_flight[0] += 1
            first, latency = await one_request(client, i % 500)
            in_flight[0] -= 1
            retried = None
            if first != "ok" and (first.startswith("HTTP 5") or not first.startswith("HTTP")):
                retried, _ = await one_request(client, i % 500)
            records.append({"t": due - t0, "first": first, "retried": retried, "latency_s": latency})

        t0 = time.monotonic()
        tasks, n = [], int(rate * duration)
        for i in range(n):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(request(i, due)))
            if t_kill is None and due - t0 >= kill_at:
                await asyncio.sleep(0.002)  # the request is on the wire
                t_kill, at_kill = time.monotonic() - t0, in_flight[0]
                await asyncio.to_thread(kill)
        await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r["t"]), t_kill, at_kill


def ingress_retries() -> int | None:
    """Requests HAProxy has replayed on another server so far (its stats' ``wretr`` over every backend), or None
    without HAProxy."""
    stats_port = os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT")
    if not os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") or not stats_port:
        return None
    csv = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5).text.lstrip("# ").splitlines()
    header = csv[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in csv[1:] if line]
    return sum(int(r["wretr"] or 0) for r in rows if r.get("svname") == "BACKEND")


def run_scenario(
    name: str, args: dict, deployment: str, port: int, rate: float, duration: float, kill_at: float
) -> dict:
    import ray
    from ray import serve

    prefix, url = deploy_apps(port, args)
    before = replicas("chaos", deployment)
    for u in range(20):  # warm every replica's code path
        httpx.post(f"{url}/recommend", json={"user_id": u}, timeout=30)
    replaced = {}

    def watch(t_kill: float) -> None:
        """Kill → the deployment back at its replica count with the victim gone (its replacement's actor up)."""
        deadline = t_kill + 120
        while time.monotonic() < deadline:
            now = replicas("chaos", deployment)
            if len(now) == len(before) and before[0] not in now:
                replaced["s"] = time.monotonic() - t_kill
                return
            time.sleep(0.1)

    victim = ray.get_actor(before[0], namespace="serve")

    def kill() -> None:
        t_kill = time.monotonic()
        ray.kill(victim, no_restart=True)
        replaced["thread"] = threading.Thread(target=watch, args=(t_kill,), daemon=True)
        replaced["thread"].start()

    retries_before = ingress_retries()
    records, t_kill, at_kill = asyncio.run(steady_load(url, rate, duration, kill_at, kill))
    retries = None if retries_before is None else ingress_retries() - retries_before
    replaced["thread"].join()
    recovery_s = replaced.get("s", float("nan"))
    while serve.status().applications["chaos"].status != "RUNNING":  # settled before the deletion
        time.sleep(0.2)
    delete_apps(prefix)
    row = summarise(name, deployment, records, t_kill) | {
        "recovery_s": recovery_s,
        "rate": rate,
        "replayed": retries,
        "in_flight_at_kill": at_kill,
    }
    outcomes = row["outcomes"]
    print(
        f"{name}: {row['failed_first']}/{row['requests']} failed first ({row['failed_first_pct']:.2f} %), "
        f"{row['failed_after_retry']} after one retry; disruption {row['disruption_s']:.2f} s, replaced in "
        f"{recovery_s:.1f} s; {outcomes}; in flight at the kill {at_kill}, replayed by the ingress: {retries}",
        flush=True,
    )
    return row


def run_store_kill(port: int, rate: float, duration: float, kill_at: float) -> dict:
    """The ranking stage's parameter store killed under load (its process dies; Ray restarts it from its snapshot,
    MORL_STORE_SNAPSHOTS): requests keep being served on the replica's last parameters; then a write after the
    restart must reach the replica."""
    import ray

    from actors.param_store import find_store

    prefix, url = deploy_apps(port, {})
    params = httpx.get(f"{url}/stages", timeout=30).json()["ranking"]
    moved = {k: v * 1.5 for k, v in params["params"].items()}
    version = httpx.put(f"{url}/stages/ranking/params", json={"params": moved}, timeout=30).json()["version"]
    store = find_store(f"{prefix}_ranking")
    pid = ray.get(store.__ray_call__.remote(lambda _: os.getpid()))
    back = {}

    def watch(t_kill: float) -> None:
        """Kill → the restarted store (a new process) answering at the version it had."""
        while time.monotonic() < t_kill + 120:
            try:
                if ray.get(store.__ray_call__.remote(lambda _: os.getpid()), timeout=5) != pid:
                    back["version"] = ray.get(store.get.remote(), timeout=5).version
                    back["s"] = time.monotonic() - t_kill
                    return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.1)

    def kill() -> None:
        t_kill = time.monotonic()
        ray.kill(store, no_restart=False)  # the process dies; Ray restarts the actor
        back["thread"] = threading.Thread(target=watch, args=(t_kill,), daemon=True)
        back["thread"].start()

    records, t_kill, at_kill = asyncio.run(steady_load(url, rate, duration, kill_at, kill))
    back["thread"].join()
    served = httpx.post(f"{url}/recommend", json={"user_id": 1}, timeout=30).json()["versions"]["ranking"]
    again = httpx.put(f"{url}/stages/ranking/params", json={"params": params["params"]}, timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the replica's follower re-polls the restarted store
        followed = httpx.post(f"{url}/recommend", json={"user_id": 1}, timeout=30).json()["versions"]["ranking"]
        if followed == again.json().get("version"):
            break
        time.sleep(0.2)
    delete_apps(prefix)
    row = summarise("ranking stage's parameter store (fused, 1 replica)", "VersionedParamStore", records, t_kill)
    row |= {
        "recovery_s": back.get("s", float("nan")),
        "rate": rate,
        "in_flight_at_kill": at_kill,
        "store": {
            "version_before": version,
            "version_after_restart": back.get("version"),
            "served_during": served,
            "write_after_restart": again.status_code,
            "followed": followed,
        },
    }
    print(f"{row['scenario']}: {row['failed_first']}/{row['requests']} failed; store {row['store']}", flush=True)
    return row


def redis_kill(events_per_s: float = 20_000, duration: float = 10.0, down: tuple = (0.25, 0.6)) -> dict:
    """The Redis server SIGKILLed mid-flush and restarted: the telemetry buffer (actors/telemetry) emits served-item
    events at a steady rate into a Redis Streams sink that flushes every 5 ms; the server dies at ``down[0]`` of
    the run and comes back at ``down[1]``. Every stream entry is then read raw, before and after dedupe on
    event_id: lost = emitted − distinct, duplicated = raw − distinct."""
    import pyarrow as pa

    from actors.telemetry import BufferConfig, RedisStreamReader, RedisStreamSink, TelemetryBuffer, dedupe
    from benchmarks.common import RedisServer
    from tests.telemetry_helpers import make_requests

    server = RedisServer().start()
    try:
        buf = TelemetryBuffer(
            RedisStreamSink(server.url, "chaos", timeout_s=0.5),
            BufferConfig(capacity_events=1_000_000, flush_interval_s=0.005, backoff_max_s=0.2),
        )
        batches = make_requests(int(events_per_s * duration / 10), slate=10)  # 10 events per request
        t0, killed_at, back_at, peak = time.monotonic(), None, None, 0
        for i, b in enumerate(batches):
            due = t0 + i * 10 / events_per_s
            time.sleep(max(0.0, due - time.monotonic()))
            buf.emit(b)
            if killed_at is None and i >= down[0] * len(batches):
                server.stop(kill=True)  # SIGKILL while flushes are in flight
                killed_at = time.monotonic() - t0
            if back_at is None and i >= down[1] * len(batches):
                server.start()
                back_at = time.monotonic() - t0
            peak = max(peak, buf.stats()["buffered"])
        buf.close(timeout_s=60)
        emitted = sum(b.num_rows for b in batches)
        reader = RedisStreamReader(server.url, "chaos", "chaos", "c1")
        tables, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            ids, table = reader.read(count=256, block_ms=100)
            if not ids:
                break
            tables.append(table)
            reader.ack(ids)
        raw = pa.concat_tables(tables) if tables else None
        distinct = dedupe(raw).num_rows if raw is not None else 0
        stats = buf.stats()
        row = {
            "emitted": emitted,
            "raw": raw.num_rows if raw is not None else 0,
            "distinct": distinct,
            "lost": emitted - distinct,
            "duplicated": (raw.num_rows if raw is not None else 0) - distinct,
            "dropped_by_buffer": buf.dropped,
            "sink_errors": buf.sink_errors,
            "down_s": back_at - killed_at,
            "killed_at_s": killed_at,
            "peak_buffered": peak,
            "stats": stats,
        }
    finally:
        server.cleanup()
    print(f"redis: {row}", flush=True)
    return row


def redis_markdown(r: dict, wall: float) -> str:
    return "\n".join(
        [
            "## The Redis server killed mid-flush",
            "",
            f"`benchmarks/chaos.py --part redis` — {machine()}; {wall:.0f} s. The telemetry buffer "
            "(actors/telemetry) emits served-item events at a steady 20 000 /s into a Redis Streams sink flushing "
            f"every 5 ms; redis-server (appendonly, fsync always) is SIGKILLed at {r['killed_at_s']:.1f} s, while "
            f"flushes are in flight, and restarted {r['down_s']:.1f} s later. The buffer keeps what it could not "
            "write and retries with backoff; a batch whose pipelined XADDs were partly applied when the server died "
            "is written again whole, and the readers dedupe on event_id.",
            "",
            "| events emitted | stream rows read (raw) | distinct after dedupe | lost | duplicated (removed by "
            "dedupe) | dropped by the buffer | most events held while down | failed sink writes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['emitted']} | {r['raw']} | {r['distinct']} | **{r['lost']}** | {r['duplicated']} | "
            f"{r['dropped_by_buffer']} | {r['peak_buffered']} | {r['sink_errors']} |",
        ]
    )


def deploy_apps(port: int, args: dict) -> tuple[str, str]:
    """The inner-reward app and the recommend app (``WORLD`` plus ``args``) under fresh store names: (store
    prefix, the recommend app's URL)."""
    from ray import serve

    from serve_apps import inner_reward
    from serve_apps.recommend import app_builder

    prefix = f"chaos_{uuid.uuid4().hex[:6]}"
    serve.run(inner_reward.app_builder({"weights_store": f"{prefix}_ir"}), name="chaos_ir", route_prefix="/chaos_ir")
    recommend = {**WORLD, **args, "store_prefix": prefix, "inner_reward_app": "chaos_ir", "telemetry": {"sink": "off"}}
    serve.run(app_builder(recommend), name="chaos", route_prefix="/chaos")
    return prefix, f"http://127.0.0.1:{port}/chaos"


def delete_apps(prefix: str) -> None:
    """Delete the scenario's apps and its parameter stores (detached by design: they outlive an app, and a dozen
    idle store processes per scenario would crowd the next one's two cores)."""
    import ray
    from ray import serve

    serve.delete("chaos")
    serve.delete("chaos_ir")
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "morl" and actor["name"].startswith(prefix):
            ray.kill(ray.get_actor(actor["name"], namespace="morl"), no_restart=True)


def summarise(name: str, killed: str, records: list[dict], t_kill: float) -> dict:
    first_failed = [r for r in records if r["first"] != "ok"]
    after_retry = [r for r in first_failed if r["retried"] != "ok"]
    lat = np.array([r["latency_s"] for r in records if r["first"] == "ok"]) * 1e3
    outcomes: dict[str, int] = {}
    for r in first_failed:
        outcomes[r["first"]] = outcomes.get(r["first"], 0) + 1
    return {
        "scenario": name,
        "killed": killed,
        "requests": len(records),
        "failed_first": len(first_failed),
        "failed_before_kill": sum(r["t"] < t_kill for r in first_failed),
        "failed_after_retry": len(after_retry),
        "failed_first_pct": 100 * len(first_failed) / len(records),
        "failed_after_retry_pct": 100 * len(after_retry) / len(records),
        "disruption_s": (max(r["t"] for r in first_failed) - t_kill) if first_failed else 0.0,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "outcomes": outcomes,
        "t_kill": t_kill,
        "timeline": [[round(r["t"], 3), r["first"] == "ok", round(r["latency_s"] * 1e3, 1)] for r in records],
    }


def markdown(rows: list[dict], duration: float, kill_at: float, wall: float, ingress: str) -> str:
    ingress_env = " ".join(f"{k}={v!r}" for k, v in INGRESS_ENV[ingress].items()) or "Serve's defaults"
    lines = [
        "## A replica killed under steady load",
        "",
        f"`benchmarks/chaos.py` — {machine()}; one run, {wall:.0f} s. Open-loop POST /recommend at the table's rate "
        f"for {duration:g} s per scenario (3 000 items, 500 users) through the `{ingress}` ingress "
        f"(`serve_apps/launch.py`: {ingress_env}), one replica `ray.kill`ed at {kill_at:g} s; Serve's controller "
        "replaces it. *Failed* = a connection error, a time-out (10 s) or a 5xx. *Disruption* = "
        "kill → the last request that failed its first attempt: how long service was disturbed. *Replaced* = kill → "
        "the replacement replica's actor up (polled every 0.1 s; it then loads the world before it takes traffic). "
        "*In flight at the kill* = requests sent and not yet answered when `ray.kill` was called (the kill is "
        "called 2 ms after a request is sent). *Replayed by the ingress* = requests HAProxy resent to another "
        "replica because theirs closed the connection without an answer (`wretr` in HAProxy's stats): failures "
        "the client never saw. "
        "Goal: < 0.1 % failed, < 5 s recovery.",
        "",
        "| replica killed | req/s | requests | failed before the kill | in flight at the kill | "
        "failed, first attempt | failed after one client retry | replayed by the ingress | disruption s | "
        "replaced s | p50 ms | p99 ms | "
        "what failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        what = ", ".join(f"{k} × {v}" for k, v in r["outcomes"].items()) or "—"
        lines.append(
            f"| {r['scenario']} | {r['rate']:g} | {r['requests']} | {r['failed_before_kill']} | "
            f"{r.get('in_flight_at_kill', '—')} | "
            f"{r['failed_first']} ({r['failed_first_pct']:.2f} %) | "
            f"{r['failed_after_retry']} ({r['failed_after_retry_pct']:.2f} %) | "
            f"{'—' if r.get('replayed') is None else r['replayed']} | {r['disruption_s']:.2f} | "
            f"{r['recovery_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {what} |"
        )
    for r in rows:
        if "store" in r:
            st = r["store"]
            lines += [
                "",
                f"- {r['scenario']}: version {st['version_before']} before the kill, "
                f"{st['version_after_restart']} when the restarted store (a new process, from its snapshot under "
                f"`MORL_STORE_SNAPSHOTS`) first answered, {r['recovery_s']:.1f} s after the kill (the *replaced* "
                f"column); the replica served ranking version {st['served_during']} throughout; a write after the "
                f"restart answered {st['write_after_restart']} and the replica then served version {st['followed']}.",
            ]
    lines += ["", "![latency around the kill](chaos.png)"]
    return "\n".join(lines)


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.2 * len(rows)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        t, ok, ms = (np.array(c) for c in zip(*r["timeline"]))
        ax.scatter(t[ok], ms[ok], s=3, label="ok")
        ax.scatter(t[~ok], np.full((~ok).sum(), max(ms.max(), 1.0)), s=12, c="red", marker="x", label="failed")
        ax.axvline(r["t_kill"], color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("latency ms")
        ax.set_title(f"{r['scenario']}: killed at the dashed line", fontsize=9)
    axes[-1, 0].set_xlabel("s since the load started")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=None, help="req/s for every scenario (default: each its own)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--kill-at", type=float, default=10.0)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="the first scenario, 10 s, no files written")
    parser.add_argument("--part", choices=("serve", "store", "redis", "all"), default="all")
    parser.add_argument(
        "--ingress",
        choices=sorted(INGRESS_ENV),
        default="haproxy",
        help="HAProxy, as in serve_apps/configs/recommend.yaml (without its throughput mode): it replays a request "
        "whose replica died on another",
    )
    args = parser.parse_args()
    results = os.path.join(ROOT, "benchmarks", "results")
    if args.part in ("redis", "all"):
        started = time.time()
        section = redis_markdown(redis_kill(), time.time() - started)
        print(section)
        if not args.quick:
            write_marked_section(os.path.join(results, "chaos.md"), "redis_kill", section, "Chaos under load")
        if args.part == "redis":
            return
    if args.quick:
        args.scenarios, args.duration, args.kill_at = args.scenarios[:1], 10.0, 4.0

    from ray import serve

    from serve_apps.launch import start_local_ray

    os.environ[SNAPSHOT_DIR_ENV] = tempfile.mkdtemp(prefix="morl-stores-")  # every store restarts from its snapshot
    ports = {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    start_local_ray(num_cpus=4, ingress=args.ingress, env=ports)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    started, rows = time.time(), []
    overload = [n for n in args.scenarios if n in OVERLOAD]  # last: its backlog must not spill into another
    for name in [n for n in args.scenarios if n not in OVERLOAD] if args.part != "store" else ():
        recommend_args, deployment, rate = SCENARIOS[name]
        rows.append(
            run_scenario(name, recommend_args, deployment, port, args.rate or rate, args.duration, args.kill_at)
        )
    if not args.quick or args.part == "store":
        rows.append(run_store_kill(port, args.rate or 30, args.duration, args.kill_at))
    for name in overload if args.part != "store" else ():
        recommend_args, deployment, rate = SCENARIOS[name]
        rows.append(
            run_scenario(name, recommend_args, deployment, port, args.rate or rate, args.duration, args.kill_at)
        )
    wall = time.time() - started
    section = markdown(rows, args.duration, args.kill_at, wall, args.ingress)
    print(section)
    if args.quick:
        return
    with open(os.path.join(results, "chaos.json"), "w") as f:
        json.dump(rows, f)
    write_marked_section(os.path.join(results, "chaos.md"), "replica_kill", section, "Chaos under load")
    save_plot(os.path.join(results, "chaos.png"), plot, rows)


if __name__ == "__main__":
    main()
