"""Ground truth on the simulator, and the whole evaluation of a trained agent: λ sweep → reward at
hit on held-out logs and simulated value per λ → frontier points, per cohort, next to the global
fixed-weight baselines and the static average-weight policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from actors.cascade import build_world
from actors.observation import ObservationSpec
from actors.simulate import run_sessions
from actors.world import COHORTS, seed_sequence

from .algorithm import UtilityAgent
from .exploration import DEFAULT_GRID, OBJECTIVES, ActionGrid
from .module import UtilityQModule
from .ope import RewardAtHit, paired_ratio_difference, ratio_mean_ci

# choose(context [B, d]) → (weights [B, 3], action indices [B] or None)
Chooser = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class PolicyRun:
    """A policy's whole sessions on the simulator: per-session reward sums [S, 2], requests [S],
    cohort [S], and how often it chose each grid action."""

    rewards: np.ndarray
    requests: np.ndarray
    cohort: np.ndarray
    action_counts: np.ndarray | None

    def value(self, cohort: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mean reward per request [2], CI half-width [2]) over all sessions or one cohort's."""
        m = slice(None) if cohort is None else self.cohort == cohort
        return ratio_mean_ci(self.rewards[m], self.requests[m])

    def minus(self, other: PolicyRun) -> tuple[np.ndarray, np.ndarray]:
        """Paired difference of values (same users, same draws) with its CI."""
        return paired_ratio_difference(self.rewards, self.requests, other.rewards, other.requests)


def evaluation_users(env_config: dict | None, n_sessions: int, seed: int) -> np.ndarray:
    """Distinct simulated users (one session each), the same for every policy evaluated with ``seed``."""
    world, _ = build_world(env_config)
    return seed_sequence(seed, "utility-eval-users").choice(
        world.users.n, min(n_sessions, world.users.n), replace=False
    )


class _Tally:
    """Per-session reward sums and request counts for distinct users, and action counts."""

    def __init__(self, world, users: np.ndarray, grid: ActionGrid):
        self.index = np.full(world.users.n, -1, np.int64)
        self.index[users] = np.arange(len(users))
        self.rewards, self.requests = np.zeros((len(users), len(OBJECTIVES))), np.zeros(len(users))
        self.counts, self.tracked = np.zeros(grid.size, np.int64), True
        self.cohort = world.users.cohort[users].astype(np.int64)

    def add(
        self, users: np.ndarray, clicks: np.ndarray, long_views: np.ndarray, actions: np.ndarray | None = None
    ) -> None:
        rows = self.index[users]
        self.rewards[rows, 0] += clicks
        self.rewards[rows, 1] += long_views
        self.requests[rows] += 1
        if actions is None:
            self.tracked = False
        else:
            self.counts += np.bincount(actions, minlength=len(self.counts))

    def run(self) -> PolicyRun:
        return PolicyRun(self.rewards, self.requests, self.cohort, self.counts if self.tracked else None)


def simulate_policy(
    env_config: dict | None, choose: Chooser, users: np.ndarray, seed: int = 0, grid: ActionGrid = DEFAULT_GRID
) -> PolicyRun:
    """Deploy ``choose`` on the simulator: one whole session per user with its utility weights at
    every request, sampled responses. All policies share the users and the response draws (common
    random numbers until sessions start to end differently), so differences are paired by user."""
    world, pipeline = build_world(env_config)
    tally, chosen = _Tally(world, users, grid), {}

    def policy(world_, pipeline_, req, rng):
        w, actions = choose(pipeline_.context(req))
        chosen[req.request_id] = actions
        return pipeline_.recommend(req, {"ranking": np.asarray(w, np.float32)}).slate

    def observer(req, slate, resp):
        tally.add(
            req.user,
            resp.clicked.sum(axis=1),
            (resp.clicked & (resp.dwell_s >= 18.0)).sum(axis=1),
            chosen.pop(req.request_id),
        )

    run_sessions(world, pipeline, policy, len(users), seed, "utility-ground-truth", users, observer)
    return tally.run()


def one_step_value(
    env_config: dict | None, choose: Chooser, users: np.ndarray, seed: int = 0, grid: ActionGrid = DEFAULT_GRID
) -> PolicyRun:
    """The one-step ground truth that reward at hit estimates: sessions are driven by the uniform
    logging policy (so states follow the logs' distribution); at every request π's own slate is
    built as well and scored by the simulator's exact expected clicks and long views
    (World.expected_response): E_{s ~ logging}[ r(s, π(s)) ], per request."""
    world, pipeline = build_world(env_config)
    tally, log_rng = _Tally(world, users, grid), seed_sequence(seed, "one-step-logging")

    def policy(world_, pipeline_, req, rng):
        w, actions = choose(pipeline_.context(req))
        clicks, long_views = world_.expected_response(
            req.user, pipeline_.recommend(req, {"ranking": np.asarray(w, np.float32)}).slate
        )
        tally.add(req.user, clicks.sum(axis=1), long_views.sum(axis=1), actions)
        logged = log_rng.integers(0, grid.size, len(req.user))
        return pipeline_.recommend(req, {"ranking": grid.weights[logged]}).slate

    run_sessions(world, pipeline, policy, len(users), seed, "utility-one-step", users)
    return tally.run()


def fixed_chooser(weights: np.ndarray, action: int | None = None) -> Chooser:
    w = np.asarray(weights, np.float32)
    return lambda obs: (np.broadcast_to(w, (len(obs), 3)), None if action is None else np.full(len(obs), action))


def agent_chooser(
    algo_or_module: UtilityAgent | UtilityQModule, lam: float, grid: ActionGrid = DEFAULT_GRID
) -> Chooser:
    """π_λ from a UtilityAgent (its driver copy) or a UtilityQModule."""
    module = algo_or_module.inference_module() if isinstance(algo_or_module, UtilityAgent) else algo_or_module
    weights = grid.weights

    def choose(obs):
        with torch.no_grad():
            a = module.greedy(torch.as_tensor(obs), lam).numpy()
        return weights[a], a

    return choose


def observation_spec(env_config: dict | None) -> ObservationSpec:
    """The layout of the request contexts logged on this env_config's world."""
    return build_world(env_config)[1].spec


def cohort_of(obs: np.ndarray, spec: ObservationSpec) -> np.ndarray:
    """Each logged context's cohort index [N], decoded from its one-hot [N, n_cohorts]."""
    return spec.field(obs, "cohort").argmax(axis=1)


def off_policy_point(
    logs: dict, policy_actions: np.ndarray, cohorts: np.ndarray, estimator: RewardAtHit | None = None
) -> dict:
    """Reward at hit of a policy on held-out logs (CIs clustered by user), overall and per cohort
    (``cohorts`` [N]: each logged request's cohort index, ``cohort_of``); 95 % CIs by default."""
    estimator = estimator or RewardAtHit()
    overall = estimator.estimate(logs["action"], logs["propensity"], logs["rewards"], policy_actions, logs["user_id"])
    per = {}
    for c, name in enumerate(COHORTS):
        m = cohorts == c
        if not m.any():
            continue
        per[name] = estimator.estimate(
            logs["action"][m], logs["propensity"][m], logs["rewards"][m], policy_actions[m], logs["user_id"][m]
        ).row(OBJECTIVES)
    return {**overall.row(OBJECTIVES), "cohorts": per}


def simulated_point(run: PolicyRun) -> dict:
    v, ci = run.value()
    out = {**{n: float(x) for n, x in zip(OBJECTIVES, v)}, **{f"{n}_ci": float(x) for n, x in zip(OBJECTIVES, ci)}}
    out["cohorts"] = {}
    for c, name in enumerate(COHORTS):
        if (run.cohort == c).sum() > 1:
            vc, cic = run.value(c)
            out["cohorts"][name] = {
                **{n: float(x) for n, x in zip(OBJECTIVES, vc)},
                **{f"{n}_ci": float(x) for n, x in zip(OBJECTIVES, cic)},
            }
    return out
