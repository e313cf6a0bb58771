"""The utility agent's learning test: how much of the gap to the oracle's best static weight vector
the deployed π_λ closes, on the world's exact expectations.

    start    V_λ(uniform logging) = (1/N) Σ_i (1/|A|) Σ_a r_λ(s_i, a)     the policy that wrote the logs
    oracle   max_a (1/N) Σ_i r_λ(s_i, a)                                    best static grid vector (oracle.py)
    final    (1/N) Σ_i r_λ(s_i, π̂_λ(s_i))                                   the deployed policy (after do no harm)
    gap closed = (final − start) / (oracle − start)

with r_λ(s, a) = λ·E[clicks | s, a]/σ₁ + (1 − λ)·E[long views | s, a]/σ₂ the simulator's exact
expectation of action a's slate at logged request s (``simulate_exploration_logs(ground_truth_path=…)``)
and σ_k the training logs' reward std (the scale π_λ scalarises with). Users are split three ways:
train (the agent), validation (the do-no-harm choice, guard.py) and test (every value above), so no
value is measured on data that chose it. The untrained ("frozen") agent's π_λ is measured on the same
test states: its random-initialised Q picks arbitrary grid actions, the uniform start in expectation.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from actors.telemetry import EVENT_SCHEMA
from actors.world.metrics import gap_closed
from actors.world.oracle import Scalarised, headroom_of_values, objective_values

from .evaluate import cohort_of, observation_spec
from .exploration import (
    ActionGrid,
    as_arrays,
    load_ground_truth,
    request_dataset,
    request_rows,
    simulate_exploration_logs,
    split_by_user,
)
from .guard import (
    GLOBAL_CHOICES,
    DoNoHarm,
    DoublyRobustGlobal,
    choose_global_actions,
    deployed_actions,
)
from .module import UtilityQModule
from .pareto import sweep_actions
from .study import StudyConfig, build_agent, chunked_scores


@dataclass
class LearningConfig:
    """One learning-test run (one seed, one preset): its budget and the learner's settings."""

    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 4000}})
    sessions: int = 3000  # exploration sessions (uniform logging over the grid)
    passes: int = 15  # training passes over the training rows (at most, with early stopping)
    early_stopping: bool = True  # keep the pass with the lowest validation loss (the heads overfit users)
    seed: int = 0
    grid_n: int = 7
    grid_high: tuple[float, float] = (2.0, 40.0)
    lambdas: tuple[float, ...] = (0.0, 0.5, 1.0)
    validation: float = 0.2  # share of users whose logs make the do-no-harm choice
    test: float = 0.3  # share of users whose logged states measure every value
    lr: float = 1e-3
    batch_size: int = 512
    hidden: int = 64
    do_no_harm_level: float = 0.95
    global_choice: str = "model"  # how g_λ is picked on the training logs: one of guard.GLOBAL_CHOICES
    frozen_inits: int = 16  # random initialisations averaged for the untrained agent
    ray_data: bool = True  # request rows by the Ray Data job (as the study); False: in process (small logs)

    def __post_init__(self) -> None:
        if not (0 < self.validation and 0 < self.test and self.validation + self.test < 1):
            raise ValueError(
                f"validation and test shares must be > 0 and sum below 1, got {self.validation}, {self.test}"
            )
        if self.global_choice not in GLOBAL_CHOICES:
            raise ValueError(f"global_choice must be one of {GLOBAL_CHOICES}, got {self.global_choice!r}")
        if self.sessions < 1 or self.passes < 0:
            raise ValueError(f"sessions must be >= 1 and passes >= 0, got {self.sessions}, {self.passes}")

    @property
    def grid(self) -> ActionGrid:
        return ActionGrid(self.grid_n, tuple(self.grid_high))


def frozen_actions(obs: np.ndarray, grid: ActionGrid, hidden: int, lambdas: np.ndarray, inits: int, seed: int):
    """π_λ of ``inits`` untrained agents (random initialisations) → actions [inits, L, N]."""
    out = []
    for k in range(inits):
        torch.manual_seed(seed * 1000 + k)
        module = UtilityQModule(
            observation_space=gym.spaces.Box(-np.inf, np.inf, (obs.shape[1],), np.float32),
            action_space=gym.spaces.Discrete(grid.size),
            model_config={"grid": grid.weights.tolist(), "hidden": hidden},
        )
        out.append(sweep_actions(chunked_scores(module, obs), lambdas))
    return np.stack(out)


def validation_loss(module, logs: dict) -> float:
    """The learner's loss on held-out rows: Σ_k mean_i (Q̃_k(s_i, a_i) − (r_ik − μ_k)/σ_k)²."""
    with torch.no_grad():
        pred = module.scores(torch.as_tensor(logs["obs"]), torch.as_tensor(logs["action"]))
        target = (torch.as_tensor(logs["rewards"]) - module.reward_mean) / module.reward_std
        return float(((pred - target) ** 2).mean(0).sum())


def run_learning_test(cfg: LearningConfig, work_dir: str) -> dict:
    """Exploration logs (with exact per-action ground truth) → request rows split by user → agent
    trained ``cfg.passes`` passes → do no harm on validation → values on test. Needs Ray running.
    Returns {"config", "data", "training", "wall_s", "points": one dict per λ}."""
    t0 = time.perf_counter()
    grid = cfg.grid
    events, truth_path = os.path.join(work_dir, "events"), os.path.join(work_dir, "truth.parquet")
    info = simulate_exploration_logs(cfg.env_config, events, cfg.sessions, grid, cfg.seed, ground_truth_path=truth_path)
    table = (
        pa.concat_tables(ray.get(request_dataset(events, grid).to_arrow_refs()))
        if cfg.ray_data
        else request_rows(pads.dataset(events, format="parquet", schema=EVENT_SCHEMA).to_table(), grid)
    )
    train, rest = split_by_user(table, cfg.validation + cfg.test, cfg.seed)
    val, test = split_by_user(rest, cfg.test / (cfg.validation + cfg.test), cfg.seed + 1)
    train_path = os.path.join(work_dir, "train")
    os.makedirs(train_path, exist_ok=True)
    pq.write_table(train, os.path.join(train_path, "part-0.parquet"))
    t_data = time.perf_counter() - t0

    study_cfg = StudyConfig(
        out_dir=work_dir,
        env_config=cfg.env_config,
        grid_n=cfg.grid_n,
        grid_high=tuple(cfg.grid_high),
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        hidden=cfg.hidden,
        seed=cfg.seed,
    )
    algo = build_agent(study_cfg, train_path)
    tr, va, te = (as_arrays(t) for t in (train, val, test))
    try:
        history, best = [], (np.inf, None, 0)
        for i in range(cfg.passes):
            fit = algo.train()["learners"][DEFAULT_MODULE_ID]
            loss = validation_loss(algo.inference_module(), va)
            history.append({**{k: float(fit[k]) for k in ("r2_head0", "r2_head1")}, "validation_loss": loss})
            if loss < best[0] or not cfg.early_stopping:
                best = (loss, copy.deepcopy(algo.inference_module().state_dict()), i + 1)
        module = algo.inference_module(weights=best[1]) if best[1] is not None else algo.inference_module()
        train_scores, val_scores, test_scores = (chunked_scores(module, x["obs"]) for x in (tr, va, te))
        q_mean, q_std = (getattr(module, k).numpy().astype(np.float64) for k in ("reward_mean", "reward_std"))
    finally:
        algo.stop()
    t_train = time.perf_counter() - t0 - t_data

    lambdas = np.asarray(cfg.lambdas, np.float64)
    scale = tr["rewards"].std(axis=0)
    train_q = q_mean + q_std * train_scores  # Q̂ in reward units [N, A, 2]
    candidates = {
        k: choose_global_actions(k, tr, train_scores, train_q, lambdas, scale, grid.weights) for k in GLOBAL_CHOICES
    }
    dr_value, dr_se = DoublyRobustGlobal().values(tr, train_q, lambdas, scale)  # [L, A]
    globals_ = candidates[cfg.global_choice]
    val_actions = sweep_actions(val_scores, lambdas)
    guard = DoNoHarm(cfg.do_no_harm_level)
    raw = sweep_actions(test_scores, lambdas)
    # the deployed policy (do no harm on validation) under each choice of g_λ; cfg.global_choice's is "final"
    deployed_by = {
        k: deployed_actions(guard.decide(va, val_actions, g, lambdas, scale), raw) for k, g in candidates.items()
    }
    decisions = guard.decide(va, val_actions, globals_, lambdas, scale)
    deployed = deployed_actions(decisions, raw)
    frozen = frozen_actions(te["obs"], grid, cfg.hidden, lambdas, cfg.frozen_inits, cfg.seed)  # [K, L, N]
    truth = load_ground_truth(truth_path, te["request_id"])
    kpis = {"clicks": truth[..., 0], "long_views": truth[..., 1]}
    cohorts = cohort_of(te["obs"], observation_spec(cfg.env_config))
    rows = np.arange(len(truth))

    points = []
    for li, lam in enumerate(lambdas):
        values = objective_values(kpis, Scalarised(float(lam), scale=tuple(map(float, scale))))  # [N, A]
        oracle = headroom_of_values(values, te["user_id"], cohorts, f"λ={lam:g}")
        start = float(values.mean())
        value = {
            "final": float(values[rows, deployed[li]].mean()),
            "personalised": float(values[rows, raw[li]].mean()),
            "global": float(values[:, globals_[li]].mean()),
            **{f"global_{k}": float(values[:, g[li]].mean()) for k, g in candidates.items()},
            **{f"final_{k}": float(values[rows, d[li]].mean()) for k, d in deployed_by.items()},
            "frozen": float(np.mean([values[rows, f[li]].mean() for f in frozen])),
        }
        a_star = oracle.static_action
        kpi = {  # per request, absolute units: [clicks, long views]
            "start": truth.mean(axis=(0, 1)).tolist(),
            "oracle_static": truth[:, a_star].mean(axis=0).tolist(),
            "final": truth[rows, deployed[li]].mean(axis=0).tolist(),
        }
        dr = {  # the doubly robust values on the training logs (σ units) at the oracle's and the model's choice
            "value_oracle_action": float(dr_value[li, a_star]),
            "value_model_action": float(dr_value[li, candidates["model"][li]]),
            "se_median": float(np.median(dr_se[li])),
            "values": dr_value[li].tolist(),  # every grid vector's V̂_DR, next to its exact value on the test states
            "exact_values": values.mean(axis=0).tolist(),
        }
        points.append(
            {
                "lambda": float(lam),
                "start": start,
                "oracle_static": oracle.static,
                "oracle_user": oracle.user,
                "oracle_request": oracle.request,
                "oracle_static_action": oracle.static_action,
                **value,
                **{f"gap_closed_{k}": gap_closed(start, v, oracle.static) for k, v in value.items()},
                "decision": decisions[li],
                "global_actions": {k: int(g[li]) for k, g in candidates.items()},
                "kpi": kpi,
                "dr": dr,
            }
        )
    return {
        "config": asdict(cfg),
        "data": {
            **info,
            "train_rows": train.num_rows,
            "validation_rows": val.num_rows,
            "test_rows": test.num_rows,
            "reward_scale": scale.tolist(),
        },
        "training": history,
        "passes_kept": best[2],
        "wall_s": {"data": t_data, "train": t_train, "total": time.perf_counter() - t0},
        "points": points,
    }
