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

Adaptive exploration (``exploration_rounds`` R > 1, successive halving over the grid at the same total
session budget): round 1 logs uniformly over all |A| vectors on 1/R of the sessions; after round r
the agent is fitted on the train users' rows of rounds ≤ r and each λ of interest keeps its top
⌈keep_fraction·|S_r|⌉ survivors by the model's mean Q̂_λ (``cut="fraction"``), or every vector that the
doubly robust best does not beat significantly (``cut="confidence"``: successive elimination, robust
to the model's bias); round r + 1 logs uniformly over their union S_{r+1}, each request with the
propensity of the round that served it (1/|S_r|), so reward at hit, DR and do no harm stay unbiased on
the mixed logs. The final agent is fitted on every round's train rows, and g_λ (``global_choice``) and π_λ
choose within the last round's support. The user split is then a fixed hash of the user id
(``actors.world.user_uniform``), so a user is on the same side in every round.
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
from actors.world import user_uniform
from actors.world.metrics import gap_closed
from actors.world.oracle import Scalarised, headroom_of_values, objective_values

from .evaluate import cohort_of, observation_spec
from .exploration import (
    ActionGrid,
    as_arrays,
    halving_survivors,
    load_ground_truth,
    request_dataset,
    request_rows,
    round_sessions,
    simulate_exploration_logs,
    split_by_user,
)
from .guard import (
    GLOBAL_CHOICES,
    PRIORS,
    DoNoHarm,
    DoublyRobustGlobal,
    certified_globals,
    choose_global_actions,
    deployed_actions,
    model_mean_values,
    myopic_actions,
)
from .module import UtilityQModule
from .pareto import sweep_actions
from .study import StudyConfig, build_agent, chunked_scores

CUTS = ("fraction", "confidence")


@dataclass
class LearningConfig:
    """One learning-test run (one seed, one preset): its budget and the learner's settings.

    Args:
        exploration_rounds: Logging rounds R sharing the ``sessions`` budget equally. 1: uniform
            logging over the whole grid (the original test); R > 1: successive halving, each later
            round logs uniformly over the survivors of the one before (module docstring).
        keep_fraction: Share of a round's support each λ of interest keeps for the next round
            (top ⌈keep_fraction·|S|⌉ by the model's mean Q̂_λ; the union over λ survives), in (0, 1);
            used when ``cut`` is "fraction".
        cut: How a round's survivors are chosen: "fraction" (the model's top ``keep_fraction``) or
            "confidence" (successive elimination: every vector the round's doubly robust best does not
            beat at one-sided level ``cut_level``, Bonferroni over the support; ``DoublyRobustGlobal.survivors``).
            The model ranks with its bias; the confidence cut is robust to it (guard.py states the limits).
        cut_level: The confidence cut's level, in [0.5, 1).
        prior: "myopic": g_λ is deployed only where the validation logs show it beats the myopic prior m_λ
            (``guard.myopic_actions``: ranking by the λ-scalarised predicted rewards, what a practitioner sets
            without learning), m_λ elsewhere; π_λ then has to beat that. "none": g_λ as chosen.
        keep_prior: Whether every cut also keeps each λ's m_λ in the next round's support (so the logs can
            certify against it), whatever a model biased at the 0.01 σ scale says of it.
    """

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
    exploration_rounds: int = 1
    keep_fraction: float = 0.25
    cut: str = "fraction"
    cut_level: float = 0.95
    prior: str = "myopic"
    keep_prior: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.validation and 0 < self.test and self.validation + self.test < 1):
            raise ValueError(
                f"validation and test shares must be > 0 and sum below 1, got {self.validation}, {self.test}"
            )
        if self.global_choice not in GLOBAL_CHOICES:
            raise ValueError(f"global_choice must be one of {GLOBAL_CHOICES}, got {self.global_choice!r}")
        if self.sessions < 1 or self.passes < 0:
            raise ValueError(f"sessions must be >= 1 and passes >= 0, got {self.sessions}, {self.passes}")
        if not 1 <= self.exploration_rounds <= self.sessions:
            raise ValueError(
                f"exploration_rounds must be in [1, sessions], got {self.exploration_rounds} "
                f"for {self.sessions} sessions"
            )
        if not 0 < self.keep_fraction < 1:
            raise ValueError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.cut not in CUTS:
            raise ValueError(f"cut must be one of {CUTS}, got {self.cut!r}")
        if not 0.5 <= self.cut_level < 1:
            raise ValueError(f"cut_level must be in [0.5, 1), got {self.cut_level}")

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


def split_three(table: pa.Table, cfg: LearningConfig) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(train, validation, test) by user: the original draw over the logged users for one round, the
    fixed ``user_uniform`` hash for adaptive exploration (stable across rounds)."""
    if cfg.exploration_rounds == 1:
        train, rest = split_by_user(table, cfg.validation + cfg.test, cfg.seed)
        val, test = split_by_user(rest, cfg.test / (cfg.validation + cfg.test), cfg.seed + 1)
        return train, val, test
    u = user_uniform(table["user_id"].to_numpy(), cfg.seed)
    is_test, is_val = u < cfg.test, (u >= cfg.test) & (u < cfg.test + cfg.validation)
    return tuple(table.filter(pa.array(m)) for m in (~is_test & ~is_val, is_val, is_test))


def fit_agent(cfg: LearningConfig, train: pa.Table, va: dict, work_dir: str, score_on: list[np.ndarray]) -> dict:
    """The agent trained ``cfg.passes`` passes on ``train`` (the pass with the lowest loss on the
    validation rows ``va`` kept) → {"scores": Q̃ [N, A, 2] at each obs array of ``score_on``,
    "q_mean", "q_std" (reward units), "history", "passes_kept"}."""
    train_path = os.path.join(work_dir, "train")
    os.makedirs(train_path, exist_ok=True)
    pq.write_table(train, os.path.join(train_path, "part-0.parquet"))
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
    try:
        history, best = [], (np.inf, None, 0)
        for i in range(cfg.passes):
            fit = algo.train()["learners"][DEFAULT_MODULE_ID]
            loss = validation_loss(algo.inference_module(), va)
            history.append({**{k: float(fit[k]) for k in ("r2_head0", "r2_head1")}, "validation_loss": loss})
            if loss < best[0] or not cfg.early_stopping:
                best = (loss, copy.deepcopy(algo.inference_module().state_dict()), i + 1)
        module = algo.inference_module(weights=best[1]) if best[1] is not None else algo.inference_module()
        scores = [chunked_scores(module, x) for x in score_on]
        q_mean, q_std = (getattr(module, k).numpy().astype(np.float64) for k in ("reward_mean", "reward_std"))
    finally:
        algo.stop()
    return {"scores": scores, "q_mean": q_mean, "q_std": q_std, "history": history, "passes_kept": best[2]}


def log_round(
    cfg: LearningConfig, work_dir: str, r: int, sessions: int, support: np.ndarray
) -> tuple[pa.Table, str, dict]:
    """Logging round ``r`` over ``support`` → (its request rows, its ground-truth path, its info)."""
    grid = cfg.grid
    events = os.path.join(work_dir, "events" if r == 0 else f"events-r{r}")
    truth_path = os.path.join(work_dir, "truth.parquet" if r == 0 else f"truth-r{r}.parquet")
    info = simulate_exploration_logs(
        cfg.env_config, events, sessions, grid, cfg.seed, ground_truth_path=truth_path, support=support, round_index=r
    )
    table = (
        pa.concat_tables(ray.get(request_dataset(events, grid).to_arrow_refs()))
        if cfg.ray_data
        else request_rows(pads.dataset(events, format="parquet", schema=EVENT_SCHEMA).to_table(), grid)
    )
    return table, truth_path, {**info, "round": r, "rows": table.num_rows}


def run_learning_test(cfg: LearningConfig, work_dir: str) -> dict:
    """Exploration logs (with exact per-action ground truth; one round, or successive halving over
    ``cfg.exploration_rounds``) → request rows split by user → agent trained ``cfg.passes`` passes →
    do no harm on validation → values on test. Needs Ray running.
    Returns {"config", "data", "exploration", "training", "wall_s", "points": one dict per λ}."""
    t0 = time.perf_counter()
    grid = cfg.grid
    lambdas = np.asarray(cfg.lambdas, np.float64)
    support, tables, truth_paths, rounds, t_halving = np.arange(grid.size), [], [], [], 0.0
    for r, n in enumerate(round_sessions(cfg.sessions, cfg.exploration_rounds)):
        table, truth_path, info = log_round(cfg, work_dir, r, n, support)
        tables.append(table)
        truth_paths.append(truth_path)
        if r == cfg.exploration_rounds - 1:
            rounds.append(info)
            break
        t_cut = time.perf_counter()
        train_r, val_r, _ = split_three(pa.concat_tables(tables), cfg)
        tr_r = as_arrays(train_r)
        fit = fit_agent(cfg, train_r, as_arrays(val_r), os.path.join(work_dir, f"halving-{r}"), [tr_r["obs"]])
        values = model_mean_values(fit["scores"][0], lambdas)  # [L, A]: the model's mean Q̂_λ per vector
        scale_r = tr_r["rewards"].std(axis=0)
        if cfg.cut == "fraction":
            survivors = halving_survivors(values, support, cfg.keep_fraction)
        else:
            q_r = fit["q_mean"] + fit["q_std"] * fit["scores"][0]  # Q̂ in reward units [N, A, 2]
            survivors = DoublyRobustGlobal(cfg.cut_level).survivors(tr_r, q_r, lambdas, scale_r, support)
        if cfg.keep_prior:  # m_λ at this round's scale, whatever a model biased at the 0.01 σ scale says of it
            survivors = np.union1d(survivors, np.intersect1d(myopic_actions(grid.weights, lambdas, scale_r), support))
        rounds.append({**info, "values": values[:, support].tolist(), "survivors": survivors.tolist()})
        support = survivors
        t_halving += time.perf_counter() - t_cut
    allowed = None if cfg.exploration_rounds == 1 else support
    table = pa.concat_tables(tables)
    train, val, test = split_three(table, cfg)
    t_data = time.perf_counter() - t0

    tr, va, te = (as_arrays(t) for t in (train, val, test))
    fit = fit_agent(cfg, train, va, work_dir, [tr["obs"], va["obs"], te["obs"]])
    train_scores, val_scores, test_scores = fit["scores"]
    q_mean, q_std, history, best = fit["q_mean"], fit["q_std"], fit["history"], (None, None, fit["passes_kept"])
    t_train = time.perf_counter() - t0 - t_data

    scale = tr["rewards"].std(axis=0)
    train_q = q_mean + q_std * train_scores  # Q̂ in reward units [N, A, 2]
    candidates = {
        k: choose_global_actions(k, tr, train_scores, train_q, lambdas, scale, grid.weights, allowed)
        for k in GLOBAL_CHOICES
    }
    dr_value, dr_se = DoublyRobustGlobal().values(tr, train_q, lambdas, scale)  # [L, A]
    guard = DoNoHarm(cfg.do_no_harm_level)
    # m_λ at the final training scale, the σ the objective r_λ and π_λ scalarise with (a cut kept m_λ at its own
    # round's scale; near a boundary between two grid vectors the two can differ: then m_λ has round 1's logs only,
    # and the gate, short of evidence, keeps it). Measured in every run; used when cfg.prior is "myopic".
    prior = myopic_actions(grid.weights, lambdas, scale)
    prior_decisions = None
    if cfg.prior == "myopic":  # every candidate g_λ must beat m_λ on the validation logs, else m_λ
        certified = {k: certified_globals(guard, va, g, prior, lambdas, scale) for k, g in candidates.items()}
        candidates = {k: c[0] for k, c in certified.items()}
        prior_decisions = certified[cfg.global_choice][1]
    globals_ = candidates[cfg.global_choice]
    val_actions = sweep_actions(val_scores, lambdas, allowed)
    raw = sweep_actions(test_scores, lambdas, allowed)
    # the deployed policy (do no harm on validation) under each choice of g_λ; cfg.global_choice's is "final"
    deployed_by = {
        k: deployed_actions(guard.decide(va, val_actions, g, lambdas, scale), raw) for k, g in candidates.items()
    }
    decisions = guard.decide(va, val_actions, globals_, lambdas, scale)
    deployed = deployed_actions(decisions, raw)
    frozen = frozen_actions(te["obs"], grid, cfg.hidden, lambdas, cfg.frozen_inits, cfg.seed)  # [K, L, N]
    truth = load_ground_truth(truth_paths, te["request_id"])
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
            "prior": float(values[:, prior[li]].mean()),
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
                "prior_action": int(prior[li]),
                "prior_decision": prior_decisions[li] if prior_decisions else None,
                "global_actions": {k: int(g[li]) for k, g in candidates.items()},
                "oracle_action_survived": bool(np.isin(a_star, support)),
                "kpi": kpi,
                "dr": dr,
            }
        )
    return {
        "config": asdict(cfg),
        "data": {
            "sessions": cfg.sessions,
            "requests": int(sum(r["requests"] for r in rounds)),
            "events": int(sum(r["events"] for r in rounds)),
            "train_rows": train.num_rows,
            "validation_rows": val.num_rows,
            "test_rows": test.num_rows,
            "reward_scale": scale.tolist(),
        },
        "exploration": {"rounds": rounds, "support": support.tolist(), "halving_s": t_halving},
        "training": history,
        "passes_kept": best[2],
        "wall_s": {"data": t_data, "train": t_train, "total": time.perf_counter() - t0},
        "points": points,
    }
