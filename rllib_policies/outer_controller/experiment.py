"""Layered vs monolithic: train arms of OuterController on the simulator and measure them the same way.

``run_arm`` trains one (arm, seed) for ``iterations`` and evaluates the mean policy every
``eval_every`` iterations on the same simulated users (common random numbers across arms);
``summarise`` turns runs into per-arm means with 95 % t-intervals. Used by
benchmarks/layered_vs_monolithic.py (5 seeds) and by the main job (a brief run).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from actors.cascade import build_world
from actors.world import seed_sequence
from actors.world.metrics import gap_closed, mean_ci
from actors.world.oracle import (
    Family,
    SessionObjective,
    head_means,
    ranking_grid,
    sample_states,
    session_headroom,
    simulate_policy_sessions,
    static_policy,
)
from rllib_policies.envs import SessionEnv

from .algorithm import OuterControllerConfig, ranking_mean_policy
from .rails import evaluate

# arm name → outer_controller options (the ablations switch one piece of the layered arm off)
ARMS: dict[str, dict] = {
    "layered": {"arm": "layered"},
    "monolithic": {"arm": "monolithic"},
    "layered_no_credit_attention": {"arm": "layered", "credit_attention": False},
    "layered_no_baseline": {"arm": "layered", "baseline": False},
    "layered_no_annealing": {"arm": "layered", "anneal": False},
}


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
    trust_region_kl: float | None = None  # the published layered_vs_monolithic run had none
    promote: bool = False  # do no harm after training: keep π only if it beats its start (algo.promote)


@dataclass
class RunResult:
    arm: str
    seed: int
    iterations: list[int]
    ndcg_curve: list[float]
    objective_curve: list[float]  # the business objective J (business_objective) at each evaluation
    train_seconds: list[float]  # cumulative training wall time at each evaluation
    final: dict  # final evaluation (SessionSummary row)
    start_final: dict  # the untrained policy on the final evaluation's users
    pg_noise_ratio: float  # median over iterations of the policy gradient's relative variance
    rollbacks: int
    promoted: str | None = None  # "trained" or "start" when the experiment ran the do-no-harm check


def build_config(arm: str, seed: int, exp: ExperimentConfig) -> OuterControllerConfig:
    return (
        OuterControllerConfig()
        .environment(SessionEnv, env_config={**exp.env_config, "seed": seed})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
        .training(lr=exp.lr, num_epochs=exp.num_epochs)
        .debugging(seed=seed, log_level="ERROR")
        .outer_controller(
            **ARMS[arm],
            sessions_per_iteration=exp.sessions_per_iteration,
            kpi_weights=exp.kpi_weights,
            min_sessions_for_kpi=exp.min_sessions_for_kpi,
            kl_rollback_threshold=None,
            trust_region_kl=exp.trust_region_kl,
        )
    )


KPI_COLUMNS = {"ndcg": "ndcg_at_10", "return": "return_rate", "revenue": "revenue_per_session", "clicks": "ctr"}


def business_objective(row: dict, kpi_weights: dict) -> float:
    """J = Σ_k w_k·KPI_k on an evaluation (NDCG@10, next-day return rate, revenue per session, CTR):
    the KPI blend both arms are trained for, measured on the same simulated users."""
    return float(sum(w * row[KPI_COLUMNS[k]] for k, w in kpi_weights.items()))


def run_arm(arm: str, seed: int, exp: ExperimentConfig, progress=print, on_trained=None) -> RunResult:
    """Train and evaluate one (arm, seed); ``on_trained(algo)`` runs before the algorithm stops."""
    algo = build_config(arm, seed, exp).build_algo()
    iters, curve, objective, seconds, noise = [], [], [], [], []
    train_s = 0.0
    try:
        start_final = evaluate(algo.get_module(), exp.env_config, exp.final_eval_sessions, name="final").row()
        for i in range(exp.iterations + 1):
            if i % exp.eval_every == 0:
                iters.append(i)
                row = evaluate(algo.get_module(), exp.env_config, exp.eval_sessions).row()
                curve.append(row["ndcg_at_10"])
                objective.append(business_objective(row, exp.kpi_weights))
                seconds.append(train_s)
            if i == exp.iterations:
                break
            t0 = time.perf_counter()
            result = algo.train()
            train_s += time.perf_counter() - t0
            noise.append(result["learners"]["default_policy"]["pg_noise_ratio"])
        promoted = algo.promote()["promoted"] if exp.promote else None
        final = evaluate(algo.get_module(), exp.env_config, exp.final_eval_sessions, name="final").row()
        rollbacks = int(algo.rollbacks)
        if on_trained is not None:
            on_trained(algo)
    finally:
        algo.stop()
    progress(
        f"  {arm:<28} seed {seed}: NDCG@10 {start_final['ndcg_at_10']:.3f} → {final['ndcg_at_10']:.3f}, "
        f"revenue {start_final['revenue_per_session']:.3f} → {final['revenue_per_session']:.3f}, return "
        f"{start_final['return_rate']:.3f} → {final['return_rate']:.3f}, J {objective[0]:.3f} → {objective[-1]:.3f}, "
        f"{train_s:.1f} s"
    )
    return RunResult(
        arm, seed, iters, curve, objective, seconds, final, start_final, float(np.nanmedian(noise)), rollbacks, promoted
    )


def iterations_to_target(run: RunResult, target: float | None, curve: str = "objective_curve") -> tuple[float, float]:
    """(first evaluated iteration with the curve ≥ target, training seconds by then); (nan, nan) if
    never or if there is no target."""
    if target is None:
        return float("nan"), float("nan")
    for it, value, s in zip(run.iterations, getattr(run, curve), run.train_seconds):
        if value >= target:
            return float(it), s
    return float("nan"), float("nan")


def target_for(runs: list[RunResult], curve: str) -> tuple[float | None, float, float]:
    """(target, start, best): start = mean first point, best = the best arm's mean last point, target =
    start + 95 % of the way to best; None when no arm ends above its start (nothing converges upward)."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    start = float(np.mean([getattr(r, curve)[0] for r in runs]))
    best = max(np.mean([getattr(r, curve)[-1] for r in runs if r.arm == a]) for a in arms)
    return (start + 0.95 * (best - start) if best > start else None), start, float(best)


def summarise(runs: list[RunResult]) -> tuple[list[dict], dict]:
    """Per-arm rows (means ± CI) and the convergence targets on the business objective J and on
    NDCG@10 (see target_for): iterations and seconds to reach them per arm."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    targets = {c: target_for(runs, c) for c in ("objective_curve", "ndcg_curve")}
    rows = []
    for a in arms:
        rs = [r for r in runs if r.arm == a]
        reach = [iterations_to_target(r, targets["objective_curve"][0]) for r in rs]
        reach_ndcg = [iterations_to_target(r, targets["ndcg_curve"][0], "ndcg_curve") for r in rs]
        reached = [x for x in reach if np.isfinite(x[0])]
        row = {
            "arm": a,
            "seeds": len(rs),
            "reached_target": f"{len(reached)}/{len(rs)}",
            "ndcg_seed_var": float(np.var([r.final["ndcg_at_10"] for r in rs], ddof=1))
            if len(rs) > 1
            else float("nan"),
        }
        for key, values in {
            "iters_to_target": [x[0] for x in reached],
            "seconds_to_target": [x[1] for x in reached],
            "iters_to_ndcg_target": [x[0] for x in reach_ndcg if np.isfinite(x[0])],
            "objective": [r.objective_curve[-1] for r in rs],
            "objective_gain": [r.objective_curve[-1] - r.objective_curve[0] for r in rs],
            "ndcg_at_10": [r.final["ndcg_at_10"] for r in rs],
            "ndcg_gain": [r.final["ndcg_at_10"] - r.start_final["ndcg_at_10"] for r in rs],
            "revenue_per_session": [r.final["revenue_per_session"] for r in rs],
            "return_rate": [r.final["return_rate"] for r in rs],
            "ctr": [r.final["ctr"] for r in rs],
            "pg_noise_ratio": [r.pg_noise_ratio for r in rs],
        }.items():
            row[key] = mean_ci(values) if values else (float("nan"), float("nan"))
        rows.append(row)
    return rows, targets


# ---------------------------------------------------------------------------------------------- learning test
# arm → outer_controller options that make it optimise the business objective J alone from its first
# iteration: the KPI gate open (min_sessions_for_kpi = 0), the layered arm at κ = κ_end = 1 (the credited
# KPI alone) and the monolithic arm with the inner reward's weight β = 0 (the inner reward does not rank by J).
LEARNING_ARMS: dict[str, dict] = {
    "layered": {"arm": "layered", "min_sessions_for_kpi": 0, "anneal": False, "kappa_end": 1.0},
    "monolithic": {"arm": "monolithic", "min_sessions_for_kpi": 0, "inner_reward_weight": 0.0},
}
CLICK_ONLY = (1.0, 0.0, 0.0)


@dataclass
class LearningSpec:
    """A learning test: start every seed at ``start`` (ranking weights), train ``iterations`` ×
    ``sessions_per_iteration`` sessions, and measure J on ``eval_sessions`` fixed simulated users with
    common random numbers (``actors.world.oracle.simulate_policy_sessions``) every ``eval_every``."""

    env_config: dict = field(default_factory=lambda: {"preset": "default", "world": {"n_items": 5000, "n_users": 2000}})
    start: tuple = CLICK_ONLY
    iterations: int = 25  # + the restart's (K + 1)·32 = 288 simulated sessions: 1 888 sessions in all
    sessions_per_iteration: int = 64
    eval_every: int = 15
    eval_sessions: int = 400
    eval_seed: int = 7
    kpi_weights: dict = field(default_factory=lambda: {"ndcg": 1.0, "return": 1.0, "revenue": 0.3})
    lr: float = 3e-2
    num_epochs: int = 4
    trust_region_kl: float | None = 0.1
    options: dict = field(default_factory=dict)  # more outer_controller options (override the arm's)
    # RankingPolicyModule options. σ_u = 6: from a click-only corner, J is flat for ~7 logit units
    # (purchase weight has no effect until w_purchase·p_purchase rivals w_click·p_click), so the
    # exploration must reach across that plateau to see any gradient (docs/outer_controller.md).
    # σ_u is floored at its start and m(s) bounded to |m| ≤ 8: J's local gradient at the click-only corner
    # points back into it (revenue falls before NDCG rises); a shrinking σ, or a mean that runs 35 logit units
    # deep into the corner (measured), leaves the other corners out of the exploration's reach.
    model_config: dict = field(default_factory=lambda: {"init_std": 6.0, "min_std": 6.0, "max_logit": 8.0})
    personalisation_l2: float = 0.1  # shrink μ(s) toward one action for all states (OuterControllerConfig)
    # discount of the per-step streams. 0: each request is credited with the NDCG and revenue it
    # earned itself, plus the session's return (both arms); γ → 1 adds the noise of every later request's draw.
    gamma: float = 0.0
    # one exploration draw per session (OuterControllerConfig.exploration): the session's J then answers one
    # direction. Per-request draws credit the session's return to T independent directions, and the
    # gradient's signal-to-noise ratio at the click-only start stayed near 1 (docs/outer_controller.md).
    exploration: str = "session"
    # weigh each KPI's share of the gradient by its signal-to-noise ratio on the batch
    # (OuterControllerConfig.kpi_shrinkage): the next-day return's coin flip and a rare purchase's revenue
    # add most of J's variance per session but little of its gradient at the start
    kpi_shrinkage: bool = True
    # exploratory restart before the first batch (OuterControllerConfig.restart_directions): the start and K
    # candidates 2σ_u away serve the same simulated users; the mean moves to the best. Measured: without it
    # 3 of 15 runs ended on the click / long-view edge or at the start (the tanh bound's flat tails hold a
    # mean that reached an edge), and which edge a run reached depended on the first iterations' noise.
    restart_directions: int = 8
    restart_sessions: int = 32

    def eval_users(self) -> np.ndarray:
        world, _ = build_world(self.env_config)
        return seed_sequence(self.eval_seed, "learning-eval-users").integers(0, world.users.n, self.eval_sessions)

    def objective(self, kpis: dict) -> np.ndarray:
        return SessionObjective(self.kpi_weights)(kpis)


@dataclass
class LearningRun:
    arm: str
    seed: int
    sessions: list[int]  # training sessions at each evaluation (the restarts' simulated sessions included)
    objective_curve: list[float]  # mean J on the evaluation users at each evaluation
    gap_closed_curve: list[float]  # (J − J_start) / (J_static − J_start) at each evaluation
    final_action_mean: list[float]  # mean μ(s) over the last batch's states
    train_seconds: float
    promotion: dict | None
    trust_region: dict  # means over iterations: KL(π_old ‖ π_new), epochs run, fraction backtracked


def policy_objective(spec: LearningSpec, module) -> np.ndarray:
    """J per evaluation session [n] of the module's mean action μ(s)."""
    _, pipeline = build_world(spec.env_config)
    kpis = simulate_policy_sessions(pipeline, ranking_mean_policy(module, pipeline), spec.eval_users(), spec.eval_seed)
    return spec.objective(kpis)


def static_objective(spec: LearningSpec, weights) -> np.ndarray:
    """J per evaluation session [n] of one static ranking-weight vector (same users and random numbers)."""
    _, pipeline = build_world(spec.env_config)
    kpis = simulate_policy_sessions(pipeline, static_policy("ranking", weights), spec.eval_users(), spec.eval_seed)
    return spec.objective(kpis)


def oracle_static(spec: LearningSpec, n_sessions: int = 300, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The oracle's best static ranking weights for J (``session_headroom`` over the resolution-2
    simplex of the heads' contribution shares plus the start), then its J on the evaluation users."""
    _, pipeline = build_world(spec.env_config)
    scale = head_means(pipeline, sample_states(pipeline, 200, 2, seed=seed))
    family = Family.ranking(ranking_grid(2, scale))
    h = session_headroom(pipeline, family, SessionObjective(spec.kpi_weights), n_sessions, seed, reference=spec.start)
    weights = family.with_action(spec.start)[0].stage_grid("ranking")[h.static_action]
    return weights, {"static": h.static, "reference": h.reference, "n_actions": h.n_actions}


def learning_config(arm: str, seed: int, spec: LearningSpec, lr: float | None = None) -> OuterControllerConfig:
    return (
        OuterControllerConfig()
        .environment(SessionEnv, env_config={**spec.env_config, "seed": seed})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
        .training(lr=spec.lr if lr is None else lr, num_epochs=spec.num_epochs, gamma=spec.gamma)
        .debugging(seed=seed, log_level="ERROR")
        .rl_module(model_config={**spec.model_config, "init_action": list(spec.start)})
        .outer_controller(
            **{
                **LEARNING_ARMS[arm],
                "sessions_per_iteration": spec.sessions_per_iteration,
                "kpi_weights": spec.kpi_weights,
                "trust_region_kl": spec.trust_region_kl,
                "personalisation_l2": spec.personalisation_l2,
                "exploration": spec.exploration,
                "kpi_shrinkage": spec.kpi_shrinkage,
                "restart_directions": spec.restart_directions,
                "restart_sessions": spec.restart_sessions,
                **spec.options,
            }
        )
    )


def run_learning(
    arm: str,
    seed: int,
    spec: LearningSpec,
    j_static: float,
    lr: float | None = None,
    promote_sessions: int | None = None,
    progress=print,
) -> LearningRun:
    """Train one (arm, seed) from ``spec.start``; the gap closed is measured against ``j_static`` (the
    oracle's best static J on the evaluation users). ``promote_sessions``: run the do-no-harm check."""
    algo = learning_config(arm, seed, spec, lr).build_algo()
    sessions, curve, train_s, steps = [], [], 0.0, []
    try:
        for i in range(spec.iterations + 1):
            if i % spec.eval_every == 0 or i == spec.iterations:
                sessions.append(i * spec.sessions_per_iteration + algo.restart_sessions_used)
                curve.append(float(policy_objective(spec, copy.deepcopy(algo.inference_module())).mean()))
            if i == spec.iterations:
                break
            t0 = time.perf_counter()
            oc = algo.train()["outer_controller"]
            train_s += time.perf_counter() - t0
            steps.append([oc["kl_step"], oc["epochs"], oc["backtracked"]])
        action = algo.policy_mean(algo.last_batch.obs).mean(axis=0).tolist() if algo.last_batch else list(spec.start)
        promotion = algo.promote(promote_sessions, seed=spec.eval_seed + 1) if promote_sessions else None
        if promotion is not None and promotion["promoted"] == "start":
            curve[-1] = curve[0]  # the promoted policy is the start again
    finally:
        algo.stop()
    closed = [gap_closed(curve[0], j, j_static) for j in curve]
    progress(
        f"  {arm:<11} seed {seed}: J {curve[0]:.4f} → {curve[-1]:.4f} (oracle static {j_static:.4f}), gap closed "
        f"{closed[-1]:.1%}, μ {np.round(action, 3).tolist()}, {train_s:.0f} s"
        + (f", promoted {promotion['promoted']}" if promotion else "")
    )
    trust = dict(zip(("kl_step", "epochs", "backtracked"), np.mean(steps, axis=0).tolist())) if steps else {}
    return LearningRun(arm, seed, sessions, curve, closed, action, train_s, promotion, trust)
