"""Empirical coverage of the OPE intervals (rllib_policies.ope) on synthetic bandits with known values.

For each estimator × target distance × n: R fresh logged tables, the share of (non-abstained) intervals
that hold the true value, their mean width and the abstain rate, under the default abstain rule.
Then a sample-size sweep without abstaining: the smallest n from which the normal and the ESS-corrected
interval reach nominal coverage (≥ nominal − 1 point at every larger n of the sweep), beside Jeunen et al.'s
"up to 60× fewer samples" claim for the ESS correction.

Writes the "Coverage" section of benchmarks/results/crm_ope.md (between its coverage markers; other sections kept) and
benchmarks/results/crm_ope_coverage.png.

    .venv/bin/python benchmarks/ope_coverage.py            # ≈ minutes on one core
    .venv/bin/python benchmarks/ope_coverage.py --repeats 100 --quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import save_plot, write_marked_section
from rllib_policies.ope import (
    DR,
    IPS,
    SNIPS,
    AbstainRule,
    Bootstrap,
    DensityRatioIPS,
    DensityRatioSNIPS,
    EssCorrected,
    KernelSNIPS,
    Normal,
)
from rllib_policies.ope.synthetic import GridBandit, WeightBandit, measure_coverage

RESULTS = Path(__file__).parent / "results"
GRID, WEIGHT = GridBandit(), WeightBandit()
NEAR_FAR = {"grid": {"near": 0.3, "far": 1.0}, "weight": {"near": 0.2, "far": 0.8}}
INTERVALS = {"normal": Normal(), "bootstrap": Bootstrap(n_boot=200), "ess_corrected": EssCorrected()}


def setting(name: str, distance: str, truth_draws: int):
    """(bandit, truth, target_of(data), estimator classes) for one bandit family and target distance."""
    d = NEAR_FAR["grid" if name in ("ips", "snips", "dr") else "weight"][distance]
    if name in ("ips", "snips", "dr"):
        cls = {"ips": IPS, "snips": SNIPS, "dr": DR}[name]
        return GRID, GRID.value(d, truth_draws), (lambda data: GRID.target(d)), cls
    if name == "kernel_snips":  # deterministic target: its truth is the unsmoothed value (the bandwidth's bias shows)
        return WEIGHT, WEIGHT.deterministic_value(d, truth_draws), (lambda data: WEIGHT.deterministic_target(d)), None
    cls = {"density_ratio_ips": DensityRatioIPS, "density_ratio_snips": DensityRatioSNIPS}[name]
    return WEIGHT, WEIGHT.value(d, truth_draws), (lambda data: WEIGHT.target(data.context, d)), cls


def runner(estimator, target_of):
    """data → the estimator's Estimate of its target."""
    return lambda data: estimator.estimate(data, target_of(data))


def make(name: str, cls, interval, abstain):
    if name == "kernel_snips":
        return KernelSNIPS(bandwidth=0.3, interval=interval, abstain=abstain)
    return cls(interval=interval, abstain=abstain)


def coverage_table(args) -> list[dict]:
    rows = []
    for name in args.estimators:
        for distance in ("near", "far"):
            bandit, truth, target_of, cls = setting(name, distance, args.truth_draws)
            for n in args.n:
                estimators = {
                    label: runner(make(name, cls, interval, AbstainRule()), target_of)
                    for label, interval in INTERVALS.items()
                }
                cov = measure_coverage(lambda rng, n=n, b=bandit: b.logs(n, rng), estimators, truth, args.repeats)
                for label, c in cov.items():
                    rows.append(
                        dict(
                            estimator=name,
                            distance=distance,
                            n=n,
                            interval=label,
                            coverage=c.coverage,
                            width=c.mean_width,
                            abstain=c.abstain_rate,
                            kept=c.valid,
                            ess=c.mean_ess,
                        )
                    )
                    print(
                        f"{name:20s} {distance:4s} n={n:6d} {label:14s} cover={c.coverage:6.3f} "
                        f"width={c.mean_width:7.4f} abstain={c.abstain_rate:5.2f} ess={c.mean_ess:8.1f}",
                        flush=True,
                    )
    return rows


def sweep(args) -> dict:
    """Coverage vs n without abstaining (normal vs ESS-corrected) for the far targets."""
    out = {}
    never = AbstainRule(min_ess=0, min_ess_fraction=0)
    for name in ("snips", "density_ratio_snips"):
        bandit, truth, target_of, cls = setting(name, "far", args.truth_draws)
        curves = {label: [] for label in ("normal", "ess_corrected")}
        ess = []
        for n in args.sweep_n:
            estimators = {label: runner(cls(interval=INTERVALS[label], abstain=never), target_of) for label in curves}
            cov = measure_coverage(lambda rng, n=n, b=bandit: b.logs(n, rng), estimators, truth, args.repeats, seed=1)
            for label in curves:
                curves[label].append(cov[label].coverage)
            ess.append(cov["normal"].mean_ess)
            print(
                f"sweep {name:20s} n={n:6d} ESS={ess[-1]:8.1f} "
                + " ".join(f"{k}={v[-1]:.3f}" for k, v in curves.items()),
                flush=True,
            )
        out[name] = dict(curves=curves, ess=ess, reach={k: reach(args.sweep_n, v, 0.95) for k, v in curves.items()})
    return out


def reach(ns, coverage, nominal: float, slack: float = 0.01):
    """Smallest n of the sweep from which coverage ≥ nominal − slack at every larger n (None: never)."""
    ok = np.asarray(coverage) >= nominal - slack
    for i in range(len(ns)):
        if ok[i:].all():
            return ns[i]
    return None


def markdown(rows, swept, args, wall: float) -> str:
    lines = [
        "## Coverage",
        "",
        f"`benchmarks/ope_coverage.py` — {args.repeats} fresh logged tables per cell, nominal level 95 %, "
        f"default abstain rule (ESS < 100 or ESS/n < 1 %); truths by one Monte-Carlo draw of "
        f"{args.truth_draws:,} contexts. Wall time {wall:.0f} s on one core.",
        "",
        "Bandits (rllib_policies/ope/synthetic.py): *grid* = linear contextual bandit, 5 actions, logging prefers "
        "the worse actions (20 % uniform floor); near target ε = 0.3, far ε = 1 (deterministic greedy). *weight* = "
        "actions are log-weight vectors in ℝ², truncated-Gaussian logging on [−2, 2]²; near target mean shift "
        "δ = 0.2, far δ = 0.8. kernel_snips evaluates the deterministic target with bandwidth h = 0.3 against its "
        "unsmoothed value (the bandwidth's bias is visible as under-coverage).",
        "",
        "Coverage is among the *kept* (non-abstained) estimates (— when every repeat abstained). Where the "
        "abstain rule bites on part of the repeats (ESS near the threshold, e.g. grid near n = 200), the kept "
        "ones cover less than nominal: the ESS is high exactly when the rare heavy-weight rows are missing, so "
        "the estimate and the ESS are correlated (a selection effect). The level is claimed (and tested in "
        "tests/rllib_policies/test_ope.py) where the rule keeps ≥ 90 % of the repeats.",
        "",
        "| estimator | target | n | interval | coverage | kept | mean width | abstain rate | mean ESS |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cov = "—" if np.isnan(r["coverage"]) else f"{r['coverage']:.3f}"
        width = "—" if np.isnan(r["width"]) else f"{r['width']:.4f}"
        lines.append(
            f"| {r['estimator']} | {r['distance']} | {r['n']} | {r['interval']} | {cov} | {r['kept']} | {width} | "
            f"{r['abstain']:.2f} | {r['ess']:.0f} |"
        )
    lines += [
        "",
        "### Sample size to nominal coverage (far targets, no abstaining)",
        "",
        "Smallest n of the sweep from which coverage ≥ 94 % at every larger n. Jeunen et al. report the "
        "ESS correction reaching nominal coverage with up to 60× fewer samples; measured here:",
        "",
        "| estimator | " + " | ".join(f"n={n}" for n in args.sweep_n) + " | reaches 94 % at |",
        "|---|" + "---:|" * (len(args.sweep_n) + 1),
    ]
    for name, s in swept.items():
        lines.append(f"| ({name}: mean ESS) | " + " | ".join(f"{e:.0f}" for e in s["ess"]) + " | |")
        for label, curve in s["curves"].items():
            n_reach = s["reach"][label]
            lines.append(
                f"| {name} {label} | "
                + " | ".join(f"{c:.3f}" for c in curve)
                + f" | {n_reach if n_reach is not None else 'not within the sweep'} |"
            )
        a, b = s["reach"]["normal"], s["reach"]["ess_corrected"]
        ratio = f"{a / b:.1f}×" if a and b else "n/a"
        lines.append(f"| {name}: normal / ESS-corrected sample size | " + " | " * len(args.sweep_n) + f"{ratio} |")
    lines.append("")
    return "\n".join(lines)


def plot(path: Path, swept: dict, args) -> None:
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the headless backend

    fig, axes = plt.subplots(1, len(swept), figsize=(5.5 * len(swept), 4), sharey=True)
    for ax, (name, s) in zip(np.atleast_1d(axes), swept.items()):
        for label, curve in s["curves"].items():
            ax.plot(args.sweep_n, curve, marker="o", label=label)
        ax.axhline(0.95, color="k", lw=0.8, ls="--", label="nominal 95 %")
        ax.set_xscale("log")
        ax.set_xlabel("logged rows n")
        ax.set_title(f"{name}, far target ({args.repeats} repeats)", fontsize=9)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("empirical coverage")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--n", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--sweep-n", type=int, nargs="+", default=[30, 60, 125, 250, 500, 1000, 2000, 4000, 8000])
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=["ips", "snips", "dr", "density_ratio_ips", "density_ratio_snips", "kernel_snips"],
    )
    parser.add_argument("--truth-draws", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="fewer cells, no files written")
    args = parser.parse_args()
    if args.quick:
        args.n, args.sweep_n, args.estimators, args.truth_draws = [500], [100, 1000], ["snips"], 200_000
    start = time.time()
    rows = coverage_table(args)
    swept = sweep(args)
    wall = time.time() - start
    section = markdown(rows, swept, args, wall)
    print(section)
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    write_marked_section(str(RESULTS / "crm_ope.md"), "coverage", section, "CRM off-policy evaluation")
    save_plot(RESULTS / "crm_ope_coverage.png", plot, swept, args)
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
