"""The world's oracle: what a decision family can achieve on the world's exact expectations.

For a fixed set of request states s_i (users with their history, step and clicks so far), a decision
family (a grid of actions a = cascade parameters) and an objective r(s, a), the oracle reports

    reference      (1/N) Σ_i r(s_i, a_ref)                        a given setting, e.g. weights (1, 1, 10)
    static         max_a (1/N) Σ_i r(s_i, a)                       one action for everyone
    per cohort     (1/N) Σ_c max_a Σ_{i ∈ c} r(s_i, a)             one action per cohort
    per user       (1/N) Σ_u max_a Σ_{i ∈ u} r(s_i, a)             one action per user
    per request    (1/N) Σ_i max_a r(s_i, a)                       one action per request

so request ≥ user ≥ cohort ≥ static ≥ reference (the reference is one of the actions). r is exact: the
slate each action produces at s_i (the same stage noise for every action, keyed by the state's request
id, as ``expected_rewards_all_actions`` does) scored by ``World.expected_kpis`` (expected clicks, long
views, purchases, revenue) or by its NDCG@10 against the whole catalogue's ideal. It is the headroom a
learner of that family can show on these states; it does not include the state shift a deployed
policy causes (for that, ``session_headroom`` simulates whole sessions).

Families (``Family``):
    ranking   the utility weights (w_click, w_long_view, w_purchase). Ranking by Σ_k w_k·p_k is invariant
              to w → c·w (c > 0), so weights are normalised onto the simplex Σ_k w_k = 1 (one ray per
              point); ``ranking_grid`` spaces them uniformly in the heads' contribution shares
              v_k ∝ w_k·m̄_k (m̄_k = mean prediction of head k), since p_purchase is ~100× smaller than p_click.
    stages    matching and/or pre-ranking parameter vectors over a product grid, the other stages
              fixed (ranking weights at their defaults unless given); with all three stages it is the
              cascade's one static parameter vector.

Objectives: a KPI per request ("clicks", "long_views", "purchases", "revenue", "ndcg"), or
``Scalarised(λ)`` = λ·clicks/σ_clicks + (1 − λ)·long_views/σ_long_views as the utility-agent study
scalarises (λ = 1: clicks only); σ_k is the standard deviation of KPI k's exact per-request value over
all (state, action) pairs of the family's grid — the exact counterpart of the study's σ (the std of
logged rewards under uniform logging over its grid, which also holds the response noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import product

import numpy as np

from actors.cascade import Pipeline, run_cascade
from actors.simulate import inner_rewards
from actors.stages import DEFAULT_PARAMS, PARAM_NAMES, STAGES, RequestBatch, ranking_predictions, stage_rng

from .entities import COHORTS, seed_sequence
from .metrics import dcg, mean_ci
from .world import Response, Sessions

KPIS = ("clicks", "long_views", "purchases", "revenue", "ndcg")  # exact per-request objectives
SESSION_KPIS = ("ndcg", "return", "revenue", "inner_return")  # per-session KPIs of the simulated objective J
STATE_ID_BASE = 1_000_000_000  # request ids of sampled states (key the stages' noise)
SESSION_ID_BASE = 2_000_000_000  # request ids of simulated sessions: base + session · max_requests + step
LEVELS = ("static", "cohort", "user", "request")


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """A decision family: action a sets ``grid[stage][a]`` for every stage in ``grid``; the other
    stages use ``fixed`` (else their defaults)."""

    name: str
    grid: dict[str, np.ndarray]
    fixed: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError(f"family {self.name!r}: empty grid (no stage is searched)")
        unknown = sorted((set(self.grid) | set(self.fixed)) - set(STAGES))
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown stage(s) {unknown}; stages: {STAGES}")
        sizes = {s: np.shape(g)[0] if np.ndim(g) == 2 else -1 for s, g in self.grid.items()}
        for s, g in self.grid.items():
            if np.ndim(g) != 2 or np.shape(g)[1] != len(PARAM_NAMES[s]) or len(g) == 0:
                raise ValueError(
                    f"family {self.name!r}: {s} grid must be a non-empty [A, {len(PARAM_NAMES[s])}] "
                    f"array of {PARAM_NAMES[s]}, got shape {np.shape(g)}"
                )
            if not np.isfinite(g).all():
                raise ValueError(f"family {self.name!r}: {s} grid must be finite")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"family {self.name!r}: every stage's grid needs the same number of actions, got {sizes}")

    @property
    def size(self) -> int:
        return len(next(iter(self.grid.values())))

    def stage_grid(self, stage: str) -> np.ndarray:
        """Stage parameters of every action [A, n]."""
        if stage in self.grid:
            return np.asarray(self.grid[stage], np.float32)
        return np.broadcast_to(
            np.asarray(self.fixed.get(stage, DEFAULT_PARAMS[stage]), np.float32), (self.size, len(PARAM_NAMES[stage]))
        )

    def params(self, actions: np.ndarray) -> dict[str, np.ndarray]:
        """Per-request parameters [B, n] of every stage for action indices [B]."""
        return {s: self.stage_grid(s)[actions] for s in STAGES}

    def with_action(self, params: dict[str, np.ndarray] | np.ndarray) -> tuple[Family, int]:
        """This family with one more action appended (e.g. a reference setting); (family, its index).
        ``params``: stage → vector (searched stages not named take their defaults), or ranking weights."""
        params = dict(params) if isinstance(params, dict) else {"ranking": params}
        for s, p in params.items():
            if s not in self.grid and not np.array_equal(_row(p, s, self.name)[0], self.stage_grid(s)[0]):
                raise ValueError(f"family {self.name!r} does not search {s}: the setting must keep its fixed value")
        grid = {
            s: np.concatenate([self.grid[s], _row(params.get(s, DEFAULT_PARAMS[s]), s, self.name)]) for s in self.grid
        }
        if "ranking" in grid:
            grid["ranking"] = simplex(grid["ranking"], self.name)
        return Family(self.name, grid, self.fixed), self.size

    @staticmethod
    def ranking(weights: np.ndarray, fixed: dict[str, np.ndarray] | None = None) -> Family:
        """Ranking utility weights [A, 3] (normalised onto the simplex; any positive scale is the same ranking)."""
        return Family("ranking", {"ranking": simplex(weights, "ranking")}, dict(fixed or {}))

    @staticmethod
    def stages(name: str = "stages", fixed: dict[str, np.ndarray] | None = None, **grids: np.ndarray) -> Family:
        """The product grid of the given stages' grids (each [A_s, n_s]); the other stages ``fixed``."""
        shapes = {s: np.shape(g) for s, g in grids.items()}
        if not grids or any(np.size(g) == 0 for g in grids.values()):
            raise ValueError(f"family {name!r}: empty grid {shapes}")
        names = list(grids)
        rows = list(product(*(range(len(np.atleast_2d(grids[s]))) for s in names)))
        idx = np.asarray(rows, np.int64).reshape(-1, len(names))
        grid = {s: np.atleast_2d(np.asarray(grids[s], np.float32))[idx[:, j]] for j, s in enumerate(names)}
        if "ranking" in grid:
            grid["ranking"] = simplex(grid["ranking"], name)
        return Family(name, grid, dict(fixed or {}))


def _row(p, stage: str, family: str) -> np.ndarray:
    p = np.asarray(p, np.float32).reshape(1, -1)
    if p.shape[1] != len(PARAM_NAMES[stage]):
        raise ValueError(
            f"family {family!r}: a {stage} setting needs {len(PARAM_NAMES[stage])} values, got {p.shape[1]}"
        )
    return p


def simplex(weights: np.ndarray, family: str = "ranking") -> np.ndarray:
    """Utility weights [A, 3] → w / Σ_k w_k (each must be finite, ≥ 0, not all zero)."""
    w = np.atleast_2d(np.asarray(weights, np.float64))
    if w.size == 0:
        raise ValueError(f"family {family!r}: empty grid (no weight vector)")
    if w.ndim != 2 or w.shape[1] != 3:
        raise ValueError(f"family {family!r}: weights must be [A, 3] (w_click, w_long_view, w_purchase), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or (w.sum(axis=1) <= 0).any():
        raise ValueError(f"family {family!r}: weights must be finite, non-negative and not all zero")
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def ranking_grid(resolution: int, head_scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Simplex grid of utility weights [(r+1)(r+2)/2, 3], uniform in the contribution shares
    v = (i, j, k)/r (i + j + k = r); w_k ∝ v_k / head_scale_k. With head_scale = the heads' mean
    predictions, v_k is head k's share of the mean utility."""
    if resolution < 1:
        raise ValueError(f"ranking grid: resolution must be ≥ 1, got {resolution}")
    ij = [(i, j, resolution - i - j) for i in range(resolution + 1) for j in range(resolution + 1 - i)]
    v = np.asarray(ij, np.float64) / resolution
    return simplex(v / np.asarray(head_scale, np.float64))


# ---------------------------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class Scalarised:
    """λ·a/σ_a + (1 − λ)·b/σ_b of two KPIs (default clicks and long views, the study's π_λ); σ as the
    module docstring says, or given."""

    lam: float
    kpis: tuple[str, str] = ("clicks", "long_views")
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"objective λ must be in [0, 1], got {self.lam}")
        bad = [k for k in self.kpis if k not in KPIS]
        if bad or len(self.kpis) != 2:
            raise ValueError(f"unknown objective KPI(s) {bad or self.kpis}; choose two of {KPIS}")

    @property
    def name(self) -> str:
        return f"λ={self.lam:g}"


def objective_name(objective) -> str:
    return objective.name if isinstance(objective, Scalarised) else str(objective)


def objective_values(kpis: dict[str, np.ndarray], objective) -> np.ndarray:
    """r(s_i, a) [N, A] of an objective: a KPI name or a ``Scalarised``."""
    if isinstance(objective, Scalarised):
        a, b = (kpis[k] for k in objective.kpis)
        sa, sb = objective.scale or (float(a.std()), float(b.std()))
        return objective.lam * a / max(sa, 1e-12) + (1 - objective.lam) * b / max(sb, 1e-12)
    if objective not in KPIS:
        raise ValueError(f"unknown objective {objective!r}; choose one of {KPIS} or Scalarised(λ)")
    return kpis[objective]


# ---------------------------------------------------------------------------------------------- states
@dataclass(frozen=True)
class RequestStates:
    """A fixed set of request states, with matching's and pre-ranking's candidates under ``params``."""

    req: RequestBatch  # per-request ids: each state's stage noise is its own
    cohort: np.ndarray  # int [N]
    matched: np.ndarray  # [N, K1]
    pre_ranked: np.ndarray  # [N, K2]
    params: dict = field(default_factory=dict)  # the upstream parameters the candidates were made with

    def __len__(self) -> int:
        return len(self.req)

    @property
    def n_users(self) -> int:
        return len(np.unique(self.req.user))


def states_from_requests(pipeline: Pipeline, req: RequestBatch, params: dict | None = None) -> RequestStates:
    """Logged requests as oracle states (per-request ids required: the oracle evaluates in chunks)."""
    if np.ndim(req.request_id) == 0:
        raise ValueError("states need one request id per request (RequestBatch.request_id [B])")
    params = dict(params or {})
    rec = pipeline.recommend(req, params, upto="pre_ranking")
    return RequestStates(
        req, pipeline.world.users.cohort[req.user].astype(np.int64), rec.matched, rec.pre_ranked, params
    )


def sample_states(
    pipeline: Pipeline, n_users: int, requests_per_user: int = 4, seed: int = 0, params: dict | None = None
) -> RequestStates:
    """The first ``requests_per_user`` requests of sessions of ``n_users`` distinct users served by the
    cascade with ``params`` (default parameters): logged-like states with real histories. Sessions
    that end sooner give fewer states. Vectorised over users; one pass per request step."""
    world, params = pipeline.world, dict(params or {})
    if not 1 <= n_users <= world.users.n:
        raise ValueError(f"n_users must be in [1, {world.users.n}], got {n_users}")
    users = seed_sequence(seed, "oracle-state-users").choice(world.users.n, n_users, replace=False)
    rng = seed_sequence(seed, "oracle-states")
    sessions = world.start_sessions(users, pipeline.config.history_len)
    parts, matched, pre_ranked, n_seen = [], [], [], 0
    for _ in range(requests_per_user):
        act = np.flatnonzero(sessions.active)
        if len(act) == 0:
            break
        ids = STATE_ID_BASE + n_seen + np.arange(len(act), dtype=np.int64)
        req = RequestBatch(
            sessions.user[act],
            sessions.history[act].copy(),
            sessions.requests[act].copy(),
            sessions.clicks[act].copy(),
            ids,
        )
        rec = pipeline.recommend(req, params)
        parts.append(req)
        matched.append(rec.matched)
        pre_ranked.append(rec.pre_ranked)
        slates = np.zeros((sessions.size, rec.slate.shape[1]), np.int64)
        slates[act] = rec.slate
        world.step(sessions, slates, rng)
        n_seen += len(act)
    req = RequestBatch.concat(parts)
    return RequestStates(
        req, world.users.cohort[req.user].astype(np.int64), np.concatenate(matched), np.concatenate(pre_ranked), params
    )


def user_rates(pipeline: Pipeline, states: RequestStates, params: dict | None = None) -> dict[str, np.ndarray]:
    """Each user's exact expected rates over their states, served by the cascade with ``params``
    (defaults): "ctr" (clicks per impression), "long_view_rate" (long views per impression),
    "long_views_per_click", "purchases_per_click" — the per-user statistics a log would show [U]."""
    world, params = pipeline.world, dict(params or {})
    same_matching = np.array_equal(
        *(np.asarray(p.get("matching", DEFAULT_PARAMS["matching"]), np.float32) for p in (params, states.params))
    )
    rec = pipeline.recommend(states.req, params, matched=states.matched if same_matching else None)
    kpis = {k: v.sum(axis=1) for k, v in world.expected_kpis(states.req.user, rec.slate).items()}
    _, inv = np.unique(states.req.user, return_inverse=True)
    inv = inv.ravel()
    per_user = {k: np.bincount(inv, v) for k, v in kpis.items()}
    impressions = np.bincount(inv) * rec.slate.shape[1]
    return {
        "ctr": per_user["clicks"] / impressions,
        "long_view_rate": per_user["long_views"] / impressions,
        "long_views_per_click": per_user["long_views"] / per_user["clicks"],
        "purchases_per_click": per_user["purchases"] / per_user["clicks"],
    }


# ---------------------------------------------------------------------------------------------- exact values
@dataclass
class ActionValues:
    """Exact KPIs of every action at every state: kpis[name] [N, A]."""

    family: Family
    states: RequestStates
    kpis: dict[str, np.ndarray]

    def headroom(self, objective, reference: int | None = None) -> Headroom:
        return headroom(objective_values(self.kpis, objective), self.states, self.family, objective, reference)


def head_means(pipeline: Pipeline, states: RequestStates) -> np.ndarray:
    """Mean ranker predictions (p_click, p_long_view, p_purchase) over the states' pre-ranked candidates."""
    preds = ranking_predictions(
        pipeline.ctx,
        states.req,
        states.pre_ranked,
        pipeline.world.config.prediction_noise,
        stage_rng(pipeline.config.seed, "ranking", states.req.request_id),
    )
    return np.array([preds[k].mean() for k in ("p_click", "p_long_view", "p_purchase")])


def action_values(
    pipeline: Pipeline, states: RequestStates, family: Family, max_elements: int = 2_000_000
) -> ActionValues:
    """Exact KPIs [N, A] of every action of ``family`` at every state.

    Actions that share matching's and pre-ranking's parameters share their candidates (run once through
    ``run_cascade``); the ranking pass is vectorised over states × those actions in chunks of about
    ``max_elements`` utilities: the ranker's predictions (one noise draw per state) are combined with each
    weight vector, the top K3 taken as in ``actors.stages.ranking``, and the slate scored exactly.
    """
    world, cfg = pipeline.world, pipeline.config
    n, a = len(states), family.size
    upstream = np.concatenate([family.stage_grid("matching"), family.stage_grid("pre_ranking")], axis=1)
    groups, group_of = np.unique(upstream, axis=0, return_inverse=True)
    kpis = {k: np.empty((n, a), np.float64) for k in KPIS}
    ideal_dcg = _ideal_dcg(world, states.req.user, cfg.k_slate)
    default_up = np.concatenate(
        [np.asarray(states.params.get(s, DEFAULT_PARAMS[s]), np.float32) for s in ("matching", "pre_ranking")]
    )
    n_match = len(PARAM_NAMES["matching"])
    for g, up in enumerate(groups):
        cols = np.flatnonzero(group_of.ravel() == g)
        candidates = _candidates(pipeline, states, up, n_match, default_up)
        weights = family.stage_grid("ranking")[cols]
        step = max(1, max_elements // (len(cols) * candidates.shape[1]))
        for s in range(0, n, step):
            rows = slice(s, min(s + step, n))
            out = _rank_and_score(pipeline, states.req.take(rows), candidates[rows], weights, ideal_dcg[rows])
            for k in KPIS:
                kpis[k][rows, cols] = out[k]
    return ActionValues(family, states, kpis)


def _candidates(pipeline: Pipeline, states: RequestStates, up: np.ndarray, n_match: int, default_up: np.ndarray):
    """The pre-ranked candidates at the states under upstream parameters ``up`` (reused when they are the states')."""
    if np.array_equal(up, default_up):
        return states.pre_ranked
    m, p = up[:n_match], up[n_match:]
    matched = states.matched if np.array_equal(m, default_up[:n_match]) else None
    rec = run_cascade(
        pipeline.ctx,
        pipeline.config,
        states.req,
        {"matching": m, "pre_ranking": p},
        upto="pre_ranking",
        matched=matched,
    )
    return rec.pre_ranked


def _ideal_dcg(world, users: np.ndarray, k: int) -> np.ndarray:
    uniq, inv = np.unique(users, return_inverse=True)
    return dcg(world.ideal_relevance(uniq, k), k)[inv.ravel()]


def _rank_and_score(
    pipeline: Pipeline, req: RequestBatch, candidates: np.ndarray, weights: np.ndarray, ideal_dcg: np.ndarray
) -> dict[str, np.ndarray]:
    """Exact KPIs [B, A] of ranking ``candidates`` [B, K2] with each weight vector [A, 3]."""
    world, cfg = pipeline.world, pipeline.config
    preds = ranking_predictions(
        pipeline.ctx, req, candidates, world.config.prediction_noise, stage_rng(cfg.seed, "ranking", req.request_id)
    )
    w = np.asarray(weights, np.float32)[None, :, :, None]  # [1, A, 3, 1]; same float32 arithmetic as ranking()
    utility = (
        w[:, :, 0] * preds["p_click"][:, None]
        + w[:, :, 1] * preds["p_long_view"][:, None]
        + w[:, :, 2] * preds["p_purchase"][:, None]
    )  # [B, A, K2]
    k = cfg.k_slate
    top = np.argpartition(-utility, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(utility, top, axis=-1), axis=-1, kind="stable")
    top = np.take_along_axis(top, order, axis=-1)  # [B, A, K] positions in candidates, best first
    b, a = top.shape[:2]
    item = world.item_response(req.user, candidates)
    item["graded"] = world.graded_relevance(req.user, candidates)
    rows = np.arange(b)[:, None, None]
    at = {name: v[rows, top].reshape(b * a, k) for name, v in item.items()}
    exp = world.slate_expectations(at)
    out = {name: v.sum(axis=1).reshape(b, a) for name, v in exp.items()}
    out["ndcg"] = np.divide(
        dcg(at["graded"], k).reshape(b, a), ideal_dcg[:, None], out=np.zeros((b, a)), where=ideal_dcg[:, None] > 0
    )
    return out


# ---------------------------------------------------------------------------------------------- headroom
@dataclass(frozen=True)
class Headroom:
    """Oracle values (mean per request) of one objective on one family and one state set."""

    objective: str
    family: str
    n_states: int
    n_users: int
    n_actions: int
    reference: float | None
    static: float
    cohort: float
    user: float
    request: float
    static_action: int
    cohort_actions: dict[str, int]

    def lift(self, level: str) -> float:
        """Lift of a level (or "reference") over the best static action, in %."""
        if level not in (*LEVELS, "reference"):
            raise ValueError(f"unknown level {level!r}; choose from {(*LEVELS, 'reference')}")
        value = getattr(self, level)
        return float("nan") if value is None or self.static == 0 else 100.0 * (value / self.static - 1.0)


def _group_best(values: np.ndarray, groups: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Σ_g max_a Σ_{i ∈ g} V[i, a] (sorted reduceat, no per-group loop), the groups and their argmax."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sums = np.add.reduceat(values[order], starts, axis=0)
    return float(sums.max(axis=1).sum()), g[starts], sums.argmax(axis=1)


def headroom(
    values: np.ndarray, states: RequestStates, family: Family, objective, reference: int | None = None
) -> Headroom:
    """The oracle's levels for action values [N, A] (see the module docstring)."""
    v = np.asarray(values, np.float64)
    n = len(v)
    if v.ndim != 2 or n == 0 or v.shape[1] == 0:
        raise ValueError(f"action values must be a non-empty [N, A] array, got shape {v.shape}")
    mean = v.mean(axis=0)
    cohort_total, cohorts, cohort_best = _group_best(v, states.cohort)
    user_total, _, _ = _group_best(v, states.req.user)
    # Each level is ≥ the one below in exact arithmetic; max() absorbs the summation order's rounding.
    static = float(mean.max())
    cohort = max(cohort_total / n, static)
    user = max(user_total / n, cohort)
    return Headroom(
        objective=objective_name(objective),
        family=family.name,
        n_states=n,
        n_users=states.n_users,
        n_actions=v.shape[1],
        reference=None if reference is None else float(mean[reference]),
        static=static,
        cohort=cohort,
        user=user,
        request=max(float(v.max(axis=1).mean()), user),
        static_action=int(mean.argmax()),
        cohort_actions={COHORTS[c]: int(a) for c, a in zip(cohorts, cohort_best)},
    )


def oracle(pipeline: Pipeline, states: RequestStates, family: Family, objectives, reference=None) -> list[Headroom]:
    """Headroom of each objective for ``family`` at ``states``; ``reference`` (stage → vector, or ranking
    weights) is appended to the grid and reported as the reference value."""
    ref = None
    if reference is not None:
        family, ref = family.with_action(reference)
    values = action_values(pipeline, states, family)
    return [values.headroom(o, ref) for o in objectives]


# ---------------------------------------------------------------------------------------------- sessions (simulated)
@dataclass(frozen=True)
class SessionObjective:
    """J = Σ_k w_k·KPI_k per session: "ndcg" (mean NDCG@10 over the session's requests), "return"
    (P(next-day return) at the session's end), "revenue" (expected revenue of the session's slates),
    "inner_return" (Σ_t of the slates' inner rewards: the fusion-ranking MDP's return)."""

    kpi_weights: dict = field(default_factory=lambda: {"ndcg": 1.0, "return": 1.0, "revenue": 0.3})

    def __post_init__(self) -> None:
        bad = sorted(set(self.kpi_weights) - set(SESSION_KPIS))
        if bad or not self.kpi_weights:
            raise ValueError(f"unknown session KPI(s) {bad or '(none given)'}; choose from {SESSION_KPIS}")

    def __call__(self, kpis: dict[str, np.ndarray]) -> np.ndarray:
        return sum(w * kpis[k] for k, w in self.kpi_weights.items())


def simulate_sessions(
    pipeline: Pipeline, family: Family, actions: np.ndarray, users: np.ndarray, seed: int = 0
) -> dict[str, np.ndarray]:
    """Whole sessions of ``users`` [n], session i served with action ``actions[i]`` of ``family``
    (``session_kpis``: common random numbers, per-session "ndcg", "return", "revenue", "clicks", "usage",
    "requests", "inner_return")."""
    params = family.params(np.asarray(actions))
    return session_kpis(pipeline, lambda req, act: {s: p[act] for s, p in params.items()}, users, seed)


def session_kpis(pipeline: Pipeline, params_of, users: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The one session loop of the oracle: whole sessions of ``users`` [n], the active sessions ``act`` at
    each request served with ``params_of(req, act) → {stage: params}`` (stages not named keep their defaults).

    Common random numbers: step t draws the response from seed_sequence(seed, "oracle-sessions", t) over all
    n sessions (active or not) and session i's stage noise from request id SESSION_ID_BASE + i·max_requests + t,
    so two settings differ only where their slates differ. Per session: "ndcg" (mean over its requests),
    "return" (P(next-day return) at its end: the exact conditional expectation, not the draw), "revenue" and
    "clicks" (Σ of the exact expectations over its slates), "usage" (Σ dwell seconds drawn), "requests",
    "inner_return" (Σ over its slates of the drawn slate's inner reward, ``actors.simulate.inner_rewards``).
    """

    world, cfg = pipeline.world, pipeline.world.config
    users = np.asarray(users)
    n = len(users)
    sessions: Sessions = world.start_sessions(users, pipeline.config.history_len)
    ideal = dcg(world.ideal_relevance(sessions.user, 10), 10)
    ndcg_sum, revenue, clicks, p_return, inner = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for t in range(cfg.max_requests):
        act = np.flatnonzero(sessions.active)
        if len(act) == 0:
            break
        req = RequestBatch(
            sessions.user[act],
            sessions.history[act],
            sessions.requests[act],
            sessions.clicks[act],
            SESSION_ID_BASE + act.astype(np.int64) * cfg.max_requests + t,
        )
        rec = pipeline.recommend(req, params_of(req, act))
        slates = np.zeros((n, rec.slate.shape[1]), np.int64)
        slates[act] = rec.slate
        expected = world.expected_kpis(sessions.user[act], rec.slate)
        revenue[act] += expected["revenue"].sum(axis=1)
        clicks[act] += expected["clicks"].sum(axis=1)
        resp = world.step(sessions, slates, seed_sequence(seed, "oracle-sessions", t))
        served = Response(*(getattr(resp, f.name)[act] for f in fields(Response)))
        inner[act] += inner_rewards(pipeline.ctx, sessions.user[act], rec.slate, served)[1]
        ndcg_sum[act] += np.divide(
            dcg(resp.relevance[act], 10), ideal[act], out=np.zeros(len(act)), where=ideal[act] > 0
        )
        ended = act[~sessions.active[act]]
        p_return[ended] = world.return_probability(world.satisfaction(sessions)[ended])
    return {
        "ndcg": ndcg_sum / np.maximum(sessions.requests, 1),
        "return": p_return,
        "revenue": revenue,
        "clicks": clicks,
        "usage": sessions.dwell_s.astype(np.float64),
        "requests": sessions.requests.astype(np.float64),
        "inner_return": inner,
    }


@dataclass(frozen=True)
class SessionHeadroom:
    """Simulated (not exact) J per session of the best static and best per-cohort settings, chosen on one
    set of sessions and re-measured on a fresh one (independent users and random numbers), with CIs."""

    objective: dict
    family: str
    n_actions: int
    n_sessions: int
    reference: tuple[float, float] | None  # (mean, CI half-width)
    static: tuple[float, float]
    cohort: tuple[float, float]
    cohort_minus_static: tuple[float, float]  # paired (common random numbers)
    static_action: int
    cohort_actions: dict[str, int]
    confidence: float


def session_headroom(
    pipeline: Pipeline,
    family: Family,
    objective: SessionObjective | None = None,
    n_sessions: int = 500,
    seed: int = 0,
    reference=None,
    confidence: float = 0.95,
) -> SessionHeadroom:
    """Best static and best per-cohort action for the session objective J, by simulation.

    Selection: every action of the family on the same ``n_sessions`` users with common random numbers;
    static = argmax of mean J, per cohort = argmax of mean J over that cohort's sessions. Evaluation: the
    chosen settings (and ``reference``) on ``n_sessions`` fresh users with fresh common random numbers, so
    the reported values carry no selection bias; CIs are Student-t (scipy.stats), the cohort − static
    difference paired. Per user / per request are not reported: there the best action depends on the
    random path, and no exact expectation exists to search.
    """
    objective = objective or SessionObjective()
    world = pipeline.world
    ref = None
    if reference is not None:
        family, ref = family.with_action(reference)
    pick = seed_sequence(seed, "oracle-session-users")
    users = pick.choice(world.users.n, 2 * n_sessions, replace=world.users.n < 2 * n_sessions)
    select, evaluate = users[:n_sessions], users[n_sessions:]
    j = np.stack(
        [
            objective(simulate_sessions(pipeline, family, np.full(n_sessions, a), select, seed))
            for a in range(family.size)
        ]
    )  # [A, n]
    static_action = int(j.mean(axis=1).argmax())
    cohort = world.users.cohort[select]
    best = {
        c: int(j[:, cohort == c].mean(axis=1).argmax()) if (cohort == c).any() else static_action
        for c in range(len(COHORTS))
    }
    eval_cohort = world.users.cohort[evaluate]
    per_cohort = np.array([best[c] for c in eval_cohort])
    eval_seed = seed + 1_000_003

    def run(actions: np.ndarray) -> np.ndarray:
        return objective(simulate_sessions(pipeline, family, actions, evaluate, eval_seed))

    js, jc = run(np.full(n_sessions, static_action)), run(per_cohort)
    return SessionHeadroom(
        objective=dict(objective.kpi_weights),
        family=family.name,
        n_actions=family.size,
        n_sessions=n_sessions,
        reference=None if ref is None else mean_ci(run(np.full(n_sessions, ref)), confidence),
        static=mean_ci(js, confidence),
        cohort=mean_ci(jc, confidence),
        cohort_minus_static=mean_ci(jc - js, confidence),
        static_action=static_action,
        cohort_actions={COHORTS[c]: a for c, a in best.items()},
        confidence=confidence,
    )


def headroom_of_values(
    values: np.ndarray, users: np.ndarray, cohorts: np.ndarray, objective, family: str = "ranking"
) -> Headroom:
    """The oracle's levels (module docstring) for exact action values [N, A] at states known only by
    their users [N] and cohorts [N] — e.g. logged requests with stored per-action ground truth
    (rllib_policies.utility_agent.exploration.load_ground_truth) instead of ``RequestStates``."""
    v = np.asarray(values, np.float64)
    users, cohorts = np.asarray(users), np.asarray(cohorts, np.int64)
    if v.ndim != 2 or len(v) == 0 or v.shape[1] == 0 or users.shape != (len(v),) or cohorts.shape != (len(v),):
        raise ValueError(
            f"need values [N, A] (non-empty) with users [N] and cohorts [N], "
            f"got {v.shape}, {users.shape}, {cohorts.shape}"
        )
    n = len(v)
    cohort_total, cohort_ids, cohort_best = _group_best(v, cohorts)
    user_total, _, _ = _group_best(v, users)
    static = float(v.mean(axis=0).max())
    cohort = max(cohort_total / n, static)
    user = max(user_total / n, cohort)
    return Headroom(
        objective=objective_name(objective),
        family=family,
        n_states=n,
        n_users=len(np.unique(users)),
        n_actions=v.shape[1],
        reference=None,
        static=static,
        cohort=cohort,
        user=user,
        request=max(float(v.max(axis=1).mean()), user),
        static_action=int(v.mean(axis=0).argmax()),
        cohort_actions={COHORTS[c]: int(a) for c, a in zip(cohort_ids, cohort_best)},
    )


# ---------------------------------------------------------------------------------------------- policies (simulated)
def simulate_policy_sessions(pipeline: Pipeline, policy, users: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Whole sessions of ``users`` [n] served by a state-dependent ``policy(req) → {stage: params [B, n_s]}``,
    with the same common random numbers as ``simulate_sessions`` (``session_kpis``): a static action of a
    family and a learned policy evaluated on the same ``users`` and ``seed`` differ only where their slates
    differ, so their per-session difference is paired."""
    return session_kpis(pipeline, lambda req, act: policy(req), users, seed)


def static_policy(stage: str, params):
    """policy(req) serving one parameter vector of ``stage`` to every request (for ``simulate_policy_sessions``)."""
    p = np.asarray(params, np.float32).reshape(1, -1)
    if p.shape[1] != len(PARAM_NAMES[stage]):
        raise ValueError(f"a {stage} setting needs {len(PARAM_NAMES[stage])} values, got {p.shape[1]}")
    return lambda req: {stage: np.repeat(p, len(req.user), axis=0)}


# ---------------------------------------------------------------------------------------------- usage time (simulated)
def simulate_session_usage(
    pipeline: Pipeline, family: Family, actions: np.ndarray, users: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Usage time per session [n]: Σ dwell seconds (UNEX-RL's long-term reward) of the sessions that
    ``simulate_sessions`` serves — the same users, stage noise and common random numbers."""
    return simulate_sessions(pipeline, family, actions, users, seed)["usage"]


def usage_static(pipeline: Pipeline, family: Family, n_sessions: int = 500, seed: int = 0) -> tuple[int, np.ndarray]:
    """The best static action for usage time per session: argmax_a of the mean of
    ``simulate_session_usage`` over the same ``n_sessions`` users (common random numbers across
    actions, as ``session_headroom`` selects); returns (action, mean usage of every action [A])."""
    world = pipeline.world
    pick = seed_sequence(seed, "oracle-session-users")  # session_headroom's selection users
    users = pick.choice(world.users.n, 2 * n_sessions, replace=world.users.n < 2 * n_sessions)[:n_sessions]
    mean = np.array(
        [
            simulate_session_usage(pipeline, family, np.full(n_sessions, a), users, seed).mean()
            for a in range(family.size)
        ]
    )
    return int(mean.argmax()), mean
