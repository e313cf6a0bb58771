"""UNEX-RL's learning test: the fraction of the gap to the oracle's best static stage parameters that
training closes from a starved matching stage (rllib_policies/unex_rl/learning.py), 5 seeds per arm.

    python benchmarks/learning_unex_rl.py                                   # unex_rl + single_agent, 5 seeds
    python benchmarks/learning_unex_rl.py --seeds 1 --iterations 2 --eval-sessions 50 --oracle-sessions 30 \
        --results-dir /tmp/learning_unex_rl                                 # a smoke run

Start: matching at ``STARVED_MATCHING`` (relevance weight near 0, high exploration); pre-ranking and ranking at
their defaults. Objective: usage seconds per session. Oracle static: the best matching parameters of
``matching_family()`` by ``actors.world.oracle.usage_static`` (usage per session, common random numbers).
Start, final and oracle static are measured by one evaluator on the same users and random numbers. The world is
fixed; the seeds vary the learners (network init, exploration, sampled users). Writes learning_unex_rl.md and
learning_unex_rl.png to ``--results-dir`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import matplotlib
import numpy as np
import ray
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the Agg backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import build_world  # noqa: E402 (after sys.path: run as a script)
from actors.world.metrics import gap_closed, mean_ci  # noqa: E402
from benchmarks.common import machine, plot_mean_se, write_results  # noqa: E402
from rllib_policies.unex_rl.learning import (  # noqa: E402
    STARVED_MATCHING,
    learning_run,
    matching_family,
    oracle_static,
    static_policies,
    usage_per_session,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
WORLDS = {
    "small": {"world": {"n_items": 1500, "n_users": 400}, "pipeline": {"k_matching": 150, "k_pre_ranking": 30}},
    "benchmark": {"world": {"n_items": 5000, "n_users": 3000}, "pipeline": {"k_matching": 300, "k_pre_ranking": 50}},
}
EVAL_SEED = 10_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", nargs="+", default=["unex_rl", "single_agent"])
    p.add_argument("--world", default="small", choices=list(WORLDS))
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--curve-every", type=int, default=5)
    p.add_argument("--eval-sessions", type=int, default=1000)
    p.add_argument("--curve-sessions", type=int, default=200)
    p.add_argument("--oracle-sessions", type=int, default=300)
    p.add_argument("--results-dir", default=RESULTS, help="where learning_unex_rl.md and .png go")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny networks: threads only contend on shared cores
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-bench-"))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    env = {"preset": "default", **WORLDS[args.world]}
    pipeline = build_world(env)[1]
    t0 = time.time()
    family = matching_family()
    best, _ = oracle_static(pipeline, family, args.oracle_sessions)
    oracle_s = time.time() - t0
    target = usage_per_session(pipeline, static_policies(best), args.eval_sessions, EVAL_SEED)
    starved = usage_per_session(
        pipeline, static_policies({"matching": STARVED_MATCHING}), args.eval_sessions, EVAL_SEED
    )
    print(f"oracle static matching {best['matching'].tolist()}: {target:.1f} s (starved {starved:.1f} s)", flush=True)
    runs = []
    for seed in range(args.seeds):
        for arm in args.arms:
            r = learning_run(
                env,
                arm,
                seed,
                args.iterations,
                eval_sessions=args.eval_sessions,
                eval_seed=EVAL_SEED,
                curve_every=args.curve_every,
                curve_sessions=args.curve_sessions,
            )
            r["gap_closed"] = gap_closed(r["start"], r["final"], target)
            runs.append(r)
            print(
                f"  {arm:<13} seed {seed}: {r['start']:.1f} → {r['final']:.1f} s (oracle {target:.1f}), gap closed "
                f"{100 * r['gap_closed']:.0f} %, {r['wall_s']:.0f} s; matching {r['mean_params']['matching']}",
                flush=True,
            )
    rows = [
        "| learner | preset | objective | start | oracle static | final | gap closed (95 % CI) | sessions | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in args.arms:
        rs = [r for r in runs if r["arm"] == arm]
        s, f, g = (mean_ci([r[k] for r in rs]) for k in ("start", "final", "gap_closed"))
        rows.append(
            f"| {arm} | {env['preset']} ({args.world}) | usage s / session | {s[0]:.1f} ± {s[1]:.1f} | {target:.1f} | "
            f"{f[0]:.1f} ± {f[1]:.1f} | {100 * g[0]:.0f} % ± {100 * g[1]:.0f} % | {rs[0]['sessions']} | "
            f"{np.mean([r['wall_s'] for r in rs]):.0f} |"
        )
    table = "\n".join(rows)
    print(table)
    os.makedirs(args.results_dir, exist_ok=True)
    plot(runs, target, starved, os.path.join(args.results_dir, "learning_unex_rl.png"))
    with open(os.path.join(args.results_dir, "learning_unex_rl_runs.json"), "w") as f:
        json.dump(
            {"target": target, "starved": starved, "oracle": best["matching"].tolist(), "runs": runs}, f, default=float
        )
    params = "\n".join(
        f"| {r['arm']} | {r['seed']} | {100 * r['gap_closed']:.0f} % | {r['mean_params']['matching']} | "
        f"{r['mean_params']['pre_ranking']} | {r['mean_params']['ranking']} |"
        for r in runs
    )
    write_results(
        os.path.join(args.results_dir, "learning_unex_rl.md"),
        [
            "# Learning test: UNEX-RL from a starved matching stage",
            "",
            f"Machine: {machine()} (shared with other jobs). One run of `python benchmarks/learning_unex_rl.py "
            f"--world {args.world} --iterations {args.iterations}` ({len(runs)} training runs, "
            f"{time.time() - t0:.0f} s in all, the oracle {oracle_s:.0f} s).",
            "",
            f"World: preset `default`, {WORLDS[args.world]} (fixed; the seeds vary the learners). Start: matching "
            f"(w_relevance, w_popularity, w_history, exploration) = {STARVED_MATCHING} (starved: relevance near 0, "
            "8× the default exploration), pre-ranking and ranking at their defaults. Objective: usage seconds per "
            f"session (UNEX-RL's reward). Oracle static: the best of {family.size} matching settings "
            f"(`matching_family()`) by `actors.world.oracle.usage_static` on {args.oracle_sessions} sessions "
            f"(common random numbers across settings): {best['matching'].tolist()}. Start, final and oracle "
            f"static: deterministic policies on the same {args.eval_sessions} simulated users with the same "
            "random numbers "
            f"(the starved setting itself: {starved:.1f} s). Budget: {args.iterations} iterations × 64 sessions. "
            "Gap closed = (final − start) / (oracle static − start) per seed; ± is the 95 % t-interval over "
            f"{args.seeds} seeds. `single_agent` learns only the ranking stage: it cannot repair matching.",
            "",
            table,
            "",
            "Per run, the policies' mean actions after training:",
            "",
            "| learner | seed | gap closed | matching | pre-ranking | ranking |",
            "|---|---:|---:|---|---|---|",
            params,
            "",
            "![learning curves](learning_unex_rl.png)",
            "",
        ],
        partial=False,
    )


def plot(runs: list[dict], target: float, starved: float, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    plot_mean_se(
        ax,
        {
            a: ([c[2] for c in rs[0]["curve"]], [[c[1] for c in r["curve"]] for r in rs])
            for a in arms
            for rs in [[r for r in runs if r["arm"] == a]]
        },
        highlight=("unex_rl",),
    )
    ax.axhline(target, color="k", ls="--", lw=1, label="oracle static")
    ax.axhline(starved, color="grey", ls=":", lw=1, label="starved start (static)")
    ax.set_xlabel("sessions trained")
    ax.set_ylabel("usage s / session (deterministic policies)")
    ax.legend(fontsize=8)
    ax.set_title("UNEX-RL from a starved matching stage (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
