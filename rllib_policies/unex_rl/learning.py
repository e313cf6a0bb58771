"""UNEX-RL's learning test: from a starved matching stage towards the oracle's best static stage parameters.

Start: the stage policies are initialised at a deliberately bad setting, a *starved* matching stage
(``STARVED_MATCHING``: relevance weight near 0, high Gumbel exploration, so matching retrieves mostly
noise); pre-ranking and ranking at their defaults. Objective: usage time per session (Σ dwell seconds,
the long-term reward UNEX-RL optimises). Target: the oracle's best static stage parameters on the same
objective and world (``actors.world.oracle.usage_static``, which selects as ``session_headroom`` does,
over a matching-parameter ``Family``, simulated with common random numbers). Every value — start,
final, oracle static — is measured by one evaluator: the deterministic policies (a static setting is a
constant policy) on the same simulated users with the same random numbers
(``sample_sessions(..., users_seed=…)``), and

    gap closed = (J(final) − J(start)) / (J(oracle static) − J(start)).

UNEX-RL moves all three stages, so the oracle searches their joint static parameters
(``joint_oracle_static``): coordinate ascent over a matching, a pre-ranking and a ranking grid inside the
stage policies' action box, each stage's grid searched with the others fixed at their best so far, every
candidate on the same simulated users with common random numbers (``usage_static``); the best few
settings seen are then re-measured on more, fresh sessions and the best of those is the oracle static.
"""

from __future__ import annotations

import time
from itertools import product

import numpy as np
import torch

from actors.cascade import Pipeline
from actors.stages import DEFAULT_PARAMS, STAGES
from actors.world.oracle import Family, usage_static
from rllib_policies.envs import MultiStageEnv

from .algorithm import UnexRL, UnexRLConfig
from .sampler import sample_sessions

# w_relevance, w_popularity, w_history, exploration: retrieval by noise, the relevance signal ~10× weaker
# than the defaults (1.0, 0.05, 0.5, 0.05) and the Gumbel exploration 8× stronger
STARVED_MATCHING = (0.1, 0.05, 0.5, 0.4)


def matching_family(
    w_relevance=(0.1, 0.5, 1.0, 1.9),
    w_popularity=(0.05, 0.3),
    w_history=(0.0, 0.5, 1.0),
    exploration=(0.01, 0.05, 0.4),
) -> Family:
    """The product grid of matching parameters (pre-ranking and ranking at their defaults); the
    default grid holds the starved start and 71 other settings."""
    grid = np.array(list(product(w_relevance, w_popularity, w_history, exploration)), np.float32)
    return Family.stages("matching", matching=grid)


def pre_ranking_grid(
    w_relevance=(0.0, 0.5, 2.0), w_popularity=(0.0, 0.1, 0.5, 1.0), w_quality=(0.0, 0.5, 2.0)
) -> np.ndarray:
    """Pre-ranking parameters [A, 3] inside the action box (a linear top-k scorer: only the ray matters;
    the all-zero vector is left out)."""
    grid = np.array(list(product(w_relevance, w_popularity, w_quality)), np.float32)
    return grid[grid.sum(axis=1) > 0]


def ranking_weight_grid(
    w_click=(0.0, 1.0, 2.0), w_long_view=(0.0, 1.0, 2.0), w_purchase=(0.0, 10.0, 40.0)
) -> np.ndarray:
    """Ranking utility weights [A, 3] inside the action box (the all-zero vector left out)."""
    grid = np.array(list(product(w_click, w_long_view, w_purchase)), np.float32)
    return grid[grid.sum(axis=1) > 0]


def joint_oracle_static(
    pipeline: Pipeline,
    grids: dict[str, np.ndarray] | None = None,
    n_sessions: int = 300,
    rounds: int = 2,
    top: int = 5,
    final_sessions: int = 1000,
    seed: int = 0,
) -> tuple[dict, dict]:
    """The oracle's best static parameters of all three stages for usage time, by coordinate ascent:

        a_k ← argmax_{a ∈ grid_k} J(a_1, …, a, …, a_3)      for k = matching, pre-ranking, ranking,

    starting from the defaults, ``rounds`` sweeps (fewer if a sweep changes nothing), J = mean usage per
    session on the same ``n_sessions`` users with common random numbers (``usage_static``). The ``top``
    best settings seen are re-measured on ``final_sessions`` fresh users and random numbers (seed + 1)
    and the best of them is returned: ({stage: vector}, {"evaluated": settings searched, "top": the
    re-measured [(params, J on n_sessions, J on final_sessions)]})."""
    grids = grids or {
        "matching": matching_family().grid["matching"],
        "pre_ranking": pre_ranking_grid(),
        "ranking": ranking_weight_grid(),
    }
    best = {s: np.asarray(DEFAULT_PARAMS[s], np.float32) for s in STAGES}
    seen: dict[tuple, tuple[dict, float]] = {}
    for _ in range(rounds):
        before = {s: best[s].copy() for s in STAGES}
        for stage in STAGES:
            fixed = {s: best[s] for s in STAGES if s != stage}
            family = Family.stages(f"joint-{stage}", fixed=fixed, **{stage: np.asarray(grids[stage], np.float32)})
            action, usage = usage_static(pipeline, family, n_sessions, seed)
            for a in range(family.size):
                params = {s: family.stage_grid(s)[a].copy() for s in STAGES}
                seen[tuple(np.concatenate([params[s] for s in STAGES]).round(5))] = (params, float(usage[a]))
            best = {s: family.stage_grid(s)[action].copy() for s in STAGES}
        if all(np.array_equal(before[s], best[s]) for s in STAGES):
            break
    ranked = sorted(seen.values(), key=lambda x: -x[1])[:top]
    family = Family("joint-top", {s: np.stack([p[s] for p, _ in ranked]) for s in STAGES})
    action, final = usage_static(pipeline, family, final_sessions, seed + 1)
    chosen = {s: ranked[action][0][s] for s in STAGES}
    top_rows = [(p, j, float(f)) for (p, j), f in zip(ranked, final)]
    return chosen, {"evaluated": len(seen), "top": top_rows}


def oracle_static(pipeline: Pipeline, family: Family, n_sessions: int = 300, seed: int = 0) -> tuple[dict, np.ndarray]:
    """The oracle's best static stage parameters for usage time ({stage: vector}; ``oracle.usage_static``:
    every action on the same simulated users with common random numbers) and every action's mean usage."""
    action, usage = usage_static(pipeline, family, n_sessions, seed)
    return {s: family.stage_grid(s)[action] for s in STAGES}, usage


class StaticPolicy:
    """A constant stage policy: μ(o) = a for every observation (a static setting, evaluated like a learner)."""

    def __init__(self, params):
        self.params = torch.tensor(np.asarray(params, np.float32))

    def act(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        return self.params.expand(len(obs), -1)


def static_policies(params: dict | None = None) -> dict:
    """Constant policies for every stage: ``params`` (stage → vector), else the defaults."""
    params = dict(params or {})
    return {s: StaticPolicy(params.get(s, DEFAULT_PARAMS[s])) for s in STAGES}


def usage_per_session(
    pipeline: Pipeline, policies: dict, n_sessions: int, seed: int, explore_std: dict[str, float] | None = None
) -> float:
    """Mean usage seconds per session of deterministic ``policies`` on ``n_sessions`` users fixed by
    ``seed`` (the same users, request ids and response draws for every policy); ``explore_std`` (stage → σ):
    served with that Gaussian exploration on every stage instead, the same noise draws for every policy."""
    explore = explore_std is not None
    noise = {"explore_std": explore_std} if explore else {}
    _, summary = sample_sessions(
        pipeline, policies, n_sessions, np.random.default_rng(seed), explore=explore, users_seed=seed, **noise
    )
    return summary["usage_s_per_session"]


def build_learner(env: dict, arm: str, seed: int, init_params: dict | None = None, **options) -> UnexRL:
    """UnexRL on ``env`` with ``arm``, started at ``init_params`` (default: the starved matching stage);
    ``options``: ``.unex_rl`` keywords, and ``gamma`` (``.training``)."""
    init = {"matching": STARVED_MATCHING} if init_params is None else init_params
    training = {k: options.pop(k) for k in ("gamma",) if k in options}
    return (
        UnexRLConfig()
        .environment(MultiStageEnv, env_config={**env, "seed": seed})
        .training(**training)
        .unex_rl(arm=arm, init_params=init, **options)
        .debugging(seed=seed, log_level="ERROR")
        .build_algo()
    )


def learning_run(
    env: dict,
    arm: str,
    seed: int,
    iterations: int,
    eval_sessions: int = 300,
    eval_seed: int = 10_000,
    curve_every: int = 0,
    curve_sessions: int = 100,
    **options,
) -> dict:
    """Train ``arm`` from the starved start for ``iterations``; the deterministic policies' usage per
    session before and after (``eval_sessions`` users of ``eval_seed``) and, every ``curve_every``
    iterations, on ``curve_sessions`` users (0: no curve)."""
    algo = build_learner(env, arm, seed, **options)
    t0, curve = time.perf_counter(), []
    try:
        pipeline = algo.pipeline
        start = usage_per_session(pipeline, algo.stage_policies, eval_sessions, eval_seed)
        for i in range(iterations + 1):
            if curve_every and i % curve_every == 0:
                curve.append(
                    (
                        i,
                        usage_per_session(pipeline, algo.deployed_policies, curve_sessions, eval_seed + 1),
                        algo.sessions_seen,
                    )
                )
            if i == iterations:
                break
            algo.train()
        final = usage_per_session(pipeline, algo.deployed_policies, eval_sessions, eval_seed)
        params = mean_actions(algo)
        sessions = algo.sessions_seen
    finally:
        algo.stop()
    return {
        "arm": arm,
        "seed": seed,
        "start": start,
        "final": final,
        "curve": curve,
        "sessions": sessions,
        "mean_params": params,
        "wall_s": time.perf_counter() - t0,
    }


def mean_action(pipeline: Pipeline, policies: dict, n_sessions: int) -> dict[str, np.ndarray]:
    """Each stage policy's mean deterministic action ā over the requests of ``n_sessions`` fixed sessions."""
    batch, _ = sample_sessions(pipeline, policies, n_sessions, np.random.default_rng(0), explore=False, users_seed=0)
    return {s: batch[f"act_{s}"].mean(axis=0) for s in STAGES}


def mean_actions(algo: UnexRL, n_sessions: int = 20) -> dict[str, list[float]]:
    """The deployed policies' ``mean_action``, rounded for a results file."""
    return {s: a.round(3).tolist() for s, a in mean_action(algo.pipeline, algo.deployed_policies, n_sessions).items()}
