"""CRM's learning experiment on the simulator, measured against the world's oracle (issue 14, item 7).

logs      Gaussian-logged sessions around μ₀ (logs.simulate_gaussian_logs), with the logged states; with
          ``rounds`` = 2 the budget is split: round 1 around μ₀, then CRM is fitted on round 1's train rows
          and round 2 logs around its learned mean (exp of the mean m_θ(x) over those rows, σ = ``round_sigma``),
          so the region the learner points at gets support; every row carries the rounds' mixture density
rows      request rows (Ray Data) of every round, users split train / validation / test by a fixed hash
learn     CRM on train (``iterations`` × ``steps_per_iteration`` full-batch steps)
deploy    do no harm on validation (algorithm.do_no_harm): the first certified of the learned mean with jitter h
          (N(m_θ(x), h²I)) and π_θ, each against q; none → q. What is certified is what is served.
measure   on the test states, exact (World.expected_kpis of the slate each weight vector makes; stochastic
          policies by M draws per state):
          start   V(μ₀)                  the logging mean, deterministic
          oracle  max_w V(w)             best static weights on the simplex grid (oracle.ranking_grid)
          final   V(deployed)            the certified policy itself; gap closed = (final − start) / (oracle − start)
          and beside it the deterministic mean exp(m_θ(x)) (never served), the jittered mean, π_θ, q,
          per-request headroom, and the OPE estimates on the test rows next to exact values (alignment).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from actors.cascade import build_world
from actors.telemetry import EVENT_SCHEMA
from actors.world.metrics import gap_closed
from actors.world.oracle import Family, RequestStates, action_values, ranking_grid
from rllib_policies.envs import SessionEnv
from rllib_policies.ope import AbstainRule, DensityRatioSNIPS, EssCorrected, GaussianPolicy, KernelSNIPS, LoggedBandit
from rllib_policies.utility_agent.exploration import round_sessions

from .algorithm import CRMConfig
from .logs import (
    DEFAULT_WEIGHTS,
    LOG_HIGH,
    LOG_LOW,
    LoggedStates,
    as_arrays,
    logging_policy,
    policy_value,
    request_dataset,
    request_rows,
    simulate_gaussian_logs,
    split_by_user,
)


@dataclass
class CRMExperiment:
    """One run (one seed): budget, logging policy and learner settings."""

    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 4000}})
    sessions: int = 5000
    logging_weights: tuple[float, float, float] = tuple(DEFAULT_WEIGHTS.tolist())
    logging_sigma: float = 2.0  # wide enough that the oracle's region has support (ESS)
    lam: float = 0.25
    iterations: int = 12
    steps_per_iteration: int = 50
    lr: float = 0.01
    learn_sigma: bool = True
    confidence: float = 0.95
    min_ess_fraction: float = 0.2
    l2: float = 1.0
    mean_jitter: float = 0.3  # h: the learned mean is certified and served as N(m_θ(x), h²I)
    align_scale: bool = True  # candidates shifted along (1, 1, 1) to the logs' mean log-weight (CRMConfig)
    wider_jitters: tuple[float, ...] = (0.6, 1.0)  # more do-no-harm candidates: the learned mean with these h
    do_no_harm_level: float = 0.95
    validation: float = 0.35
    test: float = 0.2
    oracle_resolution: int = 20
    policy_draws: int = 4  # M draws per test state for π_θ's exact value
    ray_data: bool = (
        True  # events → rows by the Ray Data job (False: in process; the learner reads rows on its driver either way)
    )
    seed: int = 0
    rounds: int = 1  # logging rounds sharing ``sessions`` (module docstring); 1: everything logged around μ₀
    round_sigma: float = 1.0  # σ (log space) of round 2's logging policy around round 1's learned mean

    def __post_init__(self) -> None:
        if self.rounds not in (1, 2):
            raise ValueError(f"rounds must be 1 or 2, got {self.rounds}")
        if not self.round_sigma > 0:
            raise ValueError(f"round_sigma must be > 0, got {self.round_sigma}")

    def algorithm_config(self, train_path: str) -> CRMConfig:
        return (
            CRMConfig()
            .environment(SessionEnv, env_config={**self.env_config, "seed": self.seed})
            .crm(
                offline_requests=train_path,
                lam=self.lam,
                init_weights=tuple(self.logging_weights),
                init_sigma=self.logging_sigma,
                learn_sigma=self.learn_sigma,
                confidence=self.confidence,
                min_ess_fraction=self.min_ess_fraction,
                l2=self.l2,
                steps_per_iteration=self.steps_per_iteration,
                mean_jitter=self.mean_jitter,
                align_scale=self.align_scale,
                wider_jitters=tuple(self.wider_jitters),
                do_no_harm_level=self.do_no_harm_level,
            )
            .training(lr=self.lr)
            .learners(num_learners=0)
            .debugging(seed=self.seed, log_level="ERROR")
        )


def _ope(data: LoggedBandit, target, deterministic: bool) -> dict:
    never = AbstainRule(min_ess=0, min_ess_fraction=0)
    est = (
        KernelSNIPS(bandwidth=0.3, interval=EssCorrected(), abstain=never)
        if deterministic
        else DensityRatioSNIPS(interval=EssCorrected(), abstain=never)
    ).estimate(data, target)
    return {"estimate": est.value, "low": est.low, "high": est.high, "ess": est.ess}


def log_round(cfg: CRMExperiment, work_dir: str, r: int, sessions: int, weights, sigma: float):
    """Logging round ``r`` around ``weights`` (σ ``sigma``) → (its request rows, its LoggedStates, its info)."""
    events, states_path = os.path.join(work_dir, f"events-r{r}"), os.path.join(work_dir, f"states-r{r}.npz")
    info = simulate_gaussian_logs(
        cfg.env_config, events, sessions, weights, sigma, cfg.seed, states_path=states_path, round_index=r
    )
    table = (
        pa.concat_tables(ray.get(request_dataset(events).to_arrow_refs()))
        if cfg.ray_data
        else request_rows(pads.dataset(events, format="parquet", schema=EVENT_SCHEMA).to_table())
    )
    return table, LoggedStates.load(states_path), info


def mixture_propensities(tables: list[pa.Table], loggers: list[GaussianPolicy]) -> pa.Table:
    """The rounds' rows with log q(a) replaced by the balance heuristic's mixture density (Agarwal et al.
    2017, logged bandit feedback from multiple loggers), q̄(a) = Σ_r (n_r / n)·q_r(a), n_r the round's
    rows: no weight blown up where one round's logger is thin. Unbiased when every round sees the same
    states; here a session's later states depend on its round's earlier actions, so it is an approximation
    (each row's own density is the unbiased choice, with far higher variance: session 28's first two-round
    run certified nothing with it)."""
    if len(tables) == 1:
        return tables[0]
    table = pa.concat_tables(tables)
    action = np.stack(table["action"].to_numpy(zero_copy_only=False))
    share = np.array([t.num_rows for t in tables], np.float64) / table.num_rows
    log_q = np.logaddexp.reduce([np.log(w) + q.log_density(action) for w, q in zip(share, loggers)], axis=0)
    return table.set_column(table.schema.get_field_index("log_propensity"), "log_propensity", pa.array(log_q))


def learned_mean_weights(cfg: CRMExperiment, train: pa.Table, work_dir: str) -> np.ndarray:
    """CRM fitted on ``train`` (``iterations`` as the final fit) → exp(mean_x m_θ(x)) over its rows: the
    static weights a later logging round centres on."""
    os.makedirs(work_dir, exist_ok=True)
    pq.write_table(train, os.path.join(work_dir, "part-0.parquet"))
    algo = cfg.algorithm_config(work_dir).build_algo()
    try:
        algo.load_rows()
        for _ in range(cfg.iterations):
            algo.train()
        mean = algo.aligned(algo.policy(as_arrays(train)["obs"])).mean
    finally:
        algo.stop()
    return np.exp(np.clip(mean, LOG_LOW, LOG_HIGH).mean(axis=0))


def run_experiment(cfg: CRMExperiment, work_dir: str) -> dict:
    """Logs → CRM → do no harm → exact values on test states (module docstring); the untrained ("frozen")
    policy goes through the same do no harm and is measured too (the learning test's control). Needs Ray."""
    t0 = time.perf_counter()
    world, pipeline = build_world(cfg.env_config)
    shares = (1 - cfg.validation - cfg.test, cfg.validation)
    loggers, tables, states, rounds = [(tuple(cfg.logging_weights), cfg.logging_sigma)], [], [], []
    for r, n in enumerate(round_sessions(cfg.sessions, cfg.rounds)):
        if r > 0:  # log around the learned mean of a CRM fitted on the train rows so far
            train_so_far = split_by_user(pa.concat_tables(tables), shares, cfg.seed)[0]
            loggers.append(
                (tuple(learned_mean_weights(cfg, train_so_far, os.path.join(work_dir, f"round-{r}"))), cfg.round_sigma)
            )
        table, states_r, info = log_round(cfg, work_dir, r, n, *loggers[r])
        tables.append(table)
        states.append(states_r)
        rounds.append({**info, "logging_weights": list(loggers[r][0]), "logging_sigma": loggers[r][1]})
    table = mixture_propensities(tables, [logging_policy(w, sigma) for w, sigma in loggers])
    train, val, test = split_by_user(table, shares, cfg.seed)
    train_path = os.path.join(work_dir, "train")
    os.makedirs(train_path, exist_ok=True)
    pq.write_table(train, os.path.join(train_path, "part-0.parquet"))
    tr, va, te = (as_arrays(t) for t in (train, val, test))
    info = {k: sum(x[k] for x in rounds) for k in ("sessions", "requests", "events")} | {"rounds": rounds}
    t_data = time.perf_counter() - t0

    algo = cfg.algorithm_config(train_path).build_algo()
    try:
        algo.load_rows()
        q = logging_policy(cfg.logging_weights, cfg.logging_sigma)
        frozen = algo.inference_module()
        frozen_decision = algo.do_no_harm(va, q, frozen)
        frozen_served = algo.deployed_policy(te["obs"], frozen_decision, q, frozen)
        history = [dict(algo.train()["crm"]) for _ in range(cfg.iterations)]
        module = algo.inference_module()
        decision = algo.do_no_harm(va, q)
        objective = algo.reward_fn
        candidates = algo.candidates(te["obs"], module)
        pi, jittered = candidates["policy"], candidates["mean"]
        test_data = algo.logged_bandit(te)
    finally:
        algo.stop()
    t_train = time.perf_counter() - t0 - t_data

    states = LoggedStates.concat(states).select(te["request_id"])
    rng = np.random.default_rng(cfg.seed)
    mu0 = np.clip(np.log(np.asarray(cfg.logging_weights, np.float64)), LOG_LOW, LOG_HIGH)
    learned_mean = np.clip(pi.mean, LOG_LOW, LOG_HIGH)

    def draws(policy) -> np.ndarray:  # [M, N, 3]: M exact draws per test state
        return np.stack([policy.sample(rng) for _ in range(cfg.policy_draws)])

    q_test = GaussianPolicy(np.broadcast_to(q.mean, (len(states), 3)), q.cov, LOG_LOW, LOG_HIGH)
    exact = {
        "logging_mean": policy_value(pipeline, states, objective, np.broadcast_to(mu0, (len(states), 3))),
        "logging_policy": policy_value(pipeline, states, objective, draws(q_test)),
        "learned_mean": policy_value(pipeline, states, objective, learned_mean),
        "learned_mean_jitter": policy_value(pipeline, states, objective, draws(jittered)),
        "learned_policy": policy_value(pipeline, states, objective, draws(pi)),
    }
    kind = {"mean": "learned_mean_jitter", "policy": "learned_policy", "logging": "logging_policy"}
    exact["deployed"] = (  # the certified policy (same draws where its value is measured above)
        exact[kind[decision.deployed]]
        if decision.deployed in kind
        else policy_value(pipeline, states, objective, draws(candidates[decision.deployed]))
    )
    exact["frozen_deployed"] = (
        exact["logging_policy"]
        if frozen_decision.deployed == "logging"
        else policy_value(pipeline, states, objective, draws(frozen_served))
    )
    grid = ranking_grid(cfg.oracle_resolution)
    oracle_states = RequestStates(states.req, states.cohort, np.empty((len(states), 0), np.int64), states.pre_ranked)
    kpis = action_values(pipeline, oracle_states, Family.ranking(grid)).kpis
    values = objective(kpis)  # [N, A]
    best = int(values.mean(0).argmax())
    exact["oracle_static"] = float(values[:, best].mean())
    exact["oracle_request"] = float(values.max(1).mean())
    oracle_w = np.clip(np.log(np.maximum(grid[best].astype(np.float64), 1e-12)), LOG_LOW, LOG_HIGH)
    served = {**candidates, "logging": q_test}[decision.deployed]
    ope = {
        "logging_mean": _ope(test_data, np.broadcast_to(mu0, (len(test_data), 3)), True),
        "learned_mean": _ope(test_data, learned_mean, True),
        "learned_mean_jitter": _ope(test_data, jittered, False),
        "learned_policy": _ope(test_data, pi, False),
        "oracle_static": _ope(test_data, np.broadcast_to(oracle_w, (len(test_data), 3)), True),
        "deployed": _ope(test_data, served, False),
    }
    start, top = exact["logging_mean"], exact["oracle_static"]
    return {
        "config": asdict(cfg),
        "data": {**info, "train_rows": train.num_rows, "validation_rows": val.num_rows, "test_rows": test.num_rows},
        "history": history,
        "decision": {
            "deployed": decision.deployed,
            "deploy": decision.deploy,
            "reason": decision.reason,
            "level": decision.level,
            "logging_estimate": decision.logging.value,
            "certificates": {
                k: {"estimate": c.estimate.value, "ess": c.estimate.ess, "difference": c.difference}
                | {"difference_low": c.difference_low, "certified": c.certified}
                for k, c in decision.certificates.items()
            },
            "frozen_deployed": frozen_decision.deployed,
            "frozen_reason": frozen_decision.reason,
        },
        "sigma": pi.cov.tolist(),
        "learned_weights_mean": np.exp(learned_mean).mean(0).tolist(),
        "oracle_weights": grid[best].tolist(),
        "exact": exact,
        "ope": ope,
        "gap_closed": {k: gap_closed(start, v, top) for k, v in exact.items()},
        "wall_s": {"data": t_data, "train": t_train, "total": time.perf_counter() - t0},
    }
