"""The main job: the simulated world end to end on a local Ray, then the outer controller.

1. Sessions of the same users under four slate policies (random, popularity, relevance oracle,
   the default cascade), in process: NDCG@10, CTR, session length, revenue, return rate.
2. The same cascade through the three stage *actors*: identical sessions to the in-process run.
3. Serve: the inner-reward and recommend applications; sessions driven over HTTP
   (POST /recommend → the world responds → POST /feedback scored by the Rust inner reward),
   then a hot swap of the inner-reward weights the way the outer controller will do it.
4. Telemetry: /feedback's events (ring buffer → Parquet) become session trajectories with the
   Ray Data sessioniser, ready for the learners.
5. The outer controller (RLlib): the layered arm (inner reward + delayed-KPI controller) and the
   monolithic weighted-sum arm trained briefly on the simulator, compared on the same users; the
   inner-reward weights fitted to the layered arm's credit go through the parameter gate (each weight's
   sign and range) and, if they pass, are pushed to the live service.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

import httpx
import numpy as np
import ray
import ray.data
from ray import serve

from actors.cascade import Pipeline
from actors.simulate import POLICIES, compare_policies, pipeline_policy, run_sessions
from actors.stage_actors import ActorPipeline
from actors.telemetry import sessionise_dataset
from actors.world import World, WorldConfig, seed_sequence
from rllib_policies.outer_controller.experiment import ExperimentConfig, business_objective, run_arm
from rllib_policies.outer_controller.rails import GateRejected, push_inner_reward_weights
from serve_apps import inner_reward, recommend
from serve_apps.launch import start_local_ray


class _WithoutRayletNotices:
    """stdout without two raylet notices that ask nothing of the reader: "N PYTHON worker processes have
    been started" (Ray Data's sessioniser starts short-lived workers on a 2-core machine) and the Serve
    controller's retried graceful shutdown at exit. Ray prints them through ``sys.stdout`` with no
    logger or flag to turn them off."""

    NOTICES = ("worker processes have been started on node", "ServeController.graceful_shutdown failed")

    def __init__(self, stream):
        self.stream, self._dropped = stream, False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, any(n in text for n in self.NOTICES)
        if self._dropped or (dropped and text == "\n"):  # print() writes the line, then its newline
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_frameworks() -> None:
    """The job prints its own tables: Ray's, Serve's, Ray Data's and RLlib's info logs and API notices,
    gymnasium's re-registration warnings and two raylet notices are kept out."""
    for name in ("ray", "ray.serve", "ray.data", "ray.rllib", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*already in registry.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.stdout = _WithoutRayletNotices(sys.stdout)


def print_table(title: str, header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def policy_table(world: World, pipeline: Pipeline, n_sessions: int, seed: int) -> None:
    rows = [
        (
            s.policy,
            f"{s.ndcg_at_10:.3f}",
            f"{100 * s.ctr:.2f}%",
            f"{s.requests_per_session:.2f}",
            f"{s.items_per_session:.1f}",
            f"{s.dwell_s_per_session:.1f}",
            f"{s.revenue_per_session:.2f}",
            f"{100 * s.return_rate:.1f}%",
            f"{s.satisfaction_end:.3f}",
        )
        for s in compare_policies(world, pipeline, n_sessions, seed, POLICIES)
    ]
    print_table(
        f"{n_sessions} sessions per policy, same users (world preset 'default', {world.catalogue.n:,} items, "
        f"{world.users.n:,} users)",
        (
            "policy",
            "NDCG@10",
            "CTR",
            "requests/session",
            "items/session",
            "dwell s",
            "revenue",
            "next-day return",
            "satisfaction",
        ),
        rows,
    )


def http_sessions(world: World, url: str, n_sessions: int, seed: int) -> dict:
    """Drive whole sessions through /recommend and /feedback; the world supplies the responses.
    Each round asks for one slate per active session, steps the world once, posts the feedback."""
    rng = seed_sequence(seed, "http-sessions")
    users = rng.choice(world.users.n, n_sessions, replace=False)  # one session per user: time gaps never merge them
    sessions = world.start_sessions(users)
    totals, versions, latencies = [], set(), []
    with httpx.Client(base_url=url, timeout=30) as http:
        while sessions.active.any():
            active = np.flatnonzero(sessions.active)
            recs, slate = {}, None
            for b in active:
                t = time.perf_counter()
                recs[b] = (
                    http.post(
                        "/recommend",
                        json={
                            "user_id": int(users[b]),
                            "history": [int(i) for i in sessions.history[b] if i >= 0],
                            "step": int(sessions.requests[b]),
                        },
                    )
                    .raise_for_status()
                    .json()
                )
                latencies.append(time.perf_counter() - t)
                if slate is None:
                    slate = np.zeros((sessions.size, len(recs[b]["slate"])), np.int64)
                slate[b] = recs[b]["slate"]
            resp = world.step(sessions, slate, rng)
            for b in active:
                fb = (
                    http.post(
                        "/feedback",
                        json={
                            "request_id": recs[b]["request_id"],
                            "clicked": resp.clicked[b].tolist(),
                            "dwell_s": resp.dwell_s[b].tolist(),
                            "skipped": resp.skipped[b].tolist(),
                            "purchased": resp.purchased[b].tolist(),
                            "revenue": resp.revenue[b].tolist(),
                        },
                    )
                    .raise_for_status()
                    .json()
                )
                totals.append(fb["total"])
                versions.add(fb["weights_version"])
    return {
        "requests": len(totals),
        "mean_slate_reward": float(np.mean(totals)),
        "weights_versions": sorted(versions),
        "ctr": float(sessions.clicks.sum() / sessions.items.sum()),
        "p50_ms": 1e3 * float(np.median(latencies)),
        "items_per_session": float(sessions.items.mean()),
    }


def trajectories_table(url: str, events_root: str, requests: int) -> None:
    """Wait for the event buffer to drain, then sessionise the Parquet sink with Ray Data."""
    ray.data.DataContext.get_current().enable_progress_bars = False

    with httpx.Client(base_url=url, timeout=30) as http:
        deadline = time.time() + 30
        while time.time() < deadline:
            stats = http.get("/telemetry").json()
            if stats["flushed"] >= stats["emitted"]:
                break
            time.sleep(0.05)
    out = os.path.join(events_root, "..", os.path.basename(events_root) + "-trajectories")
    ds = sessionise_dataset(events_root, out, num_partitions=2)  # a few hundred events: two partitions
    rows = ds.take_all()
    print_table(
        f"Telemetry → trajectories (events {stats['emitted']:,}, dropped {stats['dropped']}, "
        f"Ray Data sessioniser → {os.path.normpath(out)})",
        ("sessions", "windows", "steps", "HTTP requests", "mean steps", "mean step reward", "revenue"),
        [
            (
                len({r["session_id"] for r in rows}),
                len(rows),
                sum(r["n_steps"] for r in rows),
                requests,
                f"{np.mean([r['n_steps'] for r in rows]):.1f}",
                f"{np.mean([x for r in rows for x in r['rewards']]):.3f}",
                f"{sum(r['session_revenue'] for r in rows):.2f}",
            )
        ],
    )


def outer_controller_table(url: str, iterations: int, seed: int) -> None:
    exp = ExperimentConfig(
        iterations=iterations,
        eval_every=iterations,
        eval_sessions=300,
        final_eval_sessions=1000,
        trust_region_kl=0.5,  # the training rail: KL(π_old ‖ π_new) ≤ 0.5 per iteration
        promote=True,  # do no harm: the trained policy replaces its start only if it is significantly better
    )
    print(
        f"\nouter controller: {iterations} iterations × {exp.sessions_per_iteration} sessions per arm "
        f"(python benchmarks/layered_vs_monolithic.py runs the full 5-seed comparison)",
        flush=True,
    )
    pushed, rejected = {}, {}

    def push(algo):
        weights = algo.inner_reward_weights(algo.last_batch)
        try:
            pushed.update(push_inner_reward_weights(f"{url}/inner_reward", weights))
        except GateRejected as e:
            rejected.update(weights=weights, why=str(e))

    def silent(*_args, **_kwargs) -> None:  # the table below reports each arm once, on the final evaluation
        pass

    runs = [
        run_arm("layered", seed, exp, progress=silent, on_trained=push),
        run_arm("monolithic", seed, exp, progress=silent),
    ]
    print_table(
        "Layered vs monolithic (same network, algorithm and budget; the promoted policy on 1 000 eval sessions)",
        (
            "arm",
            "NDCG@10 before → after",
            "revenue/session before → after",
            "next-day return",
            "objective J",
            "promoted",
            "train s",
        ),
        [
            (
                r.arm,
                f"{r.start_final['ndcg_at_10']:.3f} → {r.final['ndcg_at_10']:.3f}",
                f"{r.start_final['revenue_per_session']:.3f} → {r.final['revenue_per_session']:.3f}",
                f"{r.final['return_rate']:.1%}",
                f"{business_objective(r.start_final, exp.kpi_weights):.3f} → "
                f"{business_objective(r.final, exp.kpi_weights):.3f}",
                r.promoted,
                f"{r.train_seconds[-1]:.1f}",
            )
            for r in runs
        ],
    )
    if rejected:
        live = httpx.get(f"{url}/inner_reward/weights", timeout=30).json()["version"]
        print(
            f"\ninner-reward weights fitted to the layered arm's credit → rejected by the parameter gate "
            f"({rejected['why']}): the live weights v{live} stay"
        )
    else:
        print(
            f"\ninner-reward weights fitted to the layered arm's credit → passed the parameter gate → "
            f"PUT /inner_reward/weights: v{pushed['version']} "
            + ", ".join(
                f"{k} {v:+.3f}"
                for k, v in pushed["weights"].items()
                if k in ("click_w", "dwell_w", "skip_penalty", "rel_w")
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--http-sessions", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ingress", default="default", help="default | haproxy | direct | throughput")
    parser.add_argument("--train-iterations", type=int, default=10, help="outer-controller iterations per arm")
    args = parser.parse_args(argv)

    quiet_frameworks()
    t0 = time.perf_counter()
    world = World(WorldConfig())
    pipeline = Pipeline(world)
    print(
        f"world built in {time.perf_counter() - t0:.1f}s: click bias {world.click_bias:.2f}, "
        f"purchase bias {world.purchase_bias:.2f} (calibrated to CTR {world.config.target_ctr:.1%}, "
        f"CVR {world.config.purchase_given_click:.1%})"
    )
    policy_table(world, pipeline, args.sessions, args.seed)

    print(f"\nstarting local Ray (ingress={args.ingress}) ...", flush=True)
    start_local_ray(num_cpus=max(4, os.cpu_count() or 1), ingress=args.ingress)  # logical CPUs: Serve + a Data job
    try:
        actors = ActorPipeline(world.config, pipeline.config)
        n = min(100, args.sessions)
        local = run_sessions(world, pipeline, pipeline_policy(), n, args.seed, "pipeline_default")
        remote = run_sessions(world, actors, pipeline_policy(), n, args.seed, "pipeline_default")
        print(
            f"stage actors vs in process, {n} sessions: identical = {local == remote} "
            f"(NDCG@10 {remote.ndcg_at_10:.3f}, CTR {remote.ctr:.2%}, {remote.items_per_session:.1f} items/session)"
        )
        actors.shutdown()

        serve.start(http_options={"host": "127.0.0.1", "port": 8000}, logging_config={"enable_access_log": False})
        serve.run(inner_reward.app_builder({}), name="inner_reward", route_prefix="/inner_reward")
        events_root = tempfile.mkdtemp(prefix="morl-demo-events-")
        serve.run(
            recommend.app_builder({"telemetry": {"sink": "parquet", "path": events_root}}),
            name="recommend",
            route_prefix="/",
        )
        url = "http://127.0.0.1:8000"
        before = http_sessions(world, url, args.http_sessions, args.seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            w = http.get("/inner_reward/weights").json()
            put = (
                http.put(
                    "/inner_reward/weights",
                    json={**w["weights"], "click_w": 2.0, "skip_penalty": -0.6, "expected_version": w["version"]},
                )
                .raise_for_status()
                .json()
            )
            bad = http.post("/recommend", json={"user_id": world.users.n + 5})
        after = http_sessions(world, url, args.http_sessions, args.seed + 1)
        print_table(
            f"Sessions over HTTP (/recommend → world → /feedback), {args.http_sessions} per row",
            ("inner-reward weights", "requests", "CTR", "items/session", "mean slate reward", "/recommend p50 ms"),
            [
                (
                    f"v{v['weights_versions']}",
                    v["requests"],
                    f"{v['ctr']:.2%}",
                    f"{v['items_per_session']:.1f}",
                    f"{v['mean_slate_reward']:.3f}",
                    f"{v['p50_ms']:.1f}",
                )
                for v in (before, after)
            ],
        )
        print(
            f"\nweights v{w['version']} -> v{put['version']} (click_w 2.0, skip_penalty -0.6), acked by "
            f"{put['readers_acked']}/{put['readers_live']} replicas; bad user id -> HTTP {bad.status_code}: "
            f"{bad.json()['detail'][0]['msg']}"
        )
        trajectories_table(url, events_root, before["requests"] + after["requests"])
        outer_controller_table(url, args.train_iterations, args.seed)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
