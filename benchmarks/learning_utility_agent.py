"""Learning test of the utility-weight agent (PRL-PUTS): the fraction of the gap from the uniform
logging policy to the oracle's best static weight vector that the deployed π_λ closes.

    python benchmarks/learning_utility_agent.py                          # 3 presets × 5 seeds
    python benchmarks/learning_utility_agent.py --seeds 2 --sessions 1000 --results-dir /tmp/ua
    python benchmarks/learning_utility_agent.py --report-only            # tables again from the .json

Per preset and seed (rllib_policies/utility_agent/learning.py): uniform exploration logs over the
7 × 7 grid with the simulator's exact expected clicks / long views of every action at every logged
request → users split into train / validation / test → the two-head Q agent trained offline →
per λ the do-no-harm choice between π_λ and the best global vector g_λ (guard.py, on validation;
g_λ by --global-choice, every choice measured) → every value on the test users' logged states,
exactly. Start = the uniform logging policy (the only policy the offline learner has seen act; an
untrained agent's arbitrary argmax is it in expectation); target = the oracle's best static grid
vector on the same states. Writes learning_utility_agent.{md,png,json} under --results-dir (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.world.metrics import mean_ci  # noqa: E402
from benchmarks.common import machine, save_plot, write_results  # noqa: E402 (after the sys.path line: run as a script)
from rllib_policies.utility_agent.learning import LearningConfig, run_learning_test  # noqa: E402
from serve_apps.launch import start_local_ray  # noqa: E402

LEARNER = "utility agent (PRL-PUTS), deployed π_λ"
OBJECTIVE = {0.0: "λ=0 (long views/σ)", 0.5: "λ=0.5", 1.0: "λ=1 (clicks/σ)"}
POLICIES = {
    "final": "deployed (after do no harm)",
    "personalised": "π_λ alone",
    "global_model": "g_λ by the model (mean Q̂)",
    "global_logs": "g_λ by reward at hit",
    "global_dr": "g_λ by DR",
    "global_dr_lcb": "g_λ by DR, pessimistic vs the model",
    "global_dr_smooth": "g_λ by DR, smoothed residual",
    "frozen": "untrained agent",
    "prior": "myopic prior m_λ alone",
}
CHOICE = {
    "model": "the model's mean Q̂",
    "logs": "reward at hit",
    "dr": "the doubly robust value",
    "dr_lcb": "the doubly robust value, pessimistically against the model's choice",
    "dr_smooth": "the doubly robust value with the residual smoothed over the grid",
}


def collect(runs: list[dict], lam: float, key: str) -> np.ndarray:
    return np.array([next(p[key] for p in r["points"] if p["lambda"] == lam) for r in runs], np.float64)


def main_table(results: dict, args) -> list[str]:
    rows = []
    for preset, runs in results.items():
        for lam in args.lambdas:
            gc, ci = mean_ci(collect(runs, lam, "gap_closed_final"))
            objective = OBJECTIVE.get(lam, f"λ={lam:g}")
            rows.append(
                f"| {LEARNER} | {preset} | {objective} | {collect(runs, lam, 'start').mean():.4f} "
                f"| {collect(runs, lam, 'oracle_static').mean():.4f} | {collect(runs, lam, 'final').mean():.4f} "
                f"| {100 * gc:.0f} % ± {100 * ci:.0f} | {args.sessions} "
                f"| {np.mean([r['wall_s']['total'] for r in runs]):.0f} |"
            )
    return rows


def parts_table(results: dict, args) -> list[str]:
    rows = []
    for preset, runs in results.items():
        for lam in args.lambdas:
            cells = []
            for key in POLICIES:
                if f"gap_closed_{key}" not in runs[0]["points"][0]:  # a run before that candidate existed
                    cells.append("–")
                    continue
                m, ci = mean_ci(collect(runs, lam, f"gap_closed_{key}"))
                cells.append(f"{100 * m:.0f} % ± {100 * ci:.0f}")
            kept = sum(
                next(p for p in r["points"] if p["lambda"] == lam)["decision"]["deployed"] == "personalised"
                for r in runs
            )
            rows.append(
                f"| {preset} | {OBJECTIVE.get(lam, f'λ={lam:g}')} | " + " | ".join(cells) + f" | {kept} / {len(runs)} |"
            )
    return rows


def headroom_table(results: dict, args) -> list[str]:
    """Personalised gain over the best static vector vs the oracle's per-user / per-request headroom (%)."""
    rows = []
    for preset, runs in results.items():
        for lam in args.lambdas:
            static = collect(runs, lam, "oracle_static")
            cells = [
                mean_ci(100 * (collect(runs, lam, k) / static - 1))
                for k in ("personalised", "final", "oracle_user", "oracle_request")
            ]
            rows.append(
                f"| {preset} | {OBJECTIVE.get(lam, f'λ={lam:g}')} | "
                + " | ".join(f"{m:+.2f} ± {ci:.2f}" for m, ci in cells)
                + " |"
            )
    return rows


def capture_table(results: dict, args) -> list[str]:
    """Share of the oracle's per-request headroom over the best static vector that π_λ (and the
    deployed policy) capture: (V(π) − V_static) / (V_request − V_static), mean ± 95 % CI over seeds."""
    rows = []
    for preset, runs in results.items():
        for lam in args.lambdas:
            static, request = collect(runs, lam, "oracle_static"), collect(runs, lam, "oracle_request")
            cells = [
                mean_ci(100 * (collect(runs, lam, k) - static) / (request - static)) for k in ("personalised", "final")
            ]
            rows.append(
                f"| {preset} | {OBJECTIVE.get(lam, f'λ={lam:g}')} | {(request - static).mean():.4f} | "
                + " | ".join(f"{m:+.0f} % ± {ci:.0f}" for m, ci in cells)
                + " |"
            )
    return rows


def absolute_table(results: dict, args) -> list[str]:
    """The gap (oracle static − start) in σ units and in clicks / long views per request, the
    deployed policy's shortfall (oracle static − final, σ units) and the gap closed's CI."""
    rows = []
    for preset, runs in results.items():
        for lam in args.lambdas:
            pts = [next(p for p in r["points"] if p["lambda"] == lam) for r in runs]
            gap = collect(runs, lam, "oracle_static") - collect(runs, lam, "start")
            short = collect(runs, lam, "oracle_static") - collect(runs, lam, "final")
            kpi = np.array([np.subtract(p["kpi"]["oracle_static"], p["kpi"]["start"]) for p in pts])
            sm, sci = mean_ci(short)
            gm, gci = mean_ci(collect(runs, lam, "gap_closed_final"))
            rows.append(
                f"| {preset} | {OBJECTIVE.get(lam, f'λ={lam:g}')} | {gap.mean():.4f} ({gap.min():.4f}–{gap.max():.4f}) "
                f"| {kpi[:, 0].mean():+.4f} | {kpi[:, 1].mean():+.4f} | {sm:.4f} ± {sci:.4f} "
                f"| {100 * np.median(collect(runs, lam, 'gap_closed_final')):.0f} % "
                f"| {100 * gm:.0f} % ± {100 * gci:.0f} |"
            )
    return rows


def exploration_text(results: dict, args) -> str:
    """How the budget was logged: uniform over the grid, or successive halving (rounds, survivors)."""
    if args.exploration_rounds == 1:
        return "uniform over the 7 × 7 grid"
    runs = [r for rs in results.values() for r in rs]
    sizes = np.array([[len(x["support"]) for x in r["exploration"]["rounds"]] for r in runs])
    return (
        f"adaptive, {args.exploration_rounds} rounds of successive halving at the same total budget "
        f"(round 1 uniform over all 49 vectors; each later round uniform over the union over λ of "
        + (
            f"each λ's top {args.keep_fraction:g} of the previous round's support by the model's mean Q̂_λ"
            if args.cut == "fraction"
            else "every vector of the previous round's support that the doubly robust best does not beat at "
            f"one-sided level {args.cut_level:g} (successive elimination, Bonferroni over the support)"
        )
        + (", plus each λ's myopic prior m_λ" if args.keep_prior else "")
        + ", fitted on the train users' rows so far; supports "
        + " → ".join(f"{sizes[:, k].min()}–{sizes[:, k].max()}" for k in range(sizes.shape[1]))
        + " vectors; each request logs its round's propensity; g_λ = the model refit on every round's train "
        "rows, argmax over the last support; π_λ also within it)"
    )


def baseline_table(results: dict, baseline: dict, args) -> list[str]:
    """Old (``--baseline``) vs new gap closed per row, and how often the oracle's vector survived halving."""
    rows = []
    for preset, runs in results.items():
        for lam in args.lambdas:
            old = (np.nan, np.nan)
            if preset in baseline:  # the baseline's headline under the same --global-choice, as its page shows it
                key = f"gap_closed_final_{args.global_choice}"
                key = key if key in baseline[preset][0]["points"][0] else "gap_closed_final"
                old = mean_ci(collect(baseline[preset], lam, key))
            new = mean_ci(collect(runs, lam, "gap_closed_final"))
            pts = [next(p for p in r["points"] if p["lambda"] == lam) for r in runs]
            survived = sum(p.get("oracle_action_survived", True) for p in pts)
            picked = sum(p["global_actions"][args.global_choice] == p["oracle_static_action"] for p in pts)
            rows.append(
                f"| {preset} | {OBJECTIVE.get(lam, f'λ={lam:g}')} | {100 * old[0]:.0f} % ± {100 * old[1]:.0f} "
                f"| {100 * new[0]:.0f} % ± {100 * new[1]:.0f} | {survived} / {len(runs)} | {picked} / {len(runs)} |"
            )
    return rows


def plot(path: str, results: dict, args) -> None:
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the headless backend

    groups = [(preset, lam) for preset in results for lam in args.lambdas]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(POLICIES)
    for k, (key, name) in enumerate(POLICIES.items()):
        stats_ = [mean_ci(collect(results[p], lam, f"gap_closed_{key}")) for p, lam in groups]
        ax.bar(
            np.arange(len(groups)) + (k - len(POLICIES) / 2 + 0.5) * width,
            [100 * m for m, _ in stats_],
            width,
            yerr=[100 * np.nan_to_num(c) for _, c in stats_],
            capsize=2,
            label=name,
        )
    ax.axhline(80, color="k", lw=0.8, ls="--")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(groups)), [f"{p}\nλ={lam:g}" for p, lam in groups], fontsize=8)
    ax.set_ylabel("gap closed, % (uniform logging → oracle best static)")
    ax.set_title(
        f"Utility agent learning test: {args.sessions} exploration sessions, {args.passes} passes, "
        f"{len(args.seeds)} seeds (95 % CI)",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="default,heterogeneous,cascade_0.9")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4])
    parser.add_argument("--sessions", type=int, default=2000, help="exploration sessions per seed")
    parser.add_argument("--passes", type=int, default=12, help="at most this many passes (early stopping)")
    parser.add_argument("--lambdas", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 1.0])
    parser.add_argument("--n-items", type=int, default=5000)
    parser.add_argument("--n-users", type=int, default=4000)
    parser.add_argument("--global-choice", default="model", choices=list(CHOICE), help="how g_λ is picked")
    parser.add_argument(
        "--exploration-rounds", type=int, default=1, help="logging rounds (> 1: successive halving over the grid)"
    )
    parser.add_argument("--keep-fraction", type=float, default=0.25, help="share of a round's support each λ keeps")
    parser.add_argument(
        "--cut", default="fraction", choices=["fraction", "confidence"], help="how a round's survivors are chosen"
    )
    parser.add_argument("--cut-level", type=float, default=0.95, help="the confidence cut's level")
    parser.add_argument(
        "--prior", default="myopic", choices=["none", "myopic"], help="g_λ must beat the myopic prior m_λ to deploy"
    )
    parser.add_argument(
        "--keep-prior",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every cut also keeps each λ's myopic prior m_λ",
    )
    parser.add_argument(
        "--baseline", default=None, help="a .json of an earlier run (e.g. uniform logging): old vs new per row"
    )
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the .json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    os.makedirs(args.results_dir, exist_ok=True)
    raw_path = os.path.join(args.results_dir, "learning_utility_agent.json")
    results: dict[str, list[dict]] = {}
    if args.report_only:
        with open(raw_path) as f:
            results = json.load(f)
        report(results, args, sum(r["wall_s"]["total"] for runs in results.values() for r in runs))
        return
    start_local_ray(num_cpus=2)
    for preset in args.presets.split(","):
        for seed in args.seeds:
            cfg = LearningConfig(
                env_config={"preset": preset, "world": {"n_items": args.n_items, "n_users": args.n_users}},
                sessions=args.sessions,
                passes=args.passes,
                seed=seed,
                lambdas=tuple(args.lambdas),
                global_choice=args.global_choice,
                exploration_rounds=args.exploration_rounds,
                keep_fraction=args.keep_fraction,
                cut=args.cut,
                cut_level=args.cut_level,
                prior=args.prior,
                keep_prior=args.keep_prior,
                ray_data=False,  # the same request_rows in process: the Ray Data job's start-up dominates at this size
            )
            with tempfile.TemporaryDirectory() as work:
                run = run_learning_test(cfg, work)
            results.setdefault(preset, []).append(run)
            print(
                f"[learning] {preset} seed {seed}: "
                + ", ".join(f"λ {p['lambda']:g} gap closed {100 * p['gap_closed_final']:.0f} %" for p in run["points"])
                + f" ({run['wall_s']['total']:.0f} s)",
                flush=True,
            )
            with open(raw_path, "w") as f:
                json.dump(results, f, indent=1, default=float)
    report(results, args, time.perf_counter() - t0)


def report(results: dict, args, total: float) -> None:
    for runs in results.values():  # the headline "final" follows --global-choice (every choice is in the .json)
        for r in runs:
            for p in r["points"]:
                if f"final_{args.global_choice}" in p:
                    p["final"] = p[f"final_{args.global_choice}"]
                    p["gap_closed_final"] = p[f"gap_closed_final_{args.global_choice}"]
    one = next(iter(results.values()))[0]
    data = one["data"]
    sections = [
        "# Learning test: the utility-weight agent (PRL-PUTS)\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()} (shared with other jobs). "
        f"Command: `python benchmarks/learning_utility_agent.py --sessions {args.sessions} --passes {args.passes} "
        f"--seeds {','.join(map(str, args.seeds))} --global-choice {args.global_choice}"
        + (
            f" --exploration-rounds {args.exploration_rounds} "
            + (
                f"--keep-fraction {args.keep_fraction:g}"
                if args.cut == "fraction"
                else f"--cut confidence --cut-level {args.cut_level:g}"
            )
            + ("" if args.keep_prior else " --no-keep-prior")
            if args.exploration_rounds > 1
            else ""
        )
        + (f" --prior {args.prior}" if args.prior != "myopic" else "")
        + (f" --baseline {os.path.relpath(args.baseline, ROOT)}" if args.baseline else "")
        + "`; "
        f"total wall time {total:.0f} s.\n\n"
        f"World: {args.n_items} items, {args.n_users} users, presets {', '.join(results)}. Budget per seed: "
        f"{args.sessions} exploration sessions ({exploration_text(results, args)}; e.g. {data['train_rows']} train / "
        f"{data['validation_rows']} validation / {data['test_rows']} test requests, split by user), {args.passes} "
        "passes at most (lr 1e-3, batch 512, hidden 64; the pass with the lowest "
        "validation loss is kept), wall s = per seed (exploration with exact ground truth, request rows, "
        "training, evaluation). Objective r_λ = λ·clicks/σ₁ + (1 − λ)·long views/σ₂ (σ: the training "
        "logs' reward std, the scale π_λ scalarises with), exact expectations at the test users' logged "
        "states. Start = the uniform logging policy; oracle static = the best single grid vector on the same "
        "states (actors/world/oracle.py `headroom_of_values`); final = the deployed policy: π_λ where the "
        "validation logs show it beats g_λ (one-sided 95 % lower bound > 0), else g_λ, the best global vector "
        f"on the training logs by {CHOICE[args.global_choice]} (guard.py)"
        + (
            ", itself deployed only where the validation logs show it beats the myopic prior m_λ (the grid vector "
            "closest to ranking by λ/σ₁·p_click + (1 − λ)/σ₂·p_long_view; guard.myopic_actions) at the same level, "
            "else m_λ"
            if args.prior == "myopic"
            else ""
        )
        + ". Gap closed = (final − start) / "
        "(oracle static − start), mean over seeds ± 95 % t-interval.\n",
        "| learner | preset | objective | start | oracle static | final | gap closed (95 % CI) | sessions | wall s |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(main_table(results, args)) + "\n",
        "![gap closed per candidate](learning_utility_agent.png)\n",
        "## Where the gap is closed\n\nGap closed by each candidate on the same test states (mean ± 95 % CI over "
        "seeds); the untrained agent averages 16 random initialisations' π_λ. Last column: seeds where the "
        "do-no-harm rule deployed π_λ."
        + (
            " With the prior gate on (`--prior myopic`) each g_λ column is that choice *after* the gate: m_λ "
            "wherever the validation logs did not certify the learned vector over it."
            if args.prior == "myopic"
            else ""
        )
        + "\n\n"
        "| preset | objective | " + " | ".join(POLICIES.values()) + " | π_λ deployed |\n"
        "|---|---|" + "---:|" * (len(POLICIES) + 1) + "\n" + "\n".join(parts_table(results, args)) + "\n",
        "## Personalisation vs the oracle's headroom\n\nOver the oracle's best static vector, % (mean ± 95 % CI "
        "over seeds): π_λ alone, the deployed policy, and the oracle's per-user (in-sample over a user's test "
        "states) and per-request optima on the same states.\n\n"
        "| preset | objective | π_λ vs static % | deployed vs static % | oracle per user % | oracle per request % |\n"
        "|---|---|---:|---:|---:|---:|\n" + "\n".join(headroom_table(results, args)) + "\n",
        "## Share of the per-request headroom captured\n\nThe oracle's per-request headroom over its best static "
        "vector (σ units, mean over seeds) and the share of it π_λ and the deployed policy capture, (V(π) − "
        "V_static) / (V_request − V_static), mean ± 95 % CI over seeds.\n\n"
        "| preset | objective | headroom (σ) | π_λ captures | deployed captures |\n|---|---|---:|---:|---:|\n"
        + "\n".join(capture_table(results, args))
        + "\n",
        "## The gap in absolute units\n\nThe gap start → oracle static in σ units (mean, min–max over seeds) and "
        "in clicks and long views per request; the deployed policy's shortfall from the oracle static value "
        "(σ units, mean ± 95 % CI); the median seed's gap closed; the gap closed (mean ± 95 % CI).\n\n"
        "| preset | objective | gap (σ) | Δ clicks / request | Δ long views / request | shortfall (σ) "
        "| median gap closed | gap closed |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(absolute_table(results, args))
        + "\n",
    ]
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
        sections.insert(
            2,
            f"## Old vs new: `{os.path.basename(args.baseline)}` vs this run\n\nGap closed by the deployed policy "
            "(mean ± 95 % CI over seeds), the baseline's runs against this page's, same presets, seeds and session "
            "budget; the oracle's best static vector's survival of halving (seeds) and g_λ = that vector (seeds).\n\n"
            "| preset | objective | baseline | this run | oracle vector survived | g_λ = oracle vector |\n"
            "|---|---|---:|---:|---:|---:|\n" + "\n".join(baseline_table(results, baseline, args)) + "\n",
        )
    save_plot(os.path.join(args.results_dir, "learning_utility_agent.png"), plot, results, args)
    write_results(os.path.join(args.results_dir, "learning_utility_agent.md"), sections, partial=False)


if __name__ == "__main__":
    main()
