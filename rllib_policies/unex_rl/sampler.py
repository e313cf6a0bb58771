"""Sessions served by the three stage policies (vectorised over sessions), and the replay buffer.

Each request walks the cascade once (``actors.cascade.run_cascade``): o_1 → a_1 = μ_1(o_1) (+ noise)
→ matching → o_2 → a_2 → pre-ranking → o_3 → a_3 → ranking → slate → the world's response. The
observations are the ``ObservationSpec``'s, as MultiStageEnv and the CIC replay build them, with one
random stream per request (request ids [B]), so a stored transition can be replayed exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import numpy as np
import torch

from actors.cascade import Pipeline
from actors.stages import STAGE_ACTION_HIGH, STAGES, RequestBatch
from actors.world import ndcg_at_k, seed_sequence

N_ITEM_GROUPS = 4
REQUEST_FIELDS = tuple(f.name for f in fields(RequestBatch))  # user, history, step, clicks, request_id


def behaviour_policy(
    module,
    stage: str,
    rng: np.random.Generator,
    explore: bool,
    std: float,
    session_noise: np.ndarray | None = None,
    correlation: float = 0.0,
) -> Callable[[np.ndarray], np.ndarray]:
    """o_k ↦ clip(μ_k(o_k) + σ·a_max·(√ρ·ε_s + √(1 − ρ)·ε), 0, a_max): ε ~ N(0, I) from ``rng`` per request,
    ε_s (``session_noise``, one row per request) drawn once per session, ρ = ``correlation`` the share of the
    noise's variance a session's requests have in common (ρ 0: ε_s unused; no noise unless ``explore``)."""
    high = STAGE_ACTION_HIGH[stage]

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            a = module.act(torch.as_tensor(obs)).numpy()
        if explore:
            eps = rng.standard_normal(a.shape) if correlation < 1 else 0.0
            if correlation > 0:
                eps = np.sqrt(correlation) * session_noise + np.sqrt(1 - correlation) * eps
            a = a + std * high * eps
        return np.clip(a, 0, high).astype(np.float32)

    return act


def sample_sessions(
    pipeline: Pipeline,
    stage_policies: dict,
    n_sessions: int,
    rng: np.random.Generator,
    explore: bool = True,
    explore_std: float | dict[str, float] = 0.1,
    users_seed: int | None = None,
    explore_stages=STAGES,
    explore_correlation: float = 0.0,
) -> tuple[dict, dict]:
    """Serve ``n_sessions`` whole sessions; returns (per-request transitions, session summary).
    Gaussian exploration on ``explore_stages`` only (stages that do not learn serve their policy), σ
    ``explore_std`` (a fraction of each action's range; a dict: per stage);
    ``explore_correlation`` ρ: the share of the noise's variance drawn once per session (``behaviour_policy``);
    ``users_seed`` fixes the users, request ids and responses (evaluation on common random numbers)."""
    world = pipeline.world
    users = (seed_sequence(users_seed, "unex-eval-users") if users_seed is not None else rng).integers(
        0, world.users.n, n_sessions
    )
    resp_rng = seed_sequence(int(rng.integers(0, 2**31)) if users_seed is None else users_seed, "unex-responses")
    sessions = world.start_sessions(users, pipeline.config.history_len)
    ideal = world.ideal_relevance(sessions.user, 10)
    session_noise = (
        {s: rng.standard_normal((n_sessions, len(STAGE_ACTION_HIGH[s]))) for s in STAGES}
        if explore and explore_correlation > 0
        else dict.fromkeys(STAGES)
    )
    rows, pending = [], np.full(n_sessions, -1)
    ndcg_sum, n_rows = np.zeros(n_sessions), 0
    while sessions.active.any():
        act = np.flatnonzero(sessions.active)
        b = len(act)
        rid_rng = rng if users_seed is None else seed_sequence(users_seed, "rid", n_rows)
        rids = rid_rng.integers(0, 2**62, b)
        req = RequestBatch(
            sessions.user[act],
            sessions.history[act].copy(),
            sessions.requests[act].copy(),
            sessions.clicks[act].copy(),
            rids,
        )
        context = pipeline.context(req)
        policies = {
            s: behaviour_policy(
                stage_policies[s],
                s,
                rng,
                explore and s in explore_stages,
                explore_std[s] if isinstance(explore_std, dict) else explore_std,
                None if session_noise[s] is None else session_noise[s][act],
                explore_correlation,
            )
            for s in STAGES
        }
        rec = pipeline.recommend(req, policies=policies, observe=True, context=context)
        full = np.zeros((n_sessions, rec.slate.shape[1]), np.int64)
        full[act] = rec.slate
        resp = world.step(sessions, full, resp_rng)
        ndcg_sum[act] += ndcg_at_k(resp.relevance[act], ideal[act], 10)
        idx = np.arange(n_rows, n_rows + b)
        rows.append(
            {
                "context": context,
                **{f"obs_{s}": rec.observations[s] for s in STAGES},
                **{f"act_{s}": rec.actions[s] for s in STAGES},
                **{f: getattr(req, f) for f in REQUEST_FIELDS},
                "reward_s": resp.dwell_s[act].sum(axis=1).astype(np.float32),
                "done": ~sessions.active[act],
                "user_group": world.users.cohort[req.user].astype(np.int64),
                "item_group": item_group(world, req.history),
                "session": act,
                "prev": pending[act].copy(),
            }
        )
        pending[act] = idx
        n_rows += b
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    _link_next(batch)
    summary = {
        "usage_s_per_session": float(sessions.dwell_s.mean()),
        "return_rate": float(sessions.returned_next_day.mean()),
        "ndcg_at_10": float((ndcg_sum / np.maximum(sessions.requests, 1)).mean()),
        "requests_per_session": float(sessions.requests.mean()),
        "clicks_per_session": float(sessions.clicks.mean()),
    }
    return batch, summary


def item_group(world, history: np.ndarray) -> np.ndarray:
    """CQR's item group, independent of the stages' actions (so a policy cannot move its own rewards
    between cells): the popularity tier (0-3) of the category of the user's most recently clicked
    item, N_ITEM_GROUPS for a request with no click history."""
    last = history[:, -1]
    tier = world.catalogue.category[np.maximum(last, 0)] * N_ITEM_GROUPS // world.config.n_categories
    return np.where(last >= 0, tier, N_ITEM_GROUPS).astype(np.int64)


def _link_next(batch: dict) -> None:
    """next_* columns: each request's next request in the same session (itself when it is the last)."""
    n = len(batch["prev"])
    nxt = np.arange(n)
    has_prev = batch["prev"] >= 0
    nxt[batch["prev"][has_prev]] = np.flatnonzero(has_prev)
    for k in ("context", *(f"obs_{s}" for s in STAGES), *REQUEST_FIELDS):
        batch[f"next_{k}"] = batch[k][nxt]
    del batch["prev"], batch["session"]


class ReplayBuffer:
    """A FIFO ring of transitions (dict of arrays), sampled uniformly."""

    def __init__(self, capacity: int):
        self.capacity, self.data, self.size, self.pos = capacity, {}, 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, batch: dict) -> None:
        n = len(next(iter(batch.values())))
        if not self.data:
            self.data = {
                k: np.zeros((self.capacity, *np.asarray(v).shape[1:]), np.asarray(v).dtype) for k, v in batch.items()
            }
        idx = (self.pos + np.arange(n)) % self.capacity
        for k, v in batch.items():
            self.data[k][idx] = v
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> dict:
        idx = rng.integers(0, self.size, n)
        return {k: v[idx] for k, v in self.data.items()}

    def state(self) -> dict:
        return {"size": self.size, "pos": self.pos, "data": {k: v[: self.size].copy() for k, v in self.data.items()}}

    def set_state(self, state: dict) -> None:
        self.size, self.pos = int(state["size"]), int(state["pos"])
        if state["data"]:
            self.data = {k: np.zeros((self.capacity, *v.shape[1:]), v.dtype) for k, v in state["data"].items()}
            for k, v in state["data"].items():
                self.data[k][: len(v)] = v


def transitions_from_episodes(pipeline: Pipeline, episodes) -> tuple[dict, dict]:
    """MultiStageEnv episodes (RLlib MultiAgentEpisodes, env_config reward "usage") → the same
    transition columns as ``sample_sessions``: the raw request from matching's infos, each stage's
    observation and (box-clipped) action, the context (o_1's context part), the ranking stage's
    reward as usage seconds."""
    world, spec = pipeline.world, pipeline.spec
    rows, usage, requests = [], [], []
    for ep in episodes:
        per = {s: ep.agent_episodes[s] for s in STAGES}
        n = len(per["ranking"].get_actions())
        if n == 0:
            continue
        cols = {}
        for s in STAGES:
            cols[f"obs_{s}"] = np.asarray(per[s].get_observations(slice(0, n)), np.float32)
            cols[f"act_{s}"] = np.clip(np.asarray(per[s].get_actions(slice(0, n)), np.float32), 0, STAGE_ACTION_HIGH[s])
        reqs = [info["request"] for info in per["matching"].get_infos(slice(0, n))]
        for f in ("user", "request_id"):
            cols[f] = np.array([r[f] for r in reqs], np.int64)
        for f in ("step", "clicks"):
            cols[f] = np.array([r[f] for r in reqs], np.int32)
        cols["history"] = np.stack([r["history"] for r in reqs]).astype(np.int64)
        cols["context"] = cols["obs_matching"][:, : spec.context_dim]
        cols["reward_s"] = np.asarray(per["ranking"].get_rewards(slice(0, n)), np.float32)
        cols["done"] = np.arange(n) == n - 1
        cols["user_group"] = world.users.cohort[cols["user"]].astype(np.int64)
        cols["item_group"] = item_group(world, cols["history"])
        cols["prev"] = np.r_[-1, np.arange(n - 1)] + sum(len(r["done"]) for r in rows) * (np.arange(n) > 0)
        rows.append(cols)
        usage.append(cols["reward_s"].sum())
        requests.append(n)
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    batch["session"] = np.zeros(len(batch["done"]), np.int64)
    _link_next(batch)
    return batch, {"usage_s_per_session": float(np.mean(usage)), "requests_per_session": float(np.mean(requests))}
