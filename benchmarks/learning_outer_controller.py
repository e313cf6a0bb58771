"""Learning test of the outer controller: from click-only ranking weights to the oracle's best static J.

    python benchmarks/learning_outer_controller.py                        # 2 arms × 5 seeds, default preset
    python benchmarks/learning_outer_controller.py --presets default heterogeneous --seeds 3
    python benchmarks/learning_outer_controller.py --results-dir /tmp/oc  # leave benchmarks/results alone
    python benchmarks/learning_outer_controller.py --sessions-per-iteration 320 --jobs 2   # 5× the budget

Both arms (layered, monolithic) start at μ(s) ≈ (1, 0, 0) (the module's output bias at the start
vector; see RankingPolicyModule) and are trained on the business objective
J = NDCG@10 + P(return) + 0.3·revenue per session (the layered arm at κ = 1, the monolithic arm
with the inner reward's weight β = 0; see experiment.LEARNING_ARMS). With one exploration draw per
session (``--exploration session``, the default) every session is one sample with one advantage, and
the two arms' estimators coincide; ``--exploration request`` gives each arm its own per-request credit.

The target is the oracle's best static ranking-weight vector for J (``session_headroom`` over the
resolution-2 simplex plus the start). Start, target and the trained μ(s) are all measured on the same
simulated users with common random numbers (``simulate_policy_sessions``), so the gap closed
(J_final − J_start)/(J_static − J_start) is paired per seed. Writes ``learning_outer_controller.md``
and ``learning_outer_controller.png`` to the results folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.world.metrics import mean_ci  # noqa: E402
from benchmarks.common import init_ray_worker, machine, plot_mean_se  # noqa: E402
from rllib_policies.outer_controller.experiment import (  # noqa: E402
    LEARNING_ARMS,
    LearningSpec,
    oracle_static,
    run_learning,
    static_objective,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def fmt(mc, digits=3, pct=False) -> str:
    m, h = mc
    if pct:
        return f"{100 * m:.1f} % ± {100 * h:.1f}" if h == h else f"{100 * m:.1f} %"
    return f"{m:.{digits}f} ± {h:.{digits}f}" if h == h else f"{m:.{digits}f}"


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    plot_mean_se(ax, curves, highlight=tuple(curves))
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.8, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training sessions")
    ax.set_ylabel("fraction of the gap to the oracle's best static J closed")
    ax.legend(fontsize=8)
    ax.set_title("Outer controller from click-only weights (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _run(job: tuple):
    arm, seed, spec, j_static = job
    return run_learning(arm, seed, spec, j_static, promote_sessions=spec.eval_sessions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-ids", type=int, nargs="+", help="these seeds instead of 0 … seeds − 1")
    p.add_argument("--arms", nargs="+", default=list(LEARNING_ARMS), choices=list(LEARNING_ARMS))
    p.add_argument("--presets", nargs="+", default=["default"])
    p.add_argument("--iterations", type=int, default=LearningSpec.iterations)
    p.add_argument("--eval-sessions", type=int, default=LearningSpec.eval_sessions)
    p.add_argument("--oracle-sessions", type=int, default=300)
    p.add_argument("--sessions-per-iteration", type=int, default=LearningSpec.sessions_per_iteration)
    p.add_argument("--exploration", default=LearningSpec.exploration, choices=("session", "request"))
    p.add_argument(
        "--restart-directions",
        type=int,
        default=LearningSpec.restart_directions,
        help="K candidates of the exploratory restart (0: none; OuterControllerConfig.restart_directions)",
    )
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one process and Ray each)")
    p.add_argument("--results-dir", default=RESULTS)
    args = p.parse_args()

    if args.jobs == 1:
        init_ray_worker()
    seeds = args.seed_ids or list(range(args.seeds))
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_ray_worker)
    t_all = time.time()
    rows, curves, runs_json, notes = [], {}, [], []
    for preset in args.presets:
        spec = LearningSpec(
            env_config={"preset": preset, "world": {"n_items": 5000, "n_users": 2000}},
            iterations=args.iterations,
            eval_sessions=args.eval_sessions,
            sessions_per_iteration=args.sessions_per_iteration,
            exploration=args.exploration,
            kpi_shrinkage=args.exploration == "session",
            restart_directions=args.restart_directions,
        )
        t0 = time.time()
        weights, h = oracle_static(spec, args.oracle_sessions)
        j_static = float(static_objective(spec, weights).mean())
        j_start_exact = float(static_objective(spec, spec.start).mean())
        notes.append(
            f"- {preset}: oracle best static w = {np.round(weights, 4).tolist()} (simplex; session_headroom over "
            f"{h['n_actions']} actions, {args.oracle_sessions} + {args.oracle_sessions} sessions: static "
            f"{h['static'][0]:.4f} ± {h['static'][1]:.4f}, start {h['reference'][0]:.4f} ± {h['reference'][1]:.4f}); "
            f"on the {spec.eval_sessions} evaluation sessions J_static = {j_static:.4f}, J(1, 0, 0) = "
            f"{j_start_exact:.4f}; {time.time() - t0:.0f} s"
        )
        print(notes[-1], flush=True)
        for arm in args.arms:
            jobs = [(arm, seed, spec, j_static) for seed in seeds]
            runs = list(pool.map(_run, jobs) if args.jobs > 1 else map(_run, jobs))
            runs_json += [{"preset": preset, **asdict(r)} for r in runs]
            closed = mean_ci([r.gap_closed_curve[-1] for r in runs])
            rows.append(
                f"| {arm} | {preset} | J | {fmt(mean_ci([r.objective_curve[0] for r in runs]), 4)} | {j_static:.4f} | "
                f"{fmt(mean_ci([r.objective_curve[-1] for r in runs]), 4)} | {fmt(closed, pct=True)} | "
                f"{runs[0].sessions[-1]} | "
                f"{fmt(mean_ci([r.train_seconds for r in runs]), 0)} |"
            )
            trust = {k: np.mean([r.trust_region[k] for r in runs]) for k in runs[0].trust_region}
            promoted = sum(r.promotion["promoted"] == "trained" for r in runs)
            notes.append(
                f"- {preset} / {arm}: final μ(s) (mean over states) "
                + "; ".join(str(np.round(r.final_action_mean, 3).tolist()) for r in runs)
                + f"; per-iteration KL(π_old ‖ π_new) {trust['kl_step']:.4f} (bound {spec.trust_region_kl}), "
                f"{trust['epochs']:.2f} epochs of {spec.num_epochs}, {100 * trust['backtracked']:.0f} % of iterations "
                f"backtracked; promotion kept the trained policy in {promoted}/{len(runs)} seeds"
            )
            print(rows[-1], "\n", notes[-1], flush=True)
            curves[f"{arm} ({preset})"] = (runs[0].sessions, [r.gap_closed_curve for r in runs])
    pool.shutdown()
    os.makedirs(args.results_dir, exist_ok=True)
    png = os.path.join(args.results_dir, "learning_outer_controller.png")
    plot(curves, png)
    with open(os.path.join(args.results_dir, "learning_outer_controller_runs.json"), "w") as f:
        json.dump(runs_json, f, indent=1, default=float)
    s = replace(
        LearningSpec(),
        sessions_per_iteration=args.sessions_per_iteration,
        exploration=args.exploration,
        restart_directions=args.restart_directions,
    )
    exploration = (
        "one exploration draw per session (u_t = m(s_t) + σ·ε, one advantage per session: J centred by the other "
        "sessions of the batch), each KPI's share of the gradient weighted by its signal-to-noise ratio on the "
        "batch (kpi_shrinkage)"
        if s.exploration == "session"
        else "a fresh exploration draw per request; NDCG and revenue credited to the request that earned them "
        f"(step KPIs, γ = {s.gamma}), the next-day return to every request of its session"
    )
    text = [
        "# Learning test: the outer controller",
        "",
        f"Machine: {machine()} (shared with other jobs). One run of `python benchmarks/learning_outer_controller.py "
        + (f"--seed-ids {' '.join(map(str, seeds))}" if args.seed_ids else f"--seeds {args.seeds}")
        + f" --presets {' '.join(args.presets)} --arms {' '.join(args.arms)} "
        f"--sessions-per-iteration {args.sessions_per_iteration} --exploration {args.exploration} "
        f"--restart-directions {args.restart_directions} --jobs {args.jobs}`, "
        f"{time.time() - t_all:.0f} s in all ({args.jobs} training run(s) at a time).",
        "",
        "Setup: start μ(s) ≈ (1, 0, 0) (click-only ranking weights; the action is a direction on the simplex, "
        "each share floored at 1e-3); "
        + (
            f"an exploratory restart before the first batch (the start and {s.restart_directions} candidates "
            f"with mean logits 2σ_u away, evenly spread, serve the same {s.restart_sessions} simulated users with "
            f"common random numbers; the mean moves to the best by mean J; "
            f"{(s.restart_directions + 1) * s.restart_sessions} sessions, counted in the budget), then "
            if s.restart_directions
            else ""
        )
        + f"{args.iterations} iterations × "
        f"{s.sessions_per_iteration} sessions, lr {s.lr}, up to {s.num_epochs} epochs per batch inside the trust "
        f"region KL(π_old ‖ π_new) ≤ {s.trust_region_kl} per iteration; exploration σ_u = "
        f"{s.model_config.get('init_std')} (learned, floored at {s.model_config.get('min_std')}), the mean logits "
        f"bounded to ±{s.model_config.get('max_logit')}; μ(s) shrunk toward one action for all states "
        f"(personalisation_l2 {s.personalisation_l2}); {exploration}; objective "
        "J = NDCG@10 + P(return) + 0.3·revenue per "
        "session; layered arm at κ = 1 from the first iteration (KPI gate open), monolithic arm with the inner "
        "reward's weight β = 0 (both optimise J alone). Evaluation: μ(s) on "
        f"{args.eval_sessions} simulated sessions, the same users and common random numbers for the start, every "
        "trained policy and the oracle's best static vector. Final = the promoted policy (do no harm: the trained "
        "policy unless the paired 95 % interval of J(trained) − J(start) on fresh sessions does not lie above 0). "
        "Gap closed = (J_final − J_start)/(J_static − J_start) per seed; ± is the 95 % t-interval over seeds; "
        "wall s = training seconds per seed (evaluation excluded).",
        "",
        "| learner | preset | objective | start | oracle static | final | gap closed (95 % CI) | sessions | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *notes,
        "",
        "![learning curves](learning_outer_controller.png)",
        "",
    ]
    path = os.path.join(args.results_dir, "learning_outer_controller.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
