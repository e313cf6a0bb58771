"""UNEX-RL's learning test: the fraction of the gap to the oracle's best static stage parameters that
training closes from a starved matching stage (rllib_policies/unex_rl/learning.py), 5 seeds per arm.

    python benchmarks/learning_unex_rl.py --jobs 2                          # unex_rl + single_agent, 5 seeds
    python benchmarks/learning_unex_rl.py --preset heterogeneous --seeds 3 --jobs 2   # extra rows: a preset
    python benchmarks/learning_unex_rl.py --seeds 1 --iterations 2 --eval-sessions 50 --oracle-sessions 30 \
        --oracle-final-sessions 50 --oracle-rounds 1 --results-dir /tmp/learning_unex_rl   # a smoke run

Start: matching at ``STARVED_MATCHING`` (relevance weight near 0, high exploration); pre-ranking and ranking at
their defaults. Objective: usage seconds per session. Oracle static: the best joint static parameters of the
three stages (``joint_oracle_static``: coordinate ascent over a matching, a pre-ranking and a ranking grid by
``actors.world.oracle.usage_static``, common random numbers; the best few re-measured on fresh sessions) — the
learner's own decision family, held constant. Start, final and oracle static are measured by one evaluator on
the same users and random numbers. The world is fixed; the seeds vary the learners (network init, exploration,
sampled users). Each preset's runs go to learning_unex_rl_runs[_<preset>].json in ``--results-dir`` (default
benchmarks/results); learning_unex_rl.md gets one row per learner × preset found there, learning_unex_rl.png
the default preset's curves.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the Agg backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import build_world  # noqa: E402 (after sys.path: run as a script)
from actors.world.config import PRESETS  # noqa: E402
from actors.world.metrics import gap_closed, mean_ci  # noqa: E402
from benchmarks.common import init_ray_worker, machine, plot_mean_se, write_results  # noqa: E402
from rllib_policies.unex_rl import UnexRLConfig  # noqa: E402
from rllib_policies.unex_rl.learning import (  # noqa: E402
    STARVED_MATCHING,
    joint_oracle_static,
    learning_run,
    static_policies,
    usage_per_session,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
WORLDS = {
    "small": {"world": {"n_items": 1500, "n_users": 400}, "pipeline": {"k_matching": 150, "k_pre_ranking": 30}},
    "benchmark": {"world": {"n_items": 5000, "n_users": 3000}, "pipeline": {"k_matching": 300, "k_pre_ranking": 50}},
}
EVAL_SEED = 10_000
LEARNER_OPTIONS = (
    "gamma",
    "twin_q",
    "critic_scale_free",
    "max_action_step",
    "actor_lr",
    "explore_std",
    "explore_correlation",
    "explore_schedule",
    "actor_warmup_iterations",
    "tau",
    "updates_per_iteration",
    "search_candidates",
    "search_weight",
    "search_std",
    "search_rounds",
    "cqr_relabel",
    "action_margin",
    "saturation_penalty",
    "policy_delay",
    "sessions_per_iteration",
    "incumbent_window",
    "cqr",
)


def _run(job: tuple) -> dict:
    env, arm, seed, iterations, kwargs = job
    return learning_run(env, arm, seed, iterations, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-list", type=int, nargs="+", default=None, help="these seeds instead of 0 … seeds − 1")
    p.add_argument("--arms", nargs="+", default=["unex_rl", "single_agent"])
    p.add_argument("--world", default="small", choices=list(WORLDS))
    p.add_argument("--preset", default="default", choices=list(PRESETS))
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--curve-every", type=int, default=5)
    p.add_argument("--eval-sessions", type=int, default=1000)
    p.add_argument("--curve-sessions", type=int, default=200)
    p.add_argument("--oracle-sessions", type=int, default=300, help="sessions per candidate in the search")
    p.add_argument("--oracle-rounds", type=int, default=2, help="coordinate-ascent sweeps over the stages")
    p.add_argument("--oracle-top", type=int, default=5, help="best settings re-measured on fresh sessions")
    p.add_argument("--oracle-final-sessions", type=int, default=1000, help="sessions of that re-measurement")
    p.add_argument(
        "--oracle-cache", default=None, help="a JSON file: the oracle's search, reused if its settings match"
    )
    p.add_argument(
        "--options", type=json.loads, default={}, help="learner options as JSON, e.g. '{\"search_candidates\": 0}'"
    )
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one process each)")
    p.add_argument("--results-dir", default=RESULTS, help="where learning_unex_rl.md and .png go")
    p.add_argument(
        "--page-only", action="store_true", help="only rewrite learning_unex_rl.md and .png from the runs files"
    )
    args = p.parse_args()
    if args.page_only:
        write_page(args.results_dir)
        return
    init_ray_worker()
    env = {"preset": args.preset, **WORLDS[args.world]}
    pipeline = build_world(env)[1]
    t0 = time.time()
    search_args = {
        "preset": args.preset,
        "world": args.world,
        "n_sessions": args.oracle_sessions,
        "rounds": args.oracle_rounds,
        "top": args.oracle_top,
        "final_sessions": args.oracle_final_sessions,
    }
    cached = json.load(open(args.oracle_cache)) if args.oracle_cache and os.path.exists(args.oracle_cache) else None
    if cached is not None and cached["args"] == search_args:
        best = {s: np.asarray(v, np.float32) for s, v in cached["best"].items()}
        search, oracle_s = {"evaluated": cached["evaluated"]}, cached["oracle_s"]
        print(f"oracle static from {args.oracle_cache} (searched in {oracle_s:.0f} s)", flush=True)
    else:
        best, search = joint_oracle_static(
            pipeline, **{k: v for k, v in search_args.items() if k not in ("preset", "world")}
        )
        oracle_s = time.time() - t0
        if args.oracle_cache:
            with open(args.oracle_cache, "w") as f:
                json.dump(
                    {
                        "args": search_args,
                        "best": {s: v.tolist() for s, v in best.items()},
                        "evaluated": search["evaluated"],
                        "oracle_s": oracle_s,
                    },
                    f,
                )
    target = usage_per_session(pipeline, static_policies(best), args.eval_sessions, EVAL_SEED)
    starved = usage_per_session(
        pipeline, static_policies({"matching": STARVED_MATCHING}), args.eval_sessions, EVAL_SEED
    )
    oracle = {s: v.tolist() for s, v in best.items()}
    print(
        f"oracle static {oracle} ({search['evaluated']} settings, {oracle_s:.0f} s): {target:.1f} s "
        f"(starved {starved:.1f} s)",
        flush=True,
    )
    kwargs = {
        "eval_sessions": args.eval_sessions,
        "eval_seed": EVAL_SEED,
        "curve_every": args.curve_every,
        "curve_sessions": args.curve_sessions,
        **args.options,
    }
    seeds = args.seed_list or list(range(args.seeds))
    jobs = [(env, arm, seed, args.iterations, kwargs) for arm in args.arms for seed in seeds]
    runs = []
    with ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_ray_worker
    ) as pool:
        for r in pool.map(_run, jobs) if args.jobs > 1 else map(_run, jobs):
            r["gap_closed"] = gap_closed(r["start"], r["final"], target)
            runs.append(r)
            print("run", json.dumps(r, default=float), flush=True)
    for r in runs:
        print(
            f"  {r['arm']:<13} seed {r['seed']}: {r['start']:.1f} → {r['final']:.1f} s (oracle {target:.1f}), gap "
            f"closed {100 * r['gap_closed']:.0f} %, {r['wall_s']:.0f} s; matching {r['mean_params']['matching']}",
            flush=True,
        )
    os.makedirs(args.results_dir, exist_ok=True)
    suffix = "" if args.preset == "default" else f"_{args.preset}"
    record = {
        "preset": args.preset,
        "world": args.world,
        "iterations": args.iterations,
        "seeds": len(seeds),
        "seed_list": seeds,
        "arms": args.arms,
        "eval_sessions": args.eval_sessions,
        "oracle_sessions": args.oracle_sessions,
        "oracle_rounds": args.oracle_rounds,
        "oracle_top": args.oracle_top,
        "oracle_final_sessions": args.oracle_final_sessions,
        "oracle_evaluated": search["evaluated"],
        "oracle_s": oracle_s,
        "total_s": time.time() - t0 + (oracle_s if cached is not None else 0.0),
        "jobs": args.jobs,
        "learner": {k: args.options.get(k, getattr(UnexRLConfig(), k)) for k in LEARNER_OPTIONS},
        "options": args.options,
        "target": target,
        "starved": starved,
        "oracle": oracle,
        "runs": runs,
    }
    with open(os.path.join(args.results_dir, f"learning_unex_rl_runs{suffix}.json"), "w") as f:
        json.dump(record, f, default=float)
    write_page(args.results_dir)


def _table_row(rec: dict, arm: str) -> str:
    rs = [r for r in rec["runs"] if r["arm"] == arm]
    s, f, g = (mean_ci([r[k] for r in rs]) for k in ("start", "final", "gap_closed"))
    return (
        f"| {arm} | {rec['preset']} ({rec['world']}) | usage s / session | {s[0]:.1f} ± {s[1]:.1f} | "
        f"{rec['target']:.1f} | {f[0]:.1f} ± {f[1]:.1f} | {100 * g[0]:.0f} % ± {100 * g[1]:.0f} % | "
        f"{rs[0]['sessions']} | {np.mean([r['wall_s'] for r in rs]):.0f} |"
    )


def _seeds_arg(rec: dict) -> str:
    seeds = rec.get("seed_list", list(range(rec["seeds"])))
    arms = rec.get("arms", ["unex_rl", "single_agent"])
    return (
        (
            f"--seeds {rec['seeds']}"
            if seeds == list(range(rec["seeds"]))
            else f"--seed-list {' '.join(map(str, seeds))}"
        )
        + ("" if arms == ["unex_rl", "single_agent"] else f" --arms {' '.join(arms)}")
        + (f" --options '{json.dumps(rec['options'])}'" if rec.get("options") else "")
    )


def write_page(results_dir: str) -> None:
    """learning_unex_rl.md from every preset's runs file in ``results_dir`` (the default preset first), and
    learning_unex_rl.png from the default preset's."""
    paths = sorted(glob.glob(os.path.join(results_dir, "learning_unex_rl_runs*.json")), key=lambda x: (len(x), x))
    recs = [json.load(open(x)) for x in paths]
    if paths and os.path.basename(paths[0]) == "learning_unex_rl_runs.json":
        default = recs[0]
        plot(default["runs"], default["target"], default["starved"], os.path.join(results_dir, "learning_unex_rl.png"))
    history_paths = glob.glob(os.path.join(results_dir, "learning_unex_rl_history*.json"))
    history = [json.load(open(x)) for x in sorted(history_paths, key=lambda x: (len(x), x))]  # _2 before _10
    rows = [
        "| learner | preset | objective | start | oracle static | final | gap closed (95 % CI) | sessions | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *(_table_row(rec, arm) for rec in recs for arm in dict.fromkeys(r["arm"] for r in rec["runs"])),
    ]
    print("\n".join(rows))
    runs_by = [
        f"One run per preset of `python benchmarks/learning_unex_rl.py --preset {rec['preset']} --world {rec['world']} "
        f"{_seeds_arg(rec)} --iterations {rec['iterations']} --jobs {rec['jobs']}`: "
        f"{len(rec['runs'])} training runs, {rec['total_s']:.0f} s wall in all (the oracle {rec['oracle_s']:.0f} s). "
        f"Oracle static ({rec['oracle_evaluated']} joint settings searched on {rec['oracle_sessions']} sessions, "
        f"{rec['oracle_rounds']} sweep(s) at most; the best {rec['oracle_top']} re-measured on "
        f"{rec['oracle_final_sessions']} fresh sessions): {rec['oracle']}; the starved start itself "
        f"{rec['starved']:.1f} s. Learner options: {rec['learner']}."
        for rec in recs
    ]
    params = [
        f"| {rec['preset']}, {rec['iterations']} iterations | {r['arm']} | {r['seed']} | "
        f"{100 * r['gap_closed']:.0f} % | "
        f"{r['mean_params']['matching']} | {r['mean_params']['pre_ranking']} | {r['mean_params']['ranking']} |"
        for rec in recs
        for r in rec["runs"]
    ]
    rec = recs[0]
    write_results(
        os.path.join(results_dir, "learning_unex_rl.md"),
        [
            "# Learning test: UNEX-RL from a starved matching stage",
            "",
            f"Machine: {machine()} (shared with other jobs; training runs {rec['jobs']} at a time).",
            "",
            *(f"- {line}" for line in runs_by),
            "",
            f"World: {WORLDS[rec['world']]} (fixed; the seeds vary the learners). Start: matching "
            f"(w_relevance, w_popularity, w_history, exploration) = {STARVED_MATCHING} (starved: relevance near 0, "
            "8× the default exploration), pre-ranking and ranking at their defaults. Objective: usage seconds per "
            "session (UNEX-RL's reward). Oracle static: the best *joint* static parameters of the three stages, "
            "the learner's own decision family (`joint_oracle_static`: coordinate ascent, matching's 72-point grid, "
            "then pre-ranking's 35, then ranking's 26, each with the others at their best so far, by "
            "`actors.world.oracle.usage_static` with common random numbers; the best few settings re-measured on "
            "fresh sessions). Start, final and oracle static: deterministic policies on the same "
            f"{rec['eval_sessions']} simulated users with the same random numbers. Budget: {rec['iterations']} "
            f"iterations × {rec['runs'][0]['sessions'] // rec['iterations']} sessions. Gap closed = "
            "(final − start) / (oracle static − start) per seed; ± is the "
            "95 % t-interval over seeds. `single_agent` learns only the ranking stage: it cannot repair matching.",
            "",
            *rows,
            "",
            *(f"Note ({rec['preset']}): {note}" for rec in recs for note in rec.get("notes", [])),
            "",
            *(
                [
                    "Earlier runs (history: the same command under earlier learner options, "
                    "`learning_unex_rl_history*.json`):",
                    "",
                    "| learner options " + rows[0],
                    "|---" + rows[1],
                    *(
                        f"| {old['learner']} " + _table_row(old, arm)
                        for old in history
                        for arm in dict.fromkeys(r["arm"] for r in old["runs"])
                    ),
                    "",
                    *(f"Note (history, {old['preset']}): {note}" for old in history for note in old.get("notes", [])),
                    "",
                ]
                if history
                else []
            ),
            "Per run, the policies' mean actions after training:",
            "",
            "| preset | learner | seed | gap closed | matching | pre-ranking | ranking |",
            "|---|---|---:|---:|---|---|---|",
            *params,
            "",
            "![learning curves (default preset)](learning_unex_rl.png)",
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
