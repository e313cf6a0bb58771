"""UNEX-RL on our world: multi-stage agents with a global critic vs single-agent and independent
learners, with the CIC / SG / CQR ablations, 5 seeds each in one run.

    python benchmarks/unex_rl.py                      # 6 arms × 5 seeds
    python benchmarks/unex_rl.py --seeds 2 --arms unex_rl single_agent --iterations 10
    python benchmarks/unex_rl.py --seeds 1 --arms unex_rl --iterations 2 --eval-every 1 \
        --eval-sessions 20 --final-sessions 20 --results-dir /tmp/unex_rl   # a smoke run

Every arm is UnexRL with the same networks, buffer, optimiser and budget; the deterministic stage
policies are evaluated on the same simulated users (common random numbers) every few iterations.
Metrics: session usage time (Σ dwell seconds), next-day return rate, NDCG@10. Writes
unex_rl.md, unex_rl.png and unex_rl_runs.json to ``--results-dir`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the Agg backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.world.metrics import mean_ci  # noqa: E402 (x̄ ± the 95 % t-interval)
from benchmarks.common import init_local_ray, machine, plot_mean_se, write_results  # noqa: E402 (after sys.path: run as a script)
from rllib_policies.envs import MultiStageEnv  # noqa: E402
from rllib_policies.unex_rl import ARMS, UnexRLConfig  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PAPER = "+0.558 % usage time over single-agent RL (Kuaishou online A/B, 100 M+ users; UNEX-RL, arXiv 2401.06470)"
ENV = {"world": {"n_items": 5000, "n_users": 3000}, "pipeline": {"k_matching": 300, "k_pre_ranking": 50}}
METRICS = ("usage_s_per_session", "return_rate", "ndcg_at_10")
DEFAULTS = UnexRLConfig()  # every arm's shared settings (the ones not set here)
UPDATES = 8  # minibatch updates per iteration (CIC replays the cascade in each: the main cost on 2 cores)


def run(arm: str, seed: int, iterations: int, eval_every: int, eval_sessions: int, final_sessions: int) -> dict:
    algo = (
        UnexRLConfig()
        .environment(MultiStageEnv, env_config={**ENV, "seed": seed})
        .unex_rl(arm=arm, updates_per_iteration=UPDATES)
        .debugging(seed=seed, log_level="ERROR")
        .build_algo()
    )
    curve, t0, train_s = [], time.perf_counter(), 0.0
    try:
        start = algo.evaluate_policy(final_sessions, seed=10_000)
        for i in range(iterations + 1):
            if i % eval_every == 0:
                curve.append({"iteration": i, "train_s": train_s, **algo.evaluate_policy(eval_sessions, seed=20_000)})
            if i == iterations:
                break
            t = time.perf_counter()
            algo.train()
            train_s += time.perf_counter() - t
        final = algo.evaluate_policy(final_sessions, seed=10_000)
    finally:
        algo.stop()
    print(
        f"  {arm:<13} seed {seed}: usage {start['usage_s_per_session']:.1f} → {final['usage_s_per_session']:.1f} s, "
        f"return {start['return_rate']:.3f} → {final['return_rate']:.3f}, NDCG {start['ndcg_at_10']:.3f} → "
        f"{final['ndcg_at_10']:.3f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return {"arm": arm, "seed": seed, "start": start, "final": final, "curve": curve, "train_s": train_s}


def fmt(mc, digits=3) -> str:
    m, h = mc
    return "–" if m != m else (f"{m:.{digits}f} ± {h:.{digits}f}" if h == h else f"{m:.{digits}f}")


def tables(runs: list[dict]) -> tuple[str, str]:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    lines = [
        "| arm | usage s / session | Δ usage vs start | return rate | NDCG@10 | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        rs = [r for r in runs if r["arm"] == a]
        ends = {k: [r["final"][k] for r in rs] for k in METRICS}
        gain = [r["final"]["usage_s_per_session"] - r["start"]["usage_s_per_session"] for r in rs]
        lines.append(
            f"| {a} | {fmt(mean_ci(ends['usage_s_per_session']), 1)} | {fmt(mean_ci(gain), 1)} | "
            f"{fmt(mean_ci(ends['return_rate']))} | {fmt(mean_ci(ends['ndcg_at_10']))} | "
            f"{fmt(mean_ci([r['train_s'] for r in rs]), 0)} |"
        )
    final = {(r["arm"], r["seed"]): r["final"] for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["arm"] == "unex_rl"})
    paired = [
        "| UNEX-RL minus | usage s / session | usage % | return rate | NDCG@10 "
        "| seeds where UNEX-RL is ahead on usage |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        if a == "unex_rl" or not all((a, s) in final for s in seeds):
            continue
        d = {k: [final["unex_rl", s][k] - final[a, s][k] for s in seeds] for k in METRICS}
        pct = [
            100 * (final["unex_rl", s]["usage_s_per_session"] / final[a, s]["usage_s_per_session"] - 1) for s in seeds
        ]
        paired.append(
            f"| {a} | {fmt(mean_ci(d['usage_s_per_session']), 2)} | {fmt(mean_ci(pct), 2)} % | "
            f"{fmt(mean_ci(d['return_rate']))} | {fmt(mean_ci(d['ndcg_at_10']))} | "
            f"{sum(x > 0 for x in d['usage_s_per_session'])}/{len(seeds)} |"
        )
    return "\n".join(lines), "\n".join(paired)


def plot(runs: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, METRICS):
        by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in runs)}
        plot_mean_se(
            ax,
            {
                arm: ([p["iteration"] for p in rs[0]["curve"]], [[p[key] for p in r["curve"]] for r in rs])
                for arm, rs in by_arm.items()
            },
            highlight=("unex_rl", "single_agent"),
        )
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
    axes[0].legend(fontsize=7)
    fig.suptitle("UNEX-RL vs single-agent vs independent learners, ablations (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-sessions", type=int, default=300)
    p.add_argument("--final-sessions", type=int, default=1000)
    p.add_argument("--results-dir", default=RESULTS, help="where unex_rl.md, .png and _runs.json go")
    args = p.parse_args()
    init_local_ray(num_cpus=2)
    t0, runs = time.time(), []
    for seed in range(args.seeds):  # seeds outermost: a partial run still compares arms
        for arm in args.arms:
            runs.append(run(arm, seed, args.iterations, args.eval_every, args.eval_sessions, args.final_sessions))
    main_table, paired = tables(runs)
    print(main_table, "\n", paired, sep="\n")
    os.makedirs(args.results_dir, exist_ok=True)
    plot(runs, os.path.join(args.results_dir, "unex_rl.png"))
    with open(os.path.join(args.results_dir, "unex_rl_runs.json"), "w") as f:
        json.dump(runs, f, indent=1, default=float)
    write_results(
        os.path.join(args.results_dir, "unex_rl.md"),
        [
            "# UNEX-RL: multi-stage agents with a global critic",
            "",
            f"Machine: {machine()}. One run of `python benchmarks/unex_rl.py` ({len(runs)} training runs, "
            f"{time.time() - t0:.0f} s in all).",
            "",
            f"Setup: world {ENV}; {args.iterations} iterations × 64 sessions ({UPDATES} minibatch updates of 256 "
            f"transitions each), γ {DEFAULTS.gamma:g}, lr 1e-3 (stage policies {DEFAULTS.actor_lr} after a "
            f"{DEFAULTS.actor_warmup_iterations}-iteration critic warm-up), Gaussian exploration "
            f"σ = {DEFAULTS.explore_std_of('matching'):g} (matching), {DEFAULTS.explore_std_of('ranking'):g} "
            "(pre-ranking, ranking) of each action's range; stage policies "
            "start at the default stage parameters. Evaluation: the deterministic policies on the same "
            f"{args.final_sessions} simulated users for every arm (before and after training), and on "
            f"{args.eval_sessions} every {args.eval_every} iterations for the curves. ± is the 95 % t-interval over "
            "seeds.",
            "",
            "Arms: `unex_rl` (global critic + CIC + SG, usage seconds / 30 as the reward); `single_agent` (only "
            "ranking learns; matching and pre-ranking keep their default parameters); `independent` (one critic per "
            "stage on its own observation and action, no global critic); `no_cic` (stale buffer observations "
            "downstream); `no_sg` (gradients flow through downstream stages); `cqr` (the paper's category-quantile "
            "rewards).",
            "",
            main_table,
            "",
            "## Paired by seed (same users, same draws)",
            "",
            paired,
            "",
            f"## Against the paper\n\nPaper: {PAPER}. Measured here: the `single_agent` row of the paired table.",
            "",
            "![learning curves](unex_rl.png)",
            "",
        ],
        partial=False,
    )


if __name__ == "__main__":
    main()
