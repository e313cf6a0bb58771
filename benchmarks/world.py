"""World benchmark: simulated responses per second, pipeline requests per second.

    python benchmarks/world.py                  # ~3 minutes on 2 cores

(a) World.respond (examination, click, dwell, purchase for B slates of 10) and World.step (the
    same plus session dynamics and return draws): user-item responses per second at several batch
    and catalogue sizes. Target: ≥ 1 000 000 per second.
(b) The in-process cascade (matching over the catalogue → pre-ranking → ranking): requests/s.
/recommend under load (fused and composed paths, ingresses, approximate matching) is benchmarks/recommend.py.
Writes benchmarks/results/world.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import Pipeline  # noqa: E402
from actors.stages import RequestBatch  # noqa: E402
from actors.world import PipelineConfig, World, WorldConfig, seed_sequence  # noqa: E402
from benchmarks.common import (  # noqa: E402
    machine,
    write_results,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "world.md")


def best_of(fn, repeat: int = 5) -> float:
    """Median wall time of fn() over `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def sim_part(catalogue_sizes: list[int], batch_sizes: list[int]) -> tuple[str, str]:
    rows, pipe_rows = [], []
    for n_items in catalogue_sizes:
        t = time.perf_counter()
        world = World(WorldConfig(n_items=n_items))
        build_s = time.perf_counter() - t
        pipeline = Pipeline(world, PipelineConfig(matching_index="exact"))
        rng = seed_sequence(0, "bench")
        for b in batch_sizes:
            users = rng.integers(0, world.users.n, b)
            slates = rng.integers(0, n_items, (b, 10))
            respond = best_of(functools.partial(world.respond, users, slates, rng))
            sessions = world.start_sessions(users)
            step = best_of(functools.partial(world.step, sessions, slates, rng))
            rows.append((n_items, b, build_s, b * 10 / respond, b * 10 / step))
            speed = f"respond {b * 10 / respond / 1e6:6.2f} M/s, step {b * 10 / step / 1e6:6.2f} M/s"
            print(f"  N={n_items:>9,} B={b:>6,}: {speed}", flush=True)
        for b in (1, 64, 512):
            req = RequestBatch(
                rng.integers(0, world.users.n, b), np.full((b, 20), -1, np.int64), np.zeros(b, np.int32), request_id=1
            )
            t_rec = best_of(functools.partial(pipeline.recommend, req), repeat=3)
            pipe_rows.append((n_items, b, t_rec * 1e3, b / t_rec))
            print(
                f"  N={n_items:>9,} cascade B={b:>4}: {t_rec * 1e3:8.2f} ms/batch, {b / t_rec:9.0f} requests/s",
                flush=True,
            )
    sim = [
        "| catalogue items | batch (slates of 10) | world build s | respond: responses/s "
        "| step (+ sessions): responses/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    sim += [f"| {n:,} | {b:,} | {bs:.1f} | {r:,.0f} | {s:,.0f} |" for n, b, bs, r, s in rows]
    cas = ["| catalogue items | requests per batch | ms per batch | requests/s |", "|---:|---:|---:|---:|"]
    cas += [f"| {n:,} | {b} | {ms:.2f} | {rps:,.0f} |" for n, b, ms, rps in pipe_rows]
    return "\n".join(sim), "\n".join(cas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogues", default="20000,1000000")
    parser.add_argument("--batches", default="100,1000,10000")
    args = parser.parse_args()
    sections = [
        f"# World benchmark\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. "
        "Command: `python benchmarks/world.py` (one run; medians of 5).\n"
    ]
    print("(a, b) world and cascade in process", flush=True)
    sim, cascade = sim_part([int(x) for x in args.catalogues.split(",")], [int(x) for x in args.batches.split(",")])
    print(sim + "\n\n" + cascade)
    sections.append(
        "## (a) Simulated user-item responses per second (one process, NumPy)\n\n"
        "`respond` samples examination, click, dwell, skip, purchase and revenue for B slates of 10; "
        "`step` adds the session update (satisfaction, temper, history, category counts) and return "
        "draws. Target: ≥ 1 000 000 responses/s.\n\n" + sim + "\n"
    )
    sections.append(
        "## (b) The cascade in process: matching over the whole catalogue (exact) → pre-ranking (500 → 50) → "
        "ranking (50 → 10)\n\nWith approximate matching and over HTTP: `benchmarks/recommend.py`.\n\n" + cascade + "\n"
    )
    write_results(RESULTS, sections, partial=False)


if __name__ == "__main__":
    main()
