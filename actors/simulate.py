"""Run whole sessions of many users through the pipeline and summarise them.

A *slate policy* turns (pipeline recommendation, request) into the slate actually served, so
baselines (random, popularity, relevance oracle) and the learned pipeline are compared on the
same users, the same candidates and the same random draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

import rust_ext
from actors.cascade import Pipeline
from actors.stages import RequestBatch, StageContext, retrieval_relevance
from actors.telemetry import slates_events
from actors.world import World, ndcg_at_k, seed_sequence
from actors.world.world import Response

SlatePolicy = Callable[[World, Pipeline, RequestBatch, np.random.Generator], np.ndarray]
# observer(request, served slates [B, K], response of the B active sessions) — e.g. a telemetry logger
Observer = Callable[[RequestBatch, np.ndarray, Response], None]


def inner_rewards(
    ctx: StageContext, user: np.ndarray, slate: np.ndarray, resp: Response
) -> tuple[np.ndarray, np.ndarray]:
    """The Rust inner reward (default weights) of every served item [B, K] and each slate's total [B]
    for users [B] served ``slate`` [B, K] with response ``resp``. Its relevance term is the
    retrieval towers' similarity ``retrieval_relevance(ctx, user, slate)``, never the ranker's
    p_click: the dense signal stays independent of the ranking policy being trained."""
    b, k = resp.clicked.shape
    if np.shape(slate) != (b, k):
        raise ValueError(f"inner_rewards: slate {np.shape(slate)} and response {(b, k)} must have the same shape")
    offsets = np.arange(0, b * k + 1, k, dtype=np.int64)
    rewards, totals = rust_ext.inner_reward_slates(
        offsets,
        resp.clicked.ravel(),
        resp.dwell_s.ravel(),
        resp.skipped.ravel(),
        retrieval_relevance(ctx, user, slate).ravel(),
    )
    return rewards.reshape(b, k), totals


def pipeline_policy(params: dict | None = None) -> SlatePolicy:
    """The cascade with the given stage parameters (defaults when None)."""

    def policy(world, pipeline, req, rng):
        return pipeline.recommend(req, params).slate

    return policy


def random_policy(world: World, pipeline: Pipeline, req: RequestBatch, rng: np.random.Generator) -> np.ndarray:
    """k items drawn uniformly from the whole catalogue (no personalisation)."""
    k = pipeline.config.k_slate
    return rng.integers(0, world.catalogue.n, (len(req.user), k))


def popularity_policy(world: World, pipeline: Pipeline, req: RequestBatch, rng: np.random.Generator) -> np.ndarray:
    """k of the 100 most popular items (by the popularity prior), shuffled per request."""
    k = pipeline.config.k_slate
    top = np.argsort(-world.catalogue.popularity)[:100]
    return top[np.argsort(rng.random((len(req.user), len(top))), axis=1)[:, :k]]


def oracle_policy(world: World, pipeline: Pipeline, req: RequestBatch, rng: np.random.Generator) -> np.ndarray:
    """The matched candidates ranked by *true* relevance: the best any ranker could do downstream."""
    cand = pipeline.recommend(req, upto="matching").matched
    rel = world.relevance(req.user, cand)
    idx = np.argsort(-rel, axis=1)[:, : pipeline.config.k_slate]
    return np.take_along_axis(cand, idx, axis=1)


POLICIES: dict[str, SlatePolicy] = {
    "random": random_policy,
    "popularity": popularity_policy,
    "relevance_oracle": oracle_policy,
    "pipeline_default": pipeline_policy(),
}


@dataclass
class SessionSummary:
    """Per-policy means over sessions (impression-weighted where noted)."""

    policy: str
    sessions: int
    ndcg_at_10: float  # mean over requests
    ctr: float  # clicks / impressions
    requests_per_session: float
    items_per_session: float
    dwell_s_per_session: float
    revenue_per_session: float
    return_rate: float  # next-day return
    satisfaction_end: float
    returned_mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # [n_sessions] next-day return

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "returned_mask"}


def run_sessions(
    world: World,
    pipeline: Pipeline,
    policy: SlatePolicy,
    n_sessions: int = 500,
    seed: int = 0,
    name: str = "policy",
    users: np.ndarray | None = None,
    observer: Observer | None = None,
) -> SessionSummary:
    """Simulate n_sessions complete sessions (all concurrently, vectorised over users)."""
    rng = seed_sequence(seed, "sessions", name)
    if users is None:
        users = seed_sequence(seed, "session-users").integers(0, world.users.n, n_sessions)
    sessions = world.start_sessions(users, pipeline.config.history_len)
    ideal = world.ideal_relevance(sessions.user, 10)
    ndcgs, request_id = [], 0
    while sessions.active.any():
        act = np.flatnonzero(sessions.active)
        req = RequestBatch(
            sessions.user[act], sessions.history[act], sessions.requests[act], sessions.clicks[act], request_id
        )
        slate = policy(world, pipeline, req, rng)
        full = np.zeros((sessions.size, slate.shape[1]), np.int64)
        full[act] = slate
        resp = world.step(sessions, full, rng)
        ndcgs.append(ndcg_at_k(resp.relevance[act], ideal[act], 10))
        if observer is not None:
            observer(req, slate, Response(*(getattr(resp, f.name)[act] for f in fields(Response))))
        request_id += 1
    ndcg = np.concatenate(ndcgs)
    return SessionSummary(
        policy=name,
        sessions=sessions.size,
        ndcg_at_10=float(ndcg.mean()),
        ctr=float(sessions.clicks.sum() / max(sessions.items.sum(), 1)),
        requests_per_session=float(sessions.requests.mean()),
        items_per_session=float(sessions.items.mean()),
        dwell_s_per_session=float(sessions.dwell_s.mean()),
        revenue_per_session=float(sessions.revenue.mean()),
        return_rate=float(sessions.returned_next_day.mean()),
        satisfaction_end=float(world.satisfaction(sessions).mean()),
        returned_mask=sessions.returned_next_day.copy(),
    )


def compare_policies(
    world: World,
    pipeline: Pipeline,
    n_sessions: int = 500,
    seed: int = 0,
    policies: dict[str, SlatePolicy] | None = None,
) -> list[SessionSummary]:
    """Every policy on the same users (common random numbers per policy name)."""
    users = seed_sequence(seed, "session-users").integers(0, world.users.n, n_sessions)
    return [
        run_sessions(world, pipeline, p, n_sessions, seed, name, users) for name, p in (policies or POLICIES).items()
    ]


SIMULATED_T0_US = 1_767_225_600 * 10**6  # 2026-01-01T00:00:00Z: the clock of simulated logs


def simulated_events(
    pipeline: Pipeline, req: RequestBatch, slate: np.ndarray, resp: Response, request_uids: np.ndarray, **fields
):
    """Simulated slates' events as serving would log them (one RecordBatch): the logs' clock
    ts = T0 + (user·7919 mod 6 h) + 10 s per request, the inner reward and its retrieval relevance from
    the world, the response's clicks, dwell, skips, purchases and revenue; ``fields`` are the rest of
    ``slates_events``'s arguments (predictions, utility_weights, propensity, context, weight_mean, ...)."""
    rewards, _ = inner_rewards(pipeline.ctx, req.user, slate, resp)
    return slates_events(
        request_uids=request_uids,
        ts_us=SIMULATED_T0_US + (req.user * 7919 % 21_600) * 10**6 + req.step.astype(np.int64) * 10**7,
        user_ids=req.user,
        items=slate,
        clicked=resp.clicked,
        dwell_s=resp.dwell_s,
        skipped=resp.skipped,
        inner_reward=rewards,
        relevance=retrieval_relevance(pipeline.ctx, req.user, slate),
        purchased=resp.purchased,
        revenue=resp.revenue,
        **fields,
    )
