"""Layered (inner reward + delayed-KPI outer controller) vs monolithic weighted sum, with ablations.

    python benchmarks/layered_vs_monolithic.py              # 5 arms × 5 seeds, ~15 minutes on 2 cores
    python benchmarks/layered_vs_monolithic.py --seeds 2 --arms layered monolithic --iterations 10
    python benchmarks/layered_vs_monolithic.py --results-dir /tmp/lvm    # leave benchmarks/results alone

Every arm is OuterController with the same network, optimiser, batch and budget; only the reward
signal differs (see rllib_policies/outer_controller/signals.py). The mean policy is evaluated on
the same simulated users for every arm. Writes benchmarks/results/layered_vs_monolithic.md and
layered_vs_monolithic.png, and sets the measurements beside the seed article's claims.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import init_local_ray, machine, plot_mean_se, write_results  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
CLAIMS = {
    "iters_to_target": "−40 % iterations",
    "ndcg_at_10": "0.412 → 0.469 (+13.8 %)",
    "pg_noise_ratio": "−62 % reward variance",
}
NO_TARGET = "no target: no arm's mean ends above the untrained policy"


def fmt(mc, digits=3) -> str:
    m, h = mc
    if m != m:
        return "–"
    return f"{m:.{digits}f} ± {h:.{digits}f}" if h == h else f"{m:.{digits}f}"


def ratio(rows, key) -> str:
    by = {r["arm"]: r[key][0] for r in rows}
    if (
        "layered" not in by
        or "monolithic" not in by
        or not by["monolithic"]
        or not np.isfinite([by["layered"], by["monolithic"]]).all()
    ):
        return "– (an arm has no value)"
    return f"{(by['layered'] / by['monolithic'] - 1) * 100:+.1f} %"


def paired_table(runs) -> str:
    """Layered minus each other arm, per seed (the seeds share env seeds and evaluation users)."""
    from actors.world.metrics import mean_ci

    final = {(r.arm, r.seed): r.final for r in runs}
    seeds = sorted({r.seed for r in runs if r.arm == "layered"})
    lines = [
        "| layered minus | NDCG@10 | revenue / session | return rate | seeds where layered is ahead on NDCG |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in dict.fromkeys(r.arm for r in runs):
        if arm == "layered" or not all((arm, s) in final for s in seeds):
            continue
        diff = {
            k: [final["layered", s][k] - final[arm, s][k] for s in seeds]
            for k in ("ndcg_at_10", "revenue_per_session", "return_rate")
        }
        ahead = sum(d > 0 for d in diff["ndcg_at_10"])
        lines.append(
            f"| {arm} | {fmt(mean_ci(diff['ndcg_at_10']))} | {fmt(mean_ci(diff['revenue_per_session']))} | "
            f"{fmt(mean_ci(diff['return_rate']))} | {ahead}/{len(seeds)} |"
        )
    return "\n".join(lines)


def plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, curve, label in (
        (axes[0], "objective_curve", "business objective J (500 eval sessions)"),
        (axes[1], "ndcg_curve", "NDCG@10 of the mean policy (500 eval sessions)"),
    ):
        by_arm = {arm: [r for r in runs if r.arm == arm] for arm in dict.fromkeys(r.arm for r in runs)}
        plot_mean_se(
            ax,
            {arm: (rs[0].iterations, [getattr(r, curve) for r in rs]) for arm, rs in by_arm.items()},
            highlight=("layered", "monolithic"),
        )
        ax.set_xlabel("training iteration (64 sessions each)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Layered vs monolithic (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from rllib_policies.outer_controller.experiment import ARMS, ExperimentConfig, run_arm, summarise

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--iterations", type=int, default=ExperimentConfig.iterations)
    p.add_argument("--results-dir", default=RESULTS, help="where the .md, .png and runs .json go")
    args = p.parse_args()
    results = args.results_dir

    init_local_ray(num_cpus=2)
    exp = ExperimentConfig(iterations=args.iterations)
    runs, t0 = [], time.time()
    for seed in range(args.seeds):  # seeds outermost: a partial run still compares arms
        for arm in args.arms:
            runs.append(run_arm(arm, seed, exp))
    rows, targets = summarise(runs)
    (target, j_start, j_best), (ndcg_target, n_start, n_best) = targets["objective_curve"], targets["ndcg_curve"]

    head = (
        "| arm | reached J target | iterations to J target | train s to J target | iterations to NDCG target | "
        "final J | J gain | final NDCG@10 | NDCG@10 gain | revenue / session | return rate | CTR | PG noise ratio | "
        "NDCG var over seeds |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head] + [
        f"| {r['arm']} | {r['reached_target'] if target is not None else '–'} | {fmt(r['iters_to_target'], 1)} | "
        f"{fmt(r['seconds_to_target'], 1)} | {fmt(r['iters_to_ndcg_target'], 1)} | {fmt(r['objective'])} | "
        f"{fmt(r['objective_gain'])} | {fmt(r['ndcg_at_10'])} | {fmt(r['ndcg_gain'])} | "
        f"{fmt(r['revenue_per_session'])} | "
        f"{fmt(r['return_rate'])} | {fmt(r['ctr'])} | {fmt(r['pg_noise_ratio'], 2)} | {r['ndcg_seed_var']:.2e} |"
        for r in rows
    ]
    table = "\n".join(lines)
    claims = (
        "| quantity | seed article (layered vs monolithic) | measured here (layered vs monolithic) |\n|---|---|---|\n"
        f"| iterations to converge | {CLAIMS['iters_to_target']} | "
        f"{ratio(rows, 'iters_to_target') if target is not None else NO_TARGET} (to the J target) |\n"
        f"| NDCG@10 | {CLAIMS['ndcg_at_10']} | {ratio(rows, 'ndcg_at_10')} |\n"
        f"| reward-signal variance | {CLAIMS['pg_noise_ratio']} | {ratio(rows, 'pg_noise_ratio')} (PG noise ratio) |"
    )
    paired = paired_table(runs)
    png = os.path.join(results, "layered_vs_monolithic.png")
    os.makedirs(results, exist_ok=True)
    plot(runs, png)
    print(table, "\n", paired, "\n", claims, sep="\n")
    with open(os.path.join(results, "layered_vs_monolithic_runs.json"), "w") as f:
        json.dump([asdict(r) for r in runs], f, indent=1, default=float)
    e = asdict(exp)
    write_results(
        os.path.join(results, "layered_vs_monolithic.md"),
        [
            "# Layered vs monolithic outer controller",
            "",
            f"Machine: {machine()}. One run of `python benchmarks/layered_vs_monolithic.py` "
            f"({len(runs)} training runs, {time.time() - t0:.0f} s in all).",
            "",
            f"Setup: {e['iterations']} iterations × {e['sessions_per_iteration']} sessions per arm and seed; "
            f"lr {e['lr']}, {e['num_epochs']} epochs per batch; KPI weights {e['kpi_weights']}; KPI gate opens after "
            f"{e['min_sessions_for_kpi']} sessions (the production default is 10 000, more than this whole budget); "
            f"KL rollback off (the rail is tested separately); trust region {e['trust_region_kl'] or 'off'}; "
            f"world {e['env_config']}. Evaluation: the mean policy "
            f"on {e['eval_sessions']} sessions every {e['eval_every']} iterations and {e['final_eval_sessions']} at "
            "the end, the same simulated users for every arm. ± is the 95 % t-interval over seeds.",
            "",
            "Business objective J = Σ_k w_k·KPI_k with the KPI weights above (NDCG@10, next-day return rate, revenue "
            "per session), measured on the evaluation sessions: what both arms are trained for. Convergence target: "
            "the untrained policy's mean plus 95 % of the way to the best arm's final mean — J ≥ "
            + (f"{target:.3f}" if target is not None else "undefined")
            + f" (start {j_start:.3f}, best {j_best:.3f}); "
            "NDCG@10 ≥ "
            + (f"{ndcg_target:.3f}" if ndcg_target is not None else "undefined")
            + f" (start {n_start:.3f}, best {n_best:.3f}). Gains are final minus untrained on the same users.",
            "",
            "PG noise ratio: tr Cov_i[g_i] / (B·‖ḡ‖²) over the B sessions of a batch, g_i = ∇θ Σ_t A_t·log π(a_t|s_t) "
            "of session i: the squared relative error of the batch's policy gradient, scale-free so the arms' "
            "different reward scales compare (median over iterations, then mean over seeds). The seed's \"reward "
            'variance" is not defined further; this is the variance that slows a policy gradient down.',
            "",
            table,
            "",
            "## Paired by seed (same seed, same evaluation users)",
            "",
            paired,
            "",
            "## Against the seed article",
            "",
            claims,
            "",
            "![learning curves](layered_vs_monolithic.png)",
            "",
        ],
        partial=False,
    )


if __name__ == "__main__":
    main()
