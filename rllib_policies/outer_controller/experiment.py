"""Layered vs monolithic: train arms of OuterController on the simulator and measure them the same way.

``run_arm`` trains one (arm, seed) for ``iterations`` and evaluates the mean policy every
``eval_every`` iterations on the same simulated users (common random numbers across arms);
``summarise`` turns runs into per-arm means with 95 % t-intervals. Used by
benchmarks/layered_vs_monolithic.py (5 seeds) and by the main job (a brief run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .algorithm import OuterControllerConfig
from .rails import evaluate

# arm name → outer_controller options (the ablations switch one piece of the layered arm off)
ARMS: dict[str, dict] = {
    "layered": {"arm": "layered"},
    "monolithic": {"arm": "monolithic"},
    "layered_no_credit_attention": {"arm": "layered", "credit_attention": False},
    "layered_no_baseline": {"arm": "layered", "baseline": False},
    "layered_no_annealing": {"arm": "layered", "anneal": False},
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class ExperimentConfig:
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 2000}})
    iterations: int = 60
    sessions_per_iteration: int = 64
    eval_every: int = 5
    eval_sessions: int = 500
    final_eval_sessions: int = 2000
    kpi_weights: dict = field(default_factory=lambda: {"ndcg": 1.0, "return": 1.0, "revenue": 0.3})
    min_sessions_for_kpi: int = 512
    lr: float = 3e-3
    num_epochs: int = 4


@dataclass
class RunResult:
    arm: str
    seed: int
    iterations: list[int]
    ndcg_curve: list[float]
    train_seconds: list[float]          # cumulative training wall time at each evaluation
    final: dict                          # final evaluation (SessionSummary row)
    pg_noise_ratio: float                # median over iterations of the policy gradient's relative variance
    rollbacks: int


def build_config(arm: str, seed: int, exp: ExperimentConfig) -> OuterControllerConfig:
    from rllib_policies.envs import SessionEnv

    return (OuterControllerConfig()
            .environment(SessionEnv, env_config={**exp.env_config, "seed": seed})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
            .training(lr=exp.lr, num_epochs=exp.num_epochs)
            .debugging(seed=seed, log_level="ERROR")
            .outer_controller(**ARMS[arm], sessions_per_iteration=exp.sessions_per_iteration, kpi_weights=exp.kpi_weights,
                              min_sessions_for_kpi=exp.min_sessions_for_kpi, kl_rollback_threshold=None))


def run_arm(arm: str, seed: int, exp: ExperimentConfig, progress=print, on_trained=None) -> RunResult:
    """Train and evaluate one (arm, seed); ``on_trained(algo)`` runs before the algorithm stops."""
    algo = build_config(arm, seed, exp).build_algo()
    iters, curve, seconds, noise = [], [], [], []
    train_s = 0.0
    try:
        for i in range(exp.iterations + 1):
            if i % exp.eval_every == 0:
                iters.append(i)
                curve.append(evaluate(algo.get_module(), exp.env_config, exp.eval_sessions).ndcg_at_10)
                seconds.append(train_s)
            if i == exp.iterations:
                break
            t0 = time.perf_counter()
            result = algo.train()
            train_s += time.perf_counter() - t0
            noise.append(result["learners"]["default_policy"]["pg_noise_ratio"])
        final = evaluate(algo.get_module(), exp.env_config, exp.final_eval_sessions, name="final").row()
        rollbacks = int(algo.rollbacks)
        if on_trained is not None:
            on_trained(algo)
    finally:
        algo.stop()
    progress(f"  {arm:<28} seed {seed}: NDCG@10 {curve[0]:.3f} → {final['ndcg_at_10']:.3f}, "
             f"revenue {final['revenue_per_session']:.3f}, return {final['return_rate']:.3f}, {train_s:.1f} s")
    return RunResult(arm, seed, iters, curve, seconds, final, float(np.nanmedian(noise)), rollbacks)


def mean_ci(values) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(T_975.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v)))


def iterations_to_target(run: RunResult, target: float) -> tuple[float, float]:
    """(first evaluated iteration with NDCG ≥ target, training seconds by then); (nan, nan) if never."""
    for it, ndcg, s in zip(run.iterations, run.ndcg_curve, run.train_seconds):
        if ndcg >= target:
            return float(it), s
    return float("nan"), float("nan")


def summarise(runs: list[RunResult]) -> tuple[list[dict], float]:
    """Per-arm rows (means ± CI) and the NDCG target: start + 95 % of the way to the best arm's
    final mean (the learning curves start where the untrained policy is, about 0.7 here)."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    start = float(np.mean([r.ndcg_curve[0] for r in runs]))
    best = max(np.mean([r.ndcg_curve[-1] for r in runs if r.arm == a]) for a in arms)
    target = start + 0.95 * (best - start)
    rows = []
    for a in arms:
        rs = [r for r in runs if r.arm == a]
        reach = [iterations_to_target(r, target) for r in rs]
        reached = [x for x in reach if np.isfinite(x[0])]
        row = {"arm": a, "seeds": len(rs), "reached_target": f"{len(reached)}/{len(rs)}",
               "ndcg_seed_var": float(np.var([r.final["ndcg_at_10"] for r in rs], ddof=1)) if len(rs) > 1 else float("nan")}
        for key, values in {
            "iters_to_target": [x[0] for x in reached], "seconds_to_target": [x[1] for x in reached],
            "ndcg_at_10": [r.final["ndcg_at_10"] for r in rs], "revenue_per_session": [r.final["revenue_per_session"] for r in rs],
            "return_rate": [r.final["return_rate"] for r in rs], "ctr": [r.final["ctr"] for r in rs],
            "pg_noise_ratio": [r.pg_noise_ratio for r in rs],
        }.items():
            row[key] = mean_ci(values) if values else (float("nan"), float("nan"))
        rows.append(row)
    return rows, target
