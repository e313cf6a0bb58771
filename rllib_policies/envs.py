"""Gymnasium / RLlib views of the world that the learners train on.

SessionEnv        one user session; action = ranking utility weights per request; reward = the
                  slate's inner reward (relevance term: the two-tower similarity, not the ranker's
                  p_click); delayed KPIs (revenue, return) in the final ``info``.
UtilityWeightEnv  one step: request context → index into a grid of utility-weight vectors;
                  scalar reward = clicks, ``info["reward_vector"]`` = per-objective rewards.
MultiStageEnv     MultiAgentEnv: matching, pre_ranking, ranking act in turn within each request
                  (only the acting stage observes); every stage shares the slate's reward.

All three build the same World and Pipeline from ``env_config`` (preset, overrides, seed), so
RLlib env runners can construct them remotely. Observations follow ``actors.observation``: the
single-agent envs observe the request context, the stages observe o_k.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from actors.cascade import build_world
from actors.simulate import inner_rewards
from actors.stages import (
    PARAM_NAMES,
    RANKING_ACTION_HIGH,
    STAGE_ACTION_HIGH,
    STAGES,
    RequestBatch,
    retrieval_relevance,
    run_stage,
    utility_weight_grid,
)
from actors.world import ndcg_at_k, seed_sequence


class _SessionDriver:
    """One live session (B = 1) in a world, shared by the single- and multi-agent envs."""

    def __init__(self, env_config: dict | None):
        self.world, self.pipeline = build_world(env_config)
        self.spec = self.pipeline.spec
        self.obs_dim = self.spec.context_dim
        self.rng = seed_sequence(int((env_config or {}).get("seed", 0)), "env")

    def reset(self, seed: int | None) -> None:
        if seed is not None:
            self.rng = seed_sequence(seed, "env")
        user = self.rng.integers(0, self.world.users.n, 1)
        self.sessions = self.world.start_sessions(user, self.pipeline.config.history_len)
        self.ideal = self.world.ideal_relevance(user, 10)
        self.ndcg_sum = 0.0

    def request(self) -> RequestBatch:
        """The session's next request. Its step and clicks are views of the live session, so they
        advance when a slate is served (an observation built after ``serve`` sees the new counts)."""
        s = self.sessions
        return RequestBatch(s.user, s.history, s.requests, s.clicks, int(self.rng.integers(0, 2**62)))

    def observe(self, req: RequestBatch) -> np.ndarray:
        """The request context [context_dim] (``ObservationSpec.context``)."""
        return self.pipeline.context(req)[0]

    def serve(self, slate: np.ndarray) -> tuple[float, bool, dict]:
        """Serve ``slate`` [1, K]; reward = its inner reward, whose relevance term is the retrieval
        towers' similarity (``retrieval_relevance``), a signal the acting policy does not control."""
        user = self.sessions.user
        resp = self.world.step(self.sessions, slate, self.rng)
        reward = float(inner_rewards(self.pipeline.ctx, user, slate, resp)[1][0])
        relevance = retrieval_relevance(self.pipeline.ctx, user, slate)
        ndcg = float(ndcg_at_k(resp.relevance, self.ideal, 10)[0])
        self.ndcg_sum += ndcg
        s = self.sessions
        done = not bool(s.active[0])
        info = {
            "clicks": int(resp.clicked.sum()),
            "revenue": float(resp.revenue.sum()),
            "ndcg_at_10": ndcg,
            "dwell_s": float(resp.dwell_s.sum()),
            "reward_vector": np.array([resp.clicked.sum(), (resp.dwell_s >= 18).sum(), resp.revenue.sum()], np.float32),
            # the inner reward's features summed over the slate: clicks, Σ ln(1+dwell), skips, Σ relevance
            "inner_features": np.array(
                [resp.clicked.sum(), np.log1p(resp.dwell_s).sum(), resp.skipped.sum(), relevance.sum()],
                np.float32,
            ),
        }
        if done:
            info.update(
                session_requests=int(s.requests[0]),
                session_items=int(s.items[0]),
                session_clicks=int(s.clicks[0]),
                session_revenue=float(s.revenue[0]),
                session_dwell_s=float(s.dwell_s[0]),
                returned_next_day=bool(s.returned_next_day[0]),
                return_gap_days=int(s.return_gap_days[0]),
                mean_ndcg_at_10=self.ndcg_sum / int(s.requests[0]),
            )
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
        reward, done, info = self.driver.serve(rec.slate)
        self._req = self.driver.request()
        return self.driver.observe(self._req), reward, done, False, info


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
        _, _, info = self.driver.serve(rec.slate)
        info["weights"] = weights[0]
        return self.driver.observe(self._req), float(info["reward_vector"][0]), True, False, info


class MultiStageEnv(MultiAgentEnv):
    """matching → pre_ranking → ranking act in turn each request; the slate's reward goes to all.

    o_k = [request context, summary of the candidates stage k receives, upstream actions / a_max]
    (``ObservationSpec.stage_observation``; ``actors.cascade.run_cascade`` rebuilds exactly these from
    the request and the actions). The acting matching stage's info carries the raw request (user,
    history, step, clicks, request_id) so learners can replay the cascade. env_config["reward"]:
    "inner" (the slate's inner reward, default) or "usage" (its dwell seconds)."""

    STAGES = STAGES

    def __init__(self, env_config: dict | None = None):
        super().__init__()
        self.driver = _SessionDriver(env_config)
        self.reward_kind = (env_config or {}).get("reward", "inner")
        if self.reward_kind not in ("inner", "usage"):
            raise ValueError(f"MultiStageEnv reward must be 'inner' or 'usage', got {self.reward_kind!r}")
        d = self.driver.spec.dim
        self.agents = self.possible_agents = list(STAGES)
        self.observation_spaces = {a: spaces.Box(-np.inf, np.inf, (d,), np.float32) for a in STAGES}
        self.action_spaces = {
            a: spaces.Box(np.zeros(len(PARAM_NAMES[a]), np.float32), STAGE_ACTION_HIGH[a], dtype=np.float32)
            for a in STAGES
        }

    def _obs(self, stage: str) -> np.ndarray:
        ctx = self.driver.pipeline.ctx
        return self.driver.spec.stage_observation(ctx, self._context, stage, self._candidates, self._actions)[0]

    def _request_info(self) -> dict:
        r, s = self._req, self.driver.sessions
        request = {
            "user": int(r.user[0]),
            "history": r.history[0].copy(),
            "step": int(r.step[0]),
            "clicks": int(s.clicks[0]),
            "request_id": int(r.request_id),
        }
        return {"request": request}

    def _new_request(self) -> None:
        self._req = self.driver.request()
        self._context = self.driver.pipeline.context(self._req)
        self._turn, self._candidates, self._actions = 0, None, {}

    def reset(self, *, seed=None, options=None):
        self.driver.reset(seed)
        self._new_request()
        return {"matching": self._obs("matching")}, {"matching": self._request_info()}

    def step(self, action_dict):
        stage = STAGES[self._turn]
        action = np.clip(np.asarray(action_dict[stage], np.float32), 0, STAGE_ACTION_HIGH[stage])[None]
        self._actions[stage] = action
        pipeline = self.driver.pipeline
        out = run_stage(pipeline.ctx, pipeline.config, stage, self._req, self._candidates, action)
        self._candidates = out.items
        if stage == "ranking":
            reward, done, info = self.driver.serve(out.items)
            if self.reward_kind == "usage":  # UNEX-RL's long-term reward: the slate's usage time (dwell seconds)
                reward = info["dwell_s"]
            rewards = {a: reward for a in STAGES}
            if done:
                return {}, rewards, {"__all__": True}, {"__all__": False}, {"ranking": info}
            self._new_request()
            infos = {"ranking": info, "matching": self._request_info()}
            return {"matching": self._obs("matching")}, rewards, {"__all__": False}, {"__all__": False}, infos
        self._turn += 1
        nxt = STAGES[self._turn]
        return {nxt: self._obs(nxt)}, {}, {"__all__": False}, {"__all__": False}, {}
