"""Gymnasium / RLlib views of the world that the learners train on.

SessionEnv        one user session; action = ranking utility weights per request; reward = the
                  slate's inner reward; delayed KPIs (revenue, return) in the final ``info``.
UtilityWeightEnv  one step: request context → index into a grid of utility-weight vectors;
                  scalar reward = clicks, ``info["reward_vector"]`` = per-objective rewards.
MultiStageEnv     MultiAgentEnv: matching, pre_ranking, ranking act in turn within each request
                  (only the acting stage observes); every stage shares the slate's reward.

All three build the same World and Pipeline from ``env_config`` (preset, overrides, seed), so
RLlib env runners can construct them remotely.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from ray.rllib.env.multi_agent_env import MultiAgentEnv

import rust_ext
from actors.stages import PARAM_NAMES, Pipeline, RequestBatch, history_embedding, matching, pre_ranking, ranking
from actors.world import COHORTS, PipelineConfig, World, WorldConfig, ndcg_at_k, seed_sequence

RANKING_ACTION_HIGH = np.array([2.0, 2.0, 40.0], np.float32)   # w_click, w_long_view, w_purchase
STAGE_ACTION_HIGH = {
    "matching": np.array([2.0, 1.0, 1.0, 0.5], np.float32),
    "pre_ranking": np.array([2.0, 1.0, 2.0], np.float32),
    "ranking": RANKING_ACTION_HIGH,
}
_WORLD_CACHE: dict[tuple, tuple[World, Pipeline]] = {}


def build_world(env_config: dict | None) -> tuple[World, Pipeline]:
    """World + Pipeline from an env_config: {"preset", "world": {overrides}, "pipeline": {...}}.
    Cached per process: envs of one runner share the (read-only) world."""
    cfg = dict(env_config or {})
    world_overrides = dict(cfg.get("world", {}))
    pipeline_kwargs = dict(cfg.get("pipeline", {}))
    key = (cfg.get("preset", "default"), tuple(sorted(world_overrides.items())), tuple(sorted(pipeline_kwargs.items())))
    if key not in _WORLD_CACHE:
        world = World(WorldConfig.preset(cfg.get("preset", "default"), **world_overrides))
        _WORLD_CACHE[key] = (world, Pipeline(world, PipelineConfig(**pipeline_kwargs)))
    return _WORLD_CACHE[key]


def user_features(pipeline: Pipeline, req: RequestBatch, clicks: np.ndarray | None = None) -> np.ndarray:
    """Observable request context [B, 2d + 5]: user tower, mean clicked-item tower, cohort one-hot,
    request index / max, clicks so far / 10. (Never the hidden satisfaction or temper.)"""
    world, ctx = pipeline.world, pipeline.ctx
    clicks = np.asarray(req.clicks if clicks is None else clicks, np.float32)
    hist = history_embedding(ctx, req.history)
    cohort = np.eye(len(COHORTS), dtype=np.float32)[world.users.cohort[req.user]]
    step = (req.step / world.config.max_requests)[:, None]
    return np.concatenate([ctx.user_tower[req.user], hist, cohort, step, (clicks / 10.0)[:, None]], axis=1).astype(np.float32)


def slate_inner_reward(resp, predicted_relevance: np.ndarray) -> np.ndarray:
    """Σ over the slate of the Rust inner reward (default weights) → [B]."""
    b, k = resp.clicked.shape
    offsets = np.arange(0, b * k + 1, k, dtype=np.int64)
    _, totals = rust_ext.inner_reward_slates(offsets, resp.clicked.ravel(), resp.dwell_s.ravel(),
                                             resp.skipped.ravel(), predicted_relevance.astype(np.float32).ravel())
    return totals


class _SessionDriver:
    """One live session (B = 1) in a world, shared by the single- and multi-agent envs."""

    def __init__(self, env_config: dict | None):
        self.world, self.pipeline = build_world(env_config)
        self.obs_dim = 2 * self.world.config.embed_dim + len(COHORTS) + 2
        self.rng = seed_sequence(int((env_config or {}).get("seed", 0)), "env")

    def reset(self, seed: int | None) -> None:
        if seed is not None:
            self.rng = seed_sequence(seed, "env")
        user = self.rng.integers(0, self.world.users.n, 1)
        self.sessions = self.world.start_sessions(user, self.pipeline.config.history_len)
        self.ideal = self.world.ideal_relevance(user, 10)
        self.ndcg_sum = 0.0

    def request(self) -> RequestBatch:
        s = self.sessions
        return RequestBatch(s.user, s.history, s.requests, int(self.rng.integers(0, 2**62)))

    def observe(self, req: RequestBatch) -> np.ndarray:
        return user_features(self.pipeline, req, self.sessions.clicks.astype(np.float32))[0]

    def serve(self, slate: np.ndarray, predicted_relevance: np.ndarray) -> tuple[float, bool, dict]:
        resp = self.world.step(self.sessions, slate, self.rng)
        reward = float(slate_inner_reward(resp, predicted_relevance)[0])
        ndcg = float(ndcg_at_k(resp.relevance, self.ideal, 10)[0])
        self.ndcg_sum += ndcg
        s = self.sessions
        done = not bool(s.active[0])
        info = {"clicks": int(resp.clicked.sum()), "revenue": float(resp.revenue.sum()), "ndcg_at_10": ndcg,
                "dwell_s": float(resp.dwell_s.sum()),
                "reward_vector": np.array([resp.clicked.sum(), (resp.dwell_s >= 18).sum(), resp.revenue.sum()], np.float32),
                # the inner reward's features summed over the slate: clicks, Σ ln(1+dwell), skips, Σ relevance
                "inner_features": np.array([resp.clicked.sum(), np.log1p(resp.dwell_s).sum(), resp.skipped.sum(),
                                            predicted_relevance.sum()], np.float32)}
        if done:
            info.update(session_requests=int(s.requests[0]), session_items=int(s.items[0]), session_clicks=int(s.clicks[0]),
                        session_revenue=float(s.revenue[0]), session_dwell_s=float(s.dwell_s[0]),
                        returned_next_day=bool(s.returned_next_day[0]), return_gap_days=int(s.return_gap_days[0]),
                        mean_ndcg_at_10=self.ndcg_sum / int(s.requests[0]))
        return reward, done, info


class _DriverEnv(gym.Env):
    """A single-agent env over a _SessionDriver: observation = the request context."""

    metadata: dict[str, Any] = {}

    def __init__(self, env_config: dict | None = None):
        self.driver = _SessionDriver(env_config)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.driver.obs_dim,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.driver.reset(seed)
        self._req = self.driver.request()
        return self.driver.observe(self._req), {}


class SessionEnv(_DriverEnv):
    """A whole session; each step serves one slate ranked with the action's utility weights."""

    def __init__(self, env_config: dict | None = None):
        super().__init__(env_config)
        self.action_space = spaces.Box(np.zeros(3, np.float32), RANKING_ACTION_HIGH, dtype=np.float32)

    def step(self, action):
        weights = np.clip(np.asarray(action, np.float32), 0, RANKING_ACTION_HIGH)[None]
        rec = self.driver.pipeline.recommend(self._req, {"ranking": weights})
        reward, done, info = self.driver.serve(rec.slate, rec.predictions["p_click"])
        self._req = self.driver.request()
        return self.driver.observe(self._req), reward, done, False, info


def utility_weight_grid(n: int = 7, high: tuple[float, float] = (2.0, 40.0)) -> np.ndarray:
    """PRL-PUTS action set: n linearly spaced values for each of two weights (w_click fixed at 1)
    → n² vectors (w_click, w_long_view, w_purchase)."""
    a, b = np.meshgrid(np.linspace(0, high[0], n), np.linspace(0, high[1], n), indexing="ij")
    return np.stack([np.ones(n * n), a.ravel(), b.ravel()], axis=1).astype(np.float32)


class UtilityWeightEnv(_DriverEnv):
    """One request: pick a utility-weight vector from the grid; reward = clicks on the slate."""

    def __init__(self, env_config: dict | None = None):
        super().__init__(env_config)
        cfg = env_config or {}
        self.actions = utility_weight_grid(int(cfg.get("grid", 7)), tuple(cfg.get("grid_high", (2.0, 40.0))))
        self.action_space = spaces.Discrete(len(self.actions))

    def step(self, action):
        weights = self.actions[int(action)][None]
        rec = self.driver.pipeline.recommend(self._req, {"ranking": weights})
        _, _, info = self.driver.serve(rec.slate, rec.predictions["p_click"])
        info["weights"] = weights[0]
        return self.driver.observe(self._req), float(info["reward_vector"][0]), True, False, info


class MultiStageEnv(MultiAgentEnv):
    """matching → pre_ranking → ranking act in turn each request; the slate's reward goes to all.

    o_k = [request context, summary of the candidates stage k receives, upstream actions / a_max]
    (rllib_policies.unex_rl.cic.stage_observations rebuilds exactly these from o_1 and the actions).
    The acting matching stage's info carries the raw request (user, history, step, clicks,
    request_id) so learners can replay the cascade. env_config["reward"]: "inner" (the slate's inner
    reward, default) or "usage" (its dwell seconds)."""

    STAGES = ("matching", "pre_ranking", "ranking")

    def __init__(self, env_config: dict | None = None):
        from rllib_policies.unex_rl.cic import observation_dim

        super().__init__()
        self.driver = _SessionDriver(env_config)
        self.reward_kind = (env_config or {}).get("reward", "inner")
        if self.reward_kind not in ("inner", "usage"):
            raise ValueError(f"MultiStageEnv reward must be 'inner' or 'usage', got {self.reward_kind!r}")
        d = observation_dim(self.driver.pipeline)
        self.agents = self.possible_agents = list(self.STAGES)
        self.observation_spaces = {a: spaces.Box(-np.inf, np.inf, (d,), np.float32) for a in self.STAGES}
        self.action_spaces = {a: spaces.Box(np.zeros(len(PARAM_NAMES[a]), np.float32), STAGE_ACTION_HIGH[a], dtype=np.float32)
                              for a in self.STAGES}

    def _obs(self, stage: str) -> np.ndarray:
        from rllib_policies.unex_rl.cic import candidate_summary, upstream_features

        base = self.driver.observe(self._req)[None]
        return np.concatenate([base, candidate_summary(self.driver.pipeline.ctx, self._candidates, 1),
                               upstream_features(self._actions, stage, 1)], axis=1)[0].astype(np.float32)

    def _request_info(self) -> dict:
        r, s = self._req, self.driver.sessions
        return {"request": {"user": int(r.user[0]), "history": r.history[0].copy(), "step": int(r.step[0]),
                            "clicks": int(s.clicks[0]), "request_id": int(r.request_id)}}

    def _new_request(self) -> None:
        self._req = self.driver.request()
        self._turn, self._candidates, self._actions = 0, None, {}

    def reset(self, *, seed=None, options=None):
        self.driver.reset(seed)
        self._new_request()
        return {"matching": self._obs("matching")}, {"matching": self._request_info()}

    def step(self, action_dict):
        stage = self.STAGES[self._turn]
        action = np.clip(np.asarray(action_dict[stage], np.float32), 0, STAGE_ACTION_HIGH[stage])[None]
        self._actions[stage] = action
        cfg, ctx = self.driver.pipeline.config, self.driver.pipeline.ctx
        if stage == "matching":
            self._candidates = matching(ctx, self._req, action, cfg.k_matching, cfg.seed).items
        elif stage == "pre_ranking":
            self._candidates = pre_ranking(ctx, self._req, self._candidates, action, cfg.k_pre_ranking).items
        else:
            out = ranking(ctx, self._req, self._candidates, action, cfg.k_slate, cfg.seed)
            reward, done, info = self.driver.serve(out.items, out.predictions["p_click"])
            if self.reward_kind == "usage":    # UNEX-RL's long-term reward: the slate's usage time (dwell seconds)
                reward = info["dwell_s"]
            rewards = {a: reward for a in self.STAGES}
            if done:
                return ({}, rewards, {"__all__": True}, {"__all__": False}, {"ranking": info})
            self._new_request()
            return ({"matching": self._obs("matching")}, rewards, {"__all__": False}, {"__all__": False},
                    {"ranking": info, "matching": self._request_info()})
        self._turn += 1
        nxt = self.STAGES[self._turn]
        return {nxt: self._obs(nxt)}, {}, {"__all__": False}, {"__all__": False}, {}
