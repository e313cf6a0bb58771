"""CRM's learned weight policy vs the logging mean and the world's oracle (issue 14, item 7).

Per seed: fresh Gaussian-logged sessions around μ₀ = (1, 1, 10) (log-space σ₀), users split train /
validation / test, CRM (rllib_policies.crm) trained on train, do no harm on validation, and on the test
states the world's exact value of each policy, its OPE estimate on the test rows, and the gap closed
(final − start)/(oracle − start), start = V(μ₀), oracle = the best static weights on the simplex grid.
Writes the "Learned weight policy" section of benchmarks/results/crm_ope.md (between its markers) and
benchmarks/results/crm_policy.png.

    .venv/bin/python benchmarks/crm.py                 # 5 seeds, ≈ 10 min on 2 shared cores
    .venv/bin/python benchmarks/crm.py --seeds 1 --sessions 1000 --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from actors.world.metrics import mean_ci
from benchmarks.common import save_plot, write_marked_section
from rllib_policies.crm.experiment import CRMExperiment, run_experiment
from rllib_policies.jobs import init_ray

RESULTS = Path(__file__).parent / "results"
ROWS = {
    "logging_mean": "logging mean μ₀ = (1, 1, 10), deterministic",
    "logging_policy": "logging policy q (Gaussian around μ₀)",
    "learned_policy": "learned π_θ (Gaussian N(m_θ(x), σ_θ²I))",
    "learned_mean": "learned mean weights exp(m_θ(x)), deterministic (never certified, never served)",
    "learned_mean_jitter": "learned mean with jitter h, N(m_θ(x), h²I)",
    "deployed": "**deployed** = the certified policy (after do no harm)",
    "frozen_deployed": "frozen (untrained) policy after do no harm",
    "oracle_static": "oracle: best static weights",
    "oracle_request": "oracle: best weights per request",
}


def ci(values) -> tuple[float, float]:
    """``mean_ci`` (mean, 95 % Student-t half-width) over the seeds where the value is finite."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return mean_ci(v) if len(v) else (float("nan"), float("nan"))


def fmt(mean_half: tuple[float, float], digits: int = 4) -> str:
    m, h = mean_half
    return "—" if not np.isfinite(m) else f"{m:.{digits}f} ± {h:.{digits}f}" if np.isfinite(h) else f"{m:.{digits}f}"


def markdown(runs: list[dict], cfg: CRMExperiment, wall: float) -> str:
    n = len(runs)
    lines = [
        "## Learned weight policy",
        "",
        f"`benchmarks/crm.py` — {n} seeds; per seed {cfg.sessions} Gaussian-logged sessions on the "
        f"{cfg.env_config['world']} world (log w ~ N(log μ₀, {cfg.logging_sigma:g}²·I) truncated to "
        "[log(10⁻³·high), log high]³)"
        + (
            ""
            if cfg.rounds == 1
            else f" in {cfg.rounds} rounds: round 1 ({runs[0]['data']['rounds'][0]['sessions']} sessions) around μ₀, "
            "then CRM fitted on round 1's train rows and round 2 logged around its learned mean "
            f"(σ {cfg.round_sigma:g}; learned means "
            + ", ".join(
                "(" + ", ".join(f"{w:.2g}" for w in r["data"]["rounds"][1]["logging_weights"]) + ")" for r in runs
            )
            + "), every row with the rounds' mixture density"
        )
        + ", users split train / validation / test by a fixed hash "
        f"({1 - cfg.validation - cfg.test:.0%} / {cfg.validation:.0%} / {cfg.test:.0%}). Objective per request "
        f"r = λ·clicks/σ_clicks + (1 − λ)·long_views/σ_long_views, λ = {cfg.lam:g} (σ from the training rows). "
        f"CRM: {cfg.iterations} × {cfg.steps_per_iteration} full-batch Adam steps (lr {cfg.lr:g}) on "
        f"J = V̂_SNIPS − z·SE − κ·barrier(ESS/n ≥ {cfg.min_ess_fraction:g}), z = Φ⁻¹({cfg.confidence:g}), "
        f"ℓ₂ = {cfg.l2:g} on the context weights. Exact values: the world's expectations on the test states "
        f"(π_θ by {cfg.policy_draws} draws per state); oracle grid: simplex resolution {cfg.oracle_resolution}. "
        f"Mean ± 95 % CI over seeds. Wall time {wall:.0f} s (one process, 2 shared cores).",
        "",
        "| policy | exact value | gap closed | OPE estimate on test rows [95 % interval] | OPE ESS |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in ROWS.items():
        exact = ci([r["exact"][key] for r in runs])
        gap = ci([r["gap_closed"][key] for r in runs])
        ope = [r["ope"].get(key) for r in runs]
        if all(o is not None for o in ope):
            mean = {k: np.mean([o[k] for o in ope]) for k in ("estimate", "low", "high")}
            est = f"{mean['estimate']:.4f} [{mean['low']:.4f}, {mean['high']:.4f}]"
            ess = f"{np.mean([o['ess'] for o in ope]):.0f}"
        else:
            est = ess = "—"
        gap_s = "0 (start)" if key == "logging_mean" else fmt(gap, 2)
        lines.append(f"| {label} | {fmt(exact)} | {gap_s} | {est} | {ess} |")
    deployed = sum(r["decision"]["deploy"] for r in runs)
    align = [(r["ope"]["learned_policy"]["estimate"], r["exact"]["learned_policy"]) for r in runs]
    covered = sum(
        r["ope"]["learned_policy"]["low"] <= r["exact"]["learned_policy"] <= r["ope"]["learned_policy"]["high"]
        for r in runs
    )
    lines += [
        "",
        "OPE estimates of deterministic weights (logging mean, learned mean, oracle) are KernelSNIPS with "
        "bandwidth 0.3 (they estimate the value smoothed by N(0, 0.3²I) and have small ESS); the stochastic "
        "policies' (π_θ, jittered mean, deployed) are DensityRatioSNIPS with the ESS-corrected interval. "
        "Stochastic policies' exact values: the world's expectations averaged over their draws; the deployed "
        "row is the exact value of the very policy do no harm certified (same draws as its own row).",
        "",
        "- Do no harm (validation rows; candidates in order: the mean with jitter h = "
        + ", ".join(f"{h:g}" for h in (cfg.mean_jitter, *cfg.wider_jitters))
        + (" (scale-aligned)" if cfg.align_scale else "")
        + ", then π_θ, "
        "each certified iff its paired, user-clustered, ESS-corrected one-sided lower bound of V(candidate) − V(q) "
        f"> 0 at level {runs[0]['decision']['level']:g} (Bonferroni over {2 + len(cfg.wider_jitters)} candidates "
        "for overall "
        f"{cfg.do_no_harm_level:g}); none → q): a learned policy deployed in {deployed} of {n} seeds. Per seed: "
        + "; ".join(
            f"seed {r['config']['seed']}: **{r['decision']['deployed']}** ("
            + ", ".join(
                f"{k} {c['difference_low']:+.4f}" if np.isfinite(c["difference_low"]) else f"{k} abstained"
                for k, c in r["decision"]["certificates"].items()
            )
            + f"; gap closed {r['gap_closed']['deployed']:.2f})"
            for r in runs
        )
        + ".",
        "- Alignment, π_θ's offline estimate vs simulator truth per seed: "
        + "; ".join(f"{e:.4f} vs {t:.4f}" for e, t in align)
        + f" — mean error {np.mean([e - t for e, t in align]):+.4f}; interval covers the truth in {covered} of {n}.",
        "- Learned mean weights (average over test states, per seed): "
        + "; ".join("(" + ", ".join(f"{w:.3g}" for w in r["learned_weights_mean"]) + ")" for r in runs)
        + "; the oracle's best static weights (simplex): "
        + "; ".join("(" + ", ".join(f"{w:.2f}" for w in r["oracle_weights"]) + ")" for r in runs)
        + ". Scale is free (ranking by Σ w·p is invariant to w → c·w).",
        f"- Rows per seed (train / validation / test): {runs[0]['data']['train_rows']} / "
        f"{runs[0]['data']['validation_rows']} / {runs[0]['data']['test_rows']} (seed 0); wall time per seed "
        + ", ".join(f"{r['wall_s']['total']:.0f} s" for r in runs)
        + ".",
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, runs: list[dict]) -> None:
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the headless backend

    keys = ["logging_policy", "learned_policy", "learned_mean_jitter", "learned_mean", "deployed", "oracle_request"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, r in enumerate(runs):
        ax.scatter(np.arange(len(keys)) + 0.06 * (j - len(runs) / 2), [r["gap_closed"][k] for k in keys], s=18)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="oracle best static")
    ax.axhline(0.8, color="r", lw=0.8, ls=":", label="target 80 %")
    ax.axhline(0.0, color="grey", lw=0.8, label="logging mean μ₀")
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
    ax.set_ylabel("gap closed (exact, test states)")
    ax.set_title(f"CRM weight policy, {len(runs)} seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=CRMExperiment.sessions)
    parser.add_argument("--iterations", type=int, default=CRMExperiment.iterations)
    parser.add_argument(
        "--rounds",
        type=int,
        default=CRMExperiment.rounds,
        help="logging rounds (2: round 2 logs around round 1's learned mean)",
    )
    parser.add_argument("--round-sigma", type=float, default=CRMExperiment.round_sigma)
    parser.add_argument(
        "--no-align-scale", dest="align_scale", action="store_false", help="candidates not scale-aligned"
    )
    parser.add_argument(
        "--wider-jitters",
        type=lambda v: tuple(float(x) for x in v.split(",") if x),
        default=CRMExperiment.wider_jitters,
        help='e.g. 0.6,1.0; "": none',
    )
    parser.add_argument(
        "--tag",
        default="",
        help="a variant's name: its section \"crm_TAG\" and crm_policy_TAG.png, beside the default run's",
    )
    parser.add_argument("--quick", action="store_true", help="no files written")
    args = parser.parse_args()
    init_ray(2)
    start = time.time()
    runs = []
    for seed in range(args.seeds):
        cfg = CRMExperiment(
            sessions=args.sessions,
            iterations=args.iterations,
            rounds=args.rounds,
            round_sigma=args.round_sigma,
            align_scale=args.align_scale,
            wider_jitters=args.wider_jitters,
            ray_data=False,
            seed=seed,
        )
        with tempfile.TemporaryDirectory() as work:
            runs.append(run_experiment(cfg, work))
        r = runs[-1]
        print(
            f"seed {seed}: deployed {r['decision']['deployed']}, gap closed {r['gap_closed']['deployed']:.3f}; "
            f"jittered mean {r['gap_closed']['learned_mean_jitter']:.3f}, learned mean "
            f"{r['gap_closed']['learned_mean']:.3f}, π_θ {r['gap_closed']['learned_policy']:.3f}; "
            f"{r['decision']['reason']}; {r['wall_s']['total']:.0f} s",
            flush=True,
        )
    wall = time.time() - start
    section = markdown(runs, cfg, wall)
    if args.tag:
        section = section.replace("## Learned weight policy", f"## Learned weight policy: {args.tag}", 1)
    print(section)
    if args.quick:
        return
    suffix = f"_{args.tag}" if args.tag else ""
    write_marked_section(str(RESULTS / "crm_ope.md"), f"crm{suffix}", section, "CRM off-policy evaluation")
    save_plot(RESULTS / f"crm_policy{suffix}.png", plot, runs)
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
