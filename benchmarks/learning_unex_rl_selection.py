"""Which UNEX-RL policy to deploy after a long run: the latest, or one chosen by the sessions it served?

Trains UNEX-RL from the starved matching stage (small world, default preset, 5 seeds, two runs at a time),
keeps a copy of the stage policies at every iteration and measures on the learning test's 1 000 evaluation
users (deterministic policies, common random numbers): the latest policies, those at iteration 30, and the
policies chosen by their exploration sessions' usage — the best single iteration, or the centre of the best
window of w = 3 or 5 consecutive iterations (``UnexRLConfig.unex_rl(incumbent_window=w)``). Gap closed against
the joint oracle of learning_unex_rl.md (61.8 s per session).

    python benchmarks/learning_unex_rl_selection.py --tag defaults --iterations 60
    python benchmarks/learning_unex_rl_selection.py --tag twin_q --iterations 60 --options '{"twin_q": true}'
    python benchmarks/learning_unex_rl_selection.py --page-only    # the page from the saved runs

Each invocation adds its runs under ``--tag`` to learning_unex_rl_selection.json; the page has one row per tag.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.world.metrics import gap_closed, mean_ci  # noqa: E402 (after sys.path: run as a script)
from benchmarks.common import init_ray_worker, machine  # noqa: E402
from benchmarks.learning_unex_rl import EVAL_SEED, WORLDS  # noqa: E402
from rllib_policies.unex_rl.learning import build_learner, usage_per_session  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
ORACLE_S = 61.8  # the joint static oracle of the default preset, small world (learning_unex_rl.md)
CHOICES = {
    "final": "latest",
    "at30": "at iteration 30",
    "best1": "best single iteration",
    "bestw3": "best window of 3",
    "bestw5": "best window of 5 (`incumbent_window=5`)",
}


def run(job: tuple) -> dict:
    """One seed: train, snapshot every iteration, evaluate the candidates (module docstring)."""
    seed, iterations, options = job
    env = {"preset": "default", **WORLDS["small"]}
    algo = build_learner(env, "unex_rl", seed, **options)
    try:
        evaluate = lambda policies: usage_per_session(algo.pipeline, policies, 1000, EVAL_SEED)  # noqa: E731
        start, t0 = evaluate(algo.stage_policies), time.perf_counter()
        snapshots, served = [], []  # snapshots[i] served iteration i's sessions
        for _ in range(iterations):
            snapshots.append(copy.deepcopy(algo.stage_policies))
            served.append(algo.train()["unex_rl"]["usage_s_per_session"])
        snapshots.append(copy.deepcopy(algo.stage_policies))
        wall = time.perf_counter() - t0
        chosen = {"final": iterations, "at30": min(30, iterations), "best1": int(np.argmax(served))}
        for w in (3, 5):  # the centre of the first best window, as incumbent_window picks it
            means = np.convolve(served, np.ones(w) / w, mode="valid")
            chosen[f"bestw{w}"] = int(np.argmax(means)) + w // 2
        values = {k: evaluate(snapshots[i]) for k, i in chosen.items()}
    finally:
        algo.stop()
    return {"seed": seed, "start": start, "served": served, "chosen": chosen, "values": values, "wall_s": wall}


def page(results: dict) -> str:
    lines = [
        "# UNEX-RL: which policy to deploy after a long run",
        "",
        f"`benchmarks/learning_unex_rl_selection.py` on {machine()}; small world, default preset, starved matching "
        "start, 64 sessions per iteration, 5 seeds per row. Candidates measured on the learning test's 1 000 "
        f"evaluation users; gap closed against the joint oracle ({ORACLE_S} s). Mean over seeds ± 95 % t-interval, "
        "per seed in brackets. The served usage ranks policies by their *explored* sessions (64 a round).",
        "",
        "| run (options, iterations) | " + " | ".join(CHOICES.values()) + " | wall s per run |",
        "|---|" + "---:|" * (len(CHOICES) + 1),
    ]
    for tag, rec in results.items():
        runs = rec["runs"]
        cells = []
        for k in CHOICES:
            g = [100 * gap_closed(r["start"], r["values"][k], ORACLE_S) for r in runs]
            m, h = mean_ci(np.asarray(g))
            cells.append(f"{m:.0f} % ± {h:.0f} ({', '.join(f'{x:.0f}' for x in g)})")
        wall = np.median([r["wall_s"] for r in runs])
        lines.append(
            f"| {tag}: `{json.dumps(rec['options'])}`, {rec['iterations']} | " + " | ".join(cells) + f" | {wall:.0f} |"
        )
    lines += ["", *(f"- {tag}: {rec['note']}" for tag, rec in results.items() if rec.get("note"))]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="defaults")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--options", type=json.loads, default={}, help="learner options as JSON")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--page-only", action="store_true")
    args = p.parse_args()
    if args.iterations < 30:
        p.error("--iterations must be >= 30 (the candidates include the policies at iteration 30)")
    path = os.path.join(args.results_dir, "learning_unex_rl_selection.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if not args.page_only:
        jobs = [(s, args.iterations, args.options) for s in range(args.seeds)]
        runs = []
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=init_ray_worker) as pool:
            for r in pool.map(run, jobs):
                runs.append(r)
                print(f"seed {r['seed']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["values"].items()), flush=True)
        results[args.tag] = {"options": args.options, "iterations": args.iterations, "runs": runs}
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    text = page(results)
    print(text)
    with open(os.path.join(args.results_dir, "learning_unex_rl_selection.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
