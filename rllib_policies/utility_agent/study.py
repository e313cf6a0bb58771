"""The whole PRL-PUTS loop as pieces of one training job: exploration logs → request rows (Ray
Data) → offline training (RLlib, the shared job runner's loop) → λ sweep → frontier artifact with
baselines. The job entrypoint (rllib_policies.train_utility_agent, ``job_main``) and the benchmark
(benchmarks/utility_agent.py, ``run_study``) run the same pieces:

    study = UtilityStudy()
    algo = study.build(cfg)                                      # logs → request rows → agent
    run_training(algo, cfg.iterations, cfg.checkpoint_dir, cfg.checkpoint_every, study.progress)
    artifact = study.finish(algo, cfg)                           # λ sweep → frontier.json, agent.pt
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from actors.world import COHORTS
from rllib_policies.envs import UtilityWeightEnv
from rllib_policies.jobs import JobConfig, run_training

from .algorithm import UtilityAgent, UtilityAgentConfig
from .evaluate import (
    agent_chooser,
    cohort_of,
    evaluation_users,
    fixed_chooser,
    observation_spec,
    off_policy_point,
    simulate_policy,
    simulated_point,
)
from .exploration import (
    OBJECTIVES,
    ActionGrid,
    as_arrays,
    exact_value,
    load_ground_truth,
    request_dataset,
    simulate_exploration_logs,
    split_by_user,
)
from .guard import (
    GLOBAL,
    GLOBAL_CHOICES,
    PRIORS,
    DoNoHarm,
    best_global_actions,
    certified_globals,
    choose_global_actions,
    deployed_actions,
    myopic_actions,
)
from .module import save_agent
from .pareto import (
    hypervolume_2d,
    lambda_grid,
    non_dominated,
    plot_cohort_frontiers,
    plot_frontier,
    sweep_actions,
    write_frontier,
)


@dataclass
class StudyConfig(JobConfig):
    """The study's YAML: the job runner's fields (iterations, checkpoint_dir, checkpoint_every, seed,
    num_cpus) and the study's own. ``checkpoint_dir`` defaults to ``out_dir/checkpoints``."""

    iterations: int = 15  # passes over the training request rows
    checkpoint_dir: str | None = None
    out_dir: str = "utility_agent"  # under the storage root (rllib_policies.storage)
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 4000}})
    grid_n: int = 7
    grid_high: tuple[float, float] = (2.0, 40.0)
    exploration_sessions: int = 3000
    events_root: str | None = None  # existing exploration events; None: simulate them under out_dir
    holdout: float = 0.3
    lr: float = 1e-3
    batch_size: int = 512
    hidden: int = 64
    num_learners: int = 0
    lambdas: int = 25
    eval_sessions: int = 1000  # simulator ground truth per policy; 0 skips the simulator
    do_no_harm_level: float = 0.95  # one-sided confidence π_λ must beat g_λ on held-out logs to be deployed
    global_choice: str = "model"  # g_λ on the training logs: one of guard.GLOBAL_CHOICES (model, logs, dr, …)
    prior: str = "myopic"  # g_λ must beat the myopic prior m_λ on held-out logs to be served (guard.PRIORS)

    def __post_init__(self) -> None:
        if self.global_choice not in GLOBAL_CHOICES:
            raise ValueError(f"global_choice must be one of {GLOBAL_CHOICES}, got {self.global_choice!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(self.out_dir, "checkpoints")

    @property
    def grid(self) -> ActionGrid:
        return ActionGrid(self.grid_n, tuple(self.grid_high))


def log(msg: str) -> None:
    print(f"[utility_agent] {msg}", flush=True)


def request_paths(cfg: StudyConfig) -> dict[str, str]:
    """Where the train / holdout request rows live (absolute: a resumed job may run elsewhere)."""
    return {name: os.path.abspath(os.path.join(cfg.out_dir, "requests", name)) for name in ("train", "holdout")}


def prepare_requests(cfg: StudyConfig) -> tuple[str, str, dict]:
    """Exploration events (simulated if needed) → request rows → train/ and holdout/ Parquet by user."""
    events = cfg.events_root or os.path.join(cfg.out_dir, "events")
    info = {}
    manifest = os.path.join(cfg.out_dir, "exploration.json")
    wanted = {
        "exploration_sessions": cfg.exploration_sessions,
        "seed": cfg.seed,
        "grid": [cfg.grid_n, list(cfg.grid_high)],
        "env_config": cfg.env_config,
    }
    wanted = json.loads(json.dumps(wanted))  # as it reads back (tuples → lists)
    if cfg.events_root is None and os.path.exists(events):  # reuse only logs this config finished writing
        found = json.load(open(manifest)) if os.path.exists(manifest) else None
        if found != wanted:
            raise ValueError(
                f"{events} holds exploration logs from another or an unfinished run "
                f"(manifest {found!r}); delete {cfg.out_dir} or point events_root at the logs to use"
            )
    if cfg.events_root is None and not os.path.exists(events):
        t = time.perf_counter()
        info = simulate_exploration_logs(
            cfg.env_config,
            events,
            cfg.exploration_sessions,
            cfg.grid,
            cfg.seed,
            ground_truth_path=ground_truth_path(cfg),
        )
        log(
            f"exploration logs: {info['sessions']} sessions, {info['requests']} requests, uniform over "
            f"{cfg.grid.size} actions ({time.perf_counter() - t:.1f} s) → {events}"
        )
        with open(manifest, "w") as f:
            json.dump(wanted, f)
    table = pa.concat_tables(ray.get(request_dataset(events, cfg.grid).to_arrow_refs()))
    if table.num_rows == 0:
        raise ValueError(f"no request rows with a logged context under {events!r}")
    train, held = split_by_user(table, cfg.holdout, cfg.seed)
    paths = request_paths(cfg)
    for name, part in (("train", train), ("holdout", held)):
        os.makedirs(paths[name], exist_ok=True)
        pq.write_table(part, os.path.join(paths[name], "part-0.parquet"))
    log(f"request rows: {train.num_rows} train / {held.num_rows} held out (split by user)")
    return paths["train"], paths["holdout"], {**info, "train_rows": train.num_rows, "holdout_rows": held.num_rows}


def ground_truth_path(cfg: StudyConfig) -> str:
    """Exact per-action expected rewards at every simulated logged request (absent for real logs)."""
    return os.path.join(cfg.out_dir, "ground_truth.parquet")


def build_agent(cfg: StudyConfig, train_path: str) -> UtilityAgent:
    env = {**cfg.env_config, "grid": cfg.grid_n, "grid_high": tuple(cfg.grid_high), "seed": cfg.seed}
    return (
        UtilityAgentConfig()
        .environment(UtilityWeightEnv, env_config=env)
        .utility_agent(
            grid_n=cfg.grid_n, grid_high=tuple(cfg.grid_high), offline_requests=train_path, hidden=cfg.hidden
        )
        .training(lr=cfg.lr, train_batch_size_per_learner=cfg.batch_size)
        .learners(num_learners=cfg.num_learners)
        .debugging(seed=cfg.seed, log_level="ERROR")
        .build_algo()
    )


def history_row(result: dict) -> dict:
    """One training pass's fit: per-head MSE and R² (standardised targets) and its wall time."""
    fit = result["learners"][DEFAULT_MODULE_ID]
    return {
        "iteration": int(result["training_iteration"]),
        **{k: float(fit[k]) for k in ("mse_head0", "mse_head1", "r2_head0", "r2_head1")},
        "seconds": float(result["time_this_iter_s"]),
    }


class UtilityStudy:
    """The study's pieces for the job runner: ``build`` (logs → request rows → agent), ``progress``
    (one line per pass, kept as the training history) and ``finish`` (λ sweep → artifact)."""

    def __init__(self) -> None:
        self.data_info: dict = {}
        self.history: list[dict] = []

    def build(self, cfg: StudyConfig) -> UtilityAgent:
        os.makedirs(cfg.out_dir, exist_ok=True)
        train_path, _, self.data_info = prepare_requests(cfg)
        return build_agent(cfg, train_path)

    def progress(self, result: dict) -> str:
        row = history_row(result)
        self.history.append(row)
        return (
            f"mse clicks {row['mse_head0']:.3f} long_views {row['mse_head1']:.3f} | "
            f"R² {row['r2_head0']:.3f} / {row['r2_head1']:.3f}"
        )

    def finish(self, algo: UtilityAgent, cfg: StudyConfig) -> dict:
        """agent.pt (what serving loads) → λ sweep → frontier.json (versioned), frontier.png,
        frontier_cohorts.png."""
        paths = request_paths(cfg)
        data_info = self.data_info or {  # a resumed job did not prepare the rows: count them
            f"{name}_rows": pads.dataset(path, format="parquet").count_rows() for name, path in paths.items()
        }
        module = algo.inference_module()
        result = sweep(cfg, module, paths["holdout"], paths["train"])
        module.set_guard(
            [p["lambda"] for p in result["points"]],
            [p["deployed"]["global_action"] if p["deployed"]["deployed"] == GLOBAL else -1 for p in result["points"]],
        )
        agent_path = save_agent(module, os.path.join(cfg.out_dir, "agent.pt"))  # serves the deployed choice per λ
        result["meta"].update(config=asdict(cfg), data=data_info, training=self.history, agent=agent_path)
        artifact = write_frontier(os.path.join(cfg.out_dir, "frontier.json"), result["points"], result["meta"])
        try:
            plot(os.path.join(cfg.out_dir, "frontier.png"), result)
            plot_cohort_frontiers(
                os.path.join(cfg.out_dir, "frontier_cohorts.png"),
                artifact,
                "simulator" if "simulator" in result["points"][0] else "off_policy",
            )
        except ImportError:
            log("matplotlib not installed: frontier.png skipped (pip install matplotlib)")
        log(f"frontier v{artifact['version']} → {os.path.join(cfg.out_dir, 'frontier.json')}")
        return artifact


def sweep(cfg: StudyConfig, module, holdout_path: str, train_path: str) -> dict:
    """π_λ for every λ and the baselines, off-policy on held-out logs and (eval_sessions > 0) on the
    simulator. Returns the artifact's points and meta."""
    grid, weights = cfg.grid, cfg.grid.weights
    held = as_arrays(pq.read_table(holdout_path))
    truth = (
        load_ground_truth(ground_truth_path(cfg), held["request_id"])
        if cfg.events_root is None and os.path.exists(ground_truth_path(cfg))
        else None
    )
    exact = (lambda acts: dict(zip(OBJECTIVES, map(float, exact_value(truth, acts))))) if truth is not None else None
    trained = as_arrays(pq.read_table(train_path))
    scores = chunked_scores(module, held["obs"])
    lambdas = lambda_grid(cfg.lambdas)
    actions = sweep_actions(scores, lambdas)  # [L, N]
    scale = trained["rewards"].std(axis=0)
    logs_globals = best_global_actions(trained, grid.size, lambdas, scale)
    trained_scores = chunked_scores(module, trained["obs"])
    trained_q = module.reward_mean.numpy() + module.reward_std.numpy() * trained_scores  # Q̂ in reward units
    globals_ = choose_global_actions(cfg.global_choice, trained, trained_scores, trained_q, lambdas, scale, weights)
    guard = DoNoHarm(cfg.do_no_harm_level)
    prior, candidates = myopic_actions(weights, lambdas, scale), globals_
    prior_decisions = [None] * len(lambdas)
    if cfg.prior == "myopic":  # m_λ → g_λ → π_λ, each step only on held-out evidence (guard.py)
        globals_, prior_decisions = certified_globals(guard, held, globals_, prior, lambdas, scale)
    decisions = guard.decide(held, actions, globals_, lambdas, scale)
    deployed = deployed_actions(decisions, actions)

    # global fixed weights: each grid action for everyone (g_λ above: the best on the training logs)
    held_cohort = cohort_of(held["obs"], observation_spec(cfg.env_config))
    fixed_held = [off_policy_point(held, np.full(len(held["action"]), a), held_cohort) for a in range(grid.size)]
    users = evaluation_users(cfg.env_config, cfg.eval_sessions, cfg.seed + 1) if cfg.eval_sessions else None
    sim = (
        (lambda choose: simulate_policy(cfg.env_config, choose, users, cfg.seed + 1, grid))
        if users is not None
        else None
    )
    fixed_runs = [sim(fixed_chooser(weights[a], a)) for a in range(grid.size)] if sim else None
    if sim:
        log(f"simulated {grid.size} global fixed-weight policies × {len(users)} sessions")

    points = []
    for li, lam in enumerate(lambdas):
        a = actions[li]
        share = np.bincount(a, minlength=grid.size) / len(a)
        avg_w = weights[a].mean(axis=0)
        nearest = int((np.abs(weights - avg_w) / np.maximum(weights.max(axis=0), 1e-6)).max(axis=1).argmin())
        best_global = int(globals_[li])
        dec = decisions[li]
        point = {
            "lambda": float(lam),
            "off_policy": off_policy_point(held, a, held_cohort),
            **({"exact": exact(a)} if exact else {}),
            "deployed": {
                **dec,
                "off_policy": off_policy_point(held, deployed[li], held_cohort),
                **({"exact": exact(deployed[li])} if exact else {}),
            },
            "action_distribution": {
                "share": share.round(4).tolist(),
                "mean_weights": avg_w.tolist(),
                "distinct_actions": int((share > 0).sum()),
            },
            # the prior gate: m_λ, the learned g_λ it was tested against, and the decision (None: prior "none")
            "myopic_prior": {
                "action": int(prior[li]),
                "candidate_global_action": int(candidates[li]),
                "decision": prior_decisions[li],
            },
            "best_global_action": best_global,
            "best_global_weights": weights[best_global].tolist(),
            "best_global_action_by_reward_at_hit": int(logs_globals[li]),
            "static_average_weights": avg_w.tolist(),
            "static_average_nearest_action": nearest,
            "cohort_mean_weights": {
                name: weights[a[held_cohort == c]].mean(axis=0).tolist()
                for c, name in enumerate(COHORTS)
                if (held_cohort == c).any()
            },
        }
        if sim:
            run = sim(agent_chooser(module, float(lam), grid))
            static = sim(fixed_chooser(avg_w))
            point["simulator"] = simulated_point(run)
            point["static_average_simulator"] = simulated_point(static)
            d, dci = run.minus(fixed_runs[best_global])
            s, sci = run.minus(static)
            point["lift_vs_best_global"] = _diff(d, dci, lam, scale)
            point["lift_vs_static_average"] = _diff(s, sci, lam, scale)
            dep = run if dec["deployed"] != GLOBAL else fixed_runs[best_global]
            point["deployed"]["simulator"] = simulated_point(dep)
            dd, ddci = dep.minus(fixed_runs[best_global])
            point["deployed"]["lift_vs_best_global"] = _diff(dd, ddci, lam, scale)
        points.append(point)
        log(
            f"λ {lam:.3f}: deploys {dec['deployed']} (lower bound {dec['lower_bound']:+.4f}) | "
            f"off-policy clicks {point['off_policy']['clicks']:.3f} long_views "
            f"{point['off_policy']['long_views']:.3f} (ESS {point['off_policy']['ess']:.0f})"
            + (
                f" | simulator {point['simulator']['clicks']:.3f} / {point['simulator']['long_views']:.3f}"
                if sim
                else ""
            )
        )

    ope_xy = np.array([[p["off_policy"][o] for o in OBJECTIVES] for p in points])
    glob_xy = np.array([[f[o] for o in OBJECTIVES] for f in fixed_held])
    for p, nd in zip(points, non_dominated(ope_xy)):
        p["non_dominated_off_policy"] = bool(nd)
    meta = {
        "grid": {"n": grid.n, "high": list(grid.high), "weights": weights.tolist()},
        "reward_scale": scale.tolist(),
        "estimator": "reward at hit (SNIPS, uniform logging)",
        "do_no_harm": {
            "level": cfg.do_no_harm_level,
            "rule": "deploy π_λ iff Δ̂ − z·se > 0 (Δ̂ = V̂_λ(π_λ) − V̂_λ(g_λ), paired reward at hit on the held-out "
            "logs, clustered by user, z one-sided at level); else serve g_λ, the best global vector on the "
            "training logs (global_choice: the agent's mean Q̂, reward at hit or doubly robust; guard.py)",
            "global_choice": cfg.global_choice,
            "personalised_lambdas": [d["lambda"] for d in decisions if d["deployed"] != GLOBAL],
        },
        "holdout_requests": int(len(held["action"])),
        "global_fixed": [
            {
                "action": a,
                "weights": weights[a].tolist(),
                "off_policy": fixed_held[a],
                **({"exact": exact(np.full(len(held["action"]), a))} if exact else {}),
                **({"simulator": simulated_point(fixed_runs[a])} if sim else {}),
            }
            for a in range(grid.size)
        ],
    }
    ref = np.minimum(np.nanmin(ope_xy, 0), np.nanmin(glob_xy, 0))
    meta["hypervolume_off_policy"] = {
        "personalised": hypervolume_2d(ope_xy, ref),
        "global_fixed": hypervolume_2d(glob_xy, ref),
        "reference_point": ref.tolist(),
    }
    if exact:
        ex_xy = np.array([[p["exact"][o] for o in OBJECTIVES] for p in points])
        gex_xy = np.array([[m["exact"][o] for o in OBJECTIVES] for m in meta["global_fixed"]])
        ref = np.minimum(ex_xy.min(0), gex_xy.min(0))
        meta["hypervolume_exact"] = {
            "personalised": hypervolume_2d(ex_xy, ref),
            "global_fixed": hypervolume_2d(gex_xy, ref),
            "reference_point": ref.tolist(),
        }
    if sim:
        sim_xy = np.array([[p["simulator"][o] for o in OBJECTIVES] for p in points])
        gsim_xy = np.array([[m["simulator"][o] for o in OBJECTIVES] for m in meta["global_fixed"]])
        ssim_xy = np.array([[p["static_average_simulator"][o] for o in OBJECTIVES] for p in points])
        for p, nd in zip(points, non_dominated(sim_xy)):
            p["non_dominated_simulator"] = bool(nd)
        ref = np.minimum.reduce([sim_xy.min(0), gsim_xy.min(0), ssim_xy.min(0)])
        meta["hypervolume_simulator"] = {
            "personalised": hypervolume_2d(sim_xy, ref),
            "global_fixed": hypervolume_2d(gsim_xy, ref),
            "static_average": hypervolume_2d(ssim_xy, ref),
            "reference_point": ref.tolist(),
        }
        meta["eval_sessions"] = int(len(users))
    return {"points": points, "meta": meta}


def chunked_scores(module, obs: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Q̃(s, a) for every action [N, A, 2], in chunks ([N, A, hidden] activations at once would not fit)."""
    with torch.no_grad():
        return np.concatenate(
            [module.scores(torch.as_tensor(obs[i : i + chunk])).numpy() for i in range(0, len(obs), chunk)]
        )


def _diff(d: np.ndarray, ci: np.ndarray, lam: float, scale: np.ndarray) -> dict:
    """Per-objective paired difference and the λ-scalarised one (common scale)."""
    w = np.array([lam / scale[0], (1 - lam) / scale[1]])
    return {
        **{o: float(x) for o, x in zip(OBJECTIVES, d)},
        **{f"{o}_ci": float(x) for o, x in zip(OBJECTIVES, ci)},
        "scalarised": float(w @ d),
        "scalarised_ci_bound": float(np.abs(w) @ ci),
    }


def plot(path: str, result: dict) -> None:
    pts, meta = result["points"], result["meta"]
    series = {
        "personalised π_λ (off-policy)": _series(pts, "off_policy"),
        "global fixed weights (off-policy)": _series(meta["global_fixed"], "off_policy", fmt="x"),
    }
    if "exact" in pts[0]:
        series["personalised π_λ (exact, held-out states)"] = _series(pts, "exact", fmt="^-")
        series["global fixed weights (exact)"] = _series(meta["global_fixed"], "exact", fmt="1")
    if "simulator" in pts[0]:
        series["personalised π_λ (simulator)"] = _series(pts, "simulator", fmt="s-")
        series["global fixed weights (simulator)"] = _series(meta["global_fixed"], "simulator", fmt="+")
        series["static average weights (simulator)"] = _series(pts, "static_average_simulator", fmt="d--")
    plot_frontier(path, series, "PRL-PUTS frontier: engagement vs long dwell (per request, 95 % CI)")


def _series(rows: list[dict], key: str, fmt: str = "o-") -> dict:
    xs = [r[key] for r in rows]
    return {
        "x": [x["clicks"] for x in xs],
        "y": [x["long_views"] for x in xs],
        "xerr": [x.get("clicks_ci", 0) for x in xs],
        "yerr": [x.get("long_views_ci", 0) for x in xs],
        "fmt": fmt,
    }


def run_study(cfg: StudyConfig) -> dict:
    """The whole study in process, with the job's pieces: build → ``run_training`` (progress lines,
    checkpoints under ``checkpoint_dir``) → finish. Returns the frontier artifact."""
    study = UtilityStudy()
    algo = study.build(cfg)
    try:
        run_training(algo, cfg.iterations, cfg.checkpoint_dir, cfg.checkpoint_every, study.progress, log)
        return study.finish(algo, cfg)
    finally:
        algo.stop()
