"""The three stages of the cascade as pure, vectorised functions of (request batch, parameters).
(``actors.cascade.run_cascade`` walks them in order; ``actors.observation`` builds what a policy sees.)

matching     two-tower retrieval over the whole catalogue → top-K1 (default 500)
pre_ranking  a cheap linear scorer over K1 candidates       → top-K2 (default 50)
ranking      multi-task predictions p_click, p_long_view, p_purchase (ground truth + calibrated
             logit noise, standing in for a trained ranker) combined by utility weights
             w into Σ_k w_k·p_k                                → the slate, top-K3 (default 10)

Each stage's *action* is its parameter vector (per request or shared), so later learners can set
it per request. Randomness comes only from ``seed_sequence(seed, stage, request_id)``, so the
same request through the in-process pipeline and through the stage actors gives the same slate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.matching_index import MatchingIndex
from actors.world import PipelineConfig, World, seed_sequence
from actors.world.world import sigmoid

STAGES = ("matching", "pre_ranking", "ranking")  # the cascade's order
# Parameter vectors (the stages' actions), with defaults.
MATCHING_PARAMS = ("w_relevance", "w_popularity", "w_history", "exploration")
PRE_RANKING_PARAMS = ("w_relevance", "w_popularity", "w_quality")
RANKING_PARAMS = ("w_click", "w_long_view", "w_purchase")
DEFAULT_PARAMS = {
    "matching": np.array([1.0, 0.05, 0.5, 0.05], np.float32),
    "pre_ranking": np.array([1.0, 0.1, 0.5], np.float32),
    "ranking": np.array([1.0, 1.0, 10.0], np.float32),
}
PARAM_NAMES = {"matching": MATCHING_PARAMS, "pre_ranking": PRE_RANKING_PARAMS, "ranking": RANKING_PARAMS}
# The box a learned stage policy acts in: a_k ∈ [0, STAGE_ACTION_HIGH[k]] (learners scale by it).
STAGE_ACTION_HIGH = {
    "matching": np.array([2.0, 1.0, 1.0, 0.5], np.float32),
    "pre_ranking": np.array([2.0, 1.0, 2.0], np.float32),
    "ranking": np.array([2.0, 2.0, 40.0], np.float32),  # w_click, w_long_view, w_purchase
}
RANKING_ACTION_HIGH = STAGE_ACTION_HIGH["ranking"]


def utility_weight_grid(n: int = 7, high: tuple[float, float] = (2.0, 40.0)) -> np.ndarray:
    """PRL-PUTS's action set of ranking weights: n linearly spaced values for each of w_long_view ∈
    [0, high[0]] and w_purchase ∈ [0, high[1]], w_click fixed at 1 → n² vectors (w_click, w_long_view,
    w_purchase). Fixing w_click removes the scale freedom of ranking by Σ w·p."""
    a, b = np.meshgrid(np.linspace(0, high[0], n), np.linspace(0, high[1], n), indexing="ij")
    return np.stack([np.ones(n * n), a.ravel(), b.ravel()], axis=1).astype(np.float32)


LONG_VIEW_S = 18.0  # KuaiRand "long view"


@dataclass(frozen=True)
class RequestBatch:
    """What the serving system observes for B requests (never the hidden session state)."""

    user: np.ndarray  # int64 [B]
    history: np.ndarray  # int64 [B, H] recently clicked items, -1 = empty
    step: np.ndarray  # int32 [B] request index within the session
    clicks: np.ndarray | None = None  # int [B] clicks so far in the session (a policy feature), if known
    request_id: int | np.ndarray = 0  # keys the stages' randomness: one id for the batch, or one per request [B]

    def __post_init__(self) -> None:
        if self.history.ndim != 2 or len(self.history) != len(self.user) or len(self.step) != len(self.user):
            raise ValueError("RequestBatch: user [B], history [B, H] and step [B] must share B")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx) -> RequestBatch:
        """The requests at ``idx`` (a scalar request id is kept for all of them)."""
        rid = self.request_id if np.ndim(self.request_id) == 0 else np.asarray(self.request_id)[idx]
        clicks = None if self.clicks is None else self.clicks[idx]
        return RequestBatch(self.user[idx], self.history[idx], self.step[idx], clicks, rid)

    @staticmethod
    def concat(parts: list[RequestBatch]) -> RequestBatch:
        """One batch of all requests in ``parts`` (per-request ids; clicks 0 where unknown)."""

        def ids(p: RequestBatch) -> np.ndarray:
            return np.broadcast_to(np.asarray(p.request_id, np.int64), (len(p),))

        def clicks(p: RequestBatch) -> np.ndarray:
            return np.zeros(len(p), np.int32) if p.clicks is None else np.asarray(p.clicks)

        return RequestBatch(
            np.concatenate([p.user for p in parts]),
            np.concatenate([p.history for p in parts]),
            np.concatenate([p.step for p in parts]),
            np.concatenate([clicks(p) for p in parts]),
            np.concatenate([ids(p) for p in parts]),
        )


@dataclass
class StageOutput:
    items: np.ndarray  # [B, k] item ids, best first where ordered
    scores: np.ndarray  # [B, k]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)


class StageContext:
    """The serving system's (imperfect) view of the catalogue: two-tower embeddings, popularity,
    a noisy quality estimate, and the ranker's access to ground truth. Deterministic in seed."""

    def __init__(self, world: World, seed: int = 0):
        self.world = world
        c, cfg = world.catalogue, world.config
        rng = seed_sequence(seed, "stage-context")
        noise = cfg.model_embedding_noise * rng.standard_normal(c.embedding.shape) / np.sqrt(cfg.embed_dim) * 2
        tower = c.embedding + noise
        self.item_tower = (tower / np.linalg.norm(tower, axis=1, keepdims=True)).astype(np.float32)
        self.user_tower = world.users.model_embedding
        pop = c.popularity
        self.popularity = ((pop - pop.mean()) / pop.std()).astype(np.float32)
        self.quality_estimate = (c.quality + 0.15 * rng.standard_normal(c.n)).astype(np.float32)
        self.index: MatchingIndex | None = None  # an approximate retrieval index, when the pipeline asks for one


def gumbel(gen: np.random.Generator, size) -> np.ndarray:
    """Standard Gumbel draws as float32, G = −log(−log(1 − U)), U = ``gen.random(size)``.

    The draws of ``gen.gumbel(size=size).astype(np.float32)``: ``Generator.gumbel`` computes this formula from the
    same uniform stream (one double per draw), so the stream stays in step; here NumPy's vectorised log runs it,
    3.3–3.6× faster (benchmarks/results/recommend.md). The float64 values can differ from libm's in the last bits
    (≈ 1e-16); after the float32 cast they were identical on 2·10⁸ draws (and in a test). ``Generator.gumbel`` redraws
    1 − U = 1 (U = 0, probability 2⁻⁵³ a draw; the stream then runs one double ahead of this one); here 1 − U is
    capped at 1 − 2⁻⁵³ instead (G ≤ 36.7)."""
    u = gen.random(size)
    np.subtract(1.0, u, out=u)
    np.minimum(u, _BELOW_ONE, out=u)
    np.log(u, out=u)
    np.negative(u, out=u)
    np.log(u, out=u)
    return np.negative(u, out=u).astype(np.float32)


_BELOW_ONE = np.nextafter(1.0, 0.0)


class RowGenerators:
    """Per-request random streams: row i draws from seed_sequence(seed, stage, request_ids[i]), so a
    batch of B requests replays exactly what B single-request calls (B = 1) drew."""

    def __init__(self, seed: int, stage: str, request_ids: np.ndarray):
        self.gens = [seed_sequence(seed, stage, int(r)) for r in np.asarray(request_ids).ravel()]

    def rows(self, sl: slice) -> RowGenerators:
        sub = RowGenerators.__new__(RowGenerators)
        sub.gens = self.gens[sl]
        return sub

    def _stack(self, draw, size) -> np.ndarray:
        if size[0] != len(self.gens):
            raise ValueError(f"{len(self.gens)} request streams but {size[0]} rows requested")
        return np.concatenate([draw(g, (1, *size[1:])) for g in self.gens], axis=0)

    def standard_normal(self, size) -> np.ndarray:
        return self._stack(lambda g, sz: g.standard_normal(sz), size)

    def gumbel(self, size) -> np.ndarray:
        return self._stack(gumbel, size)


def stage_rng(seed: int, stage: str, request_id):
    """The stage's randomness for a batch: one stream keyed by a scalar request id, or one per row."""
    return (
        seed_sequence(seed, stage, request_id) if np.ndim(request_id) == 0 else RowGenerators(seed, stage, request_id)
    )


def tower_t64(owner: StageContext | MatchingIndex) -> np.ndarray:
    """``owner.item_tower``ᵀ as a C-contiguous float64 [d, N] array, made once per owner. Matching's query is float64,
    so ``q @ item_tower.T`` had NumPy convert the float32 tower into exactly this array on every request (about 7×
    the product's own cost at 20 000 items); ``q @ tower_t64(owner)`` gives the same scores, bit for bit (tested)."""
    tower = owner.__dict__.get("_tower_t64")
    if tower is None:
        tower = owner._tower_t64 = np.ascontiguousarray(owner.item_tower.T, dtype=np.float64)
    return tower


def _gumbel(rng: np.random.Generator | RowGenerators, size) -> np.ndarray:
    """``gumbel`` from one stream, or from each request's (``RowGenerators``)."""
    return rng.gumbel(size) if isinstance(rng, RowGenerators) else gumbel(rng, size)


def stage_params(params, stage: str, b: int) -> np.ndarray:
    """A stage's parameters as [B, n]: the default (None), one shared vector [n], or per request [B, n];
    a ValueError names the stage and the expected shape."""
    p = DEFAULT_PARAMS[stage] if params is None else np.asarray(params, np.float32)
    if p.ndim == 1:
        p = np.broadcast_to(p, (b, len(p)))
    if p.shape != (b, len(PARAM_NAMES[stage])):
        raise ValueError(
            f"{stage} params must have shape ({len(PARAM_NAMES[stage])},) or ({b}, "
            f"{len(PARAM_NAMES[stage])}) for {PARAM_NAMES[stage]}, got {p.shape}"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"{stage} params must be finite")
    return p


def top_k(scores: np.ndarray, k: int, ordered: bool) -> np.ndarray:
    """Each row's k highest scores' columns [B, k]: by descending score where ``ordered``, else in column order, so a
    row gets the same columns in the same order alone or in any batch (whichever selection path ran)."""
    idx = _top_k_prefiltered(scores, k) if scores.shape[1] >= _PREFILTER_MIN_RATIO * k else None
    if idx is None:
        idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    if ordered:
        return np.take_along_axis(
            idx, np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1, kind="stable"), axis=1
        )
    return np.sort(idx, axis=1)


_PREFILTER_MIN_RATIO = 16  # prefilter a row of at least 16·k scores (matching's 20 000 → 500, not 500 → 50)
_PREFILTER_STRIDE = 16


def _top_k_prefiltered(scores: np.ndarray, k: int) -> np.ndarray | None:
    """Top-k columns [B, k] (unordered) of each row, from the scores above a per-row threshold: the
    (2k/N)-quantile from the top of every 16th score, so ≈ 2k of the N scores pass and the selection runs
    over those instead of all N (benchmarks/recommend.py times both). The same set as
    ``argpartition`` over the whole row (ties at the k-th score aside); None where a row's threshold let
    fewer than k through (the caller then partitions the whole rows)."""
    b, n = scores.shape
    sample = scores[:, ::_PREFILTER_STRIDE]
    j = sample.shape[1] - 1 - min(sample.shape[1] - 1, int(2 * k * sample.shape[1] / n) + 8)
    thr = np.partition(sample, j, axis=1)[:, j]
    mask = scores >= thr[:, None]
    counts = mask.sum(axis=1)
    if counts.min() < k:
        return None
    flat = np.flatnonzero(mask)  # row-major: each row's passing columns, in order (2-D nonzero is ~6× slower)
    if b == 1:  # one request (serving without micro-batching): no padding
        return flat[np.argpartition(-scores[0, flat], k - 1)[:k]][None]
    rows = flat // n
    cols = flat - rows * n
    pos = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand = np.zeros((b, counts.max()), np.int64)
    cand_scores = np.full(cand.shape, -np.inf, scores.dtype)
    cand[rows, pos], cand_scores[rows, pos] = cols, scores[rows, cols]
    return np.take_along_axis(cand, np.argpartition(-cand_scores, k - 1, axis=1)[:, :k], axis=1)


def history_embedding(ctx: StageContext, history: np.ndarray) -> np.ndarray:
    """Mean item-tower embedding of the recently clicked items [B, H] (-1 = empty) → [B, d]."""
    valid = history >= 0
    hist = np.where(valid[..., None], ctx.item_tower[np.maximum(history, 0)], 0.0).sum(axis=1)
    return hist / np.maximum(valid.sum(axis=1, keepdims=True), 1)


def user_query(ctx: StageContext, req: RequestBatch, w_history: np.ndarray) -> np.ndarray:
    """Query tower: user embedding + w_history · mean embedding of recently clicked items."""
    return ctx.user_tower[req.user] + w_history[:, None] * history_embedding(ctx, req.history)


def retrieval_relevance(ctx: StageContext, user: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The inner reward's relevance term: the matching stage's two-tower similarity of users [B] with
    items [B, K] → [B, K] float32 in [0, 1],

        rel(u, i) = (1 + cos(user_tower_u, item_tower_i)) / 2.

    Only the towers enter: no ranking weights or predictions and no stage action (the query's
    history term w_history is matching's action, so it is left out), so a policy cannot move the
    relevance of an item it serves, only choose which items it serves. (1 + cos)/2 rather than
    σ(τ·⟨u, i⟩): it is exactly in [0, 1] with nothing to fit (a sigmoid's temperature and offset
    would have to be calibrated, i.e. on clicks), scale-free in the towers, and monotone in
    matching's relevance score ⟨q, i⟩."""
    u = ctx.user_tower[np.asarray(user)]
    v = ctx.item_tower[np.asarray(items)]
    if u.ndim != 2 or v.ndim != 3 or len(u) != len(v):
        raise ValueError(
            f"retrieval_relevance: user must be [B] and items [B, K], got {u.shape[:-1]} and {v.shape[:-1]}"
        )
    cos = np.einsum("bd,bkd->bk", u, v) / np.maximum(
        np.linalg.norm(u, axis=1)[:, None] * np.linalg.norm(v, axis=2), 1e-12
    )
    return np.clip(0.5 * (1.0 + cos), 0.0, 1.0).astype(np.float32)


def matching(
    ctx: StageContext,
    req: RequestBatch,
    params=None,
    k: int = 500,
    seed: int = 0,
    chunk: int = 64,
    index: MatchingIndex | None = None,
    pool: int = 2,
) -> StageOutput:
    """score_i = w_rel·⟨q, item_i⟩ + w_pop·popularity_i + exploration·Gumbel; top-k of the catalogue.

    ``index`` (else ``ctx.index``): the item vectors to score (a catalogue update's) and, for an approximate
    index, where to look: its top ``pool``·k items by the deterministic score receive the exploration noise
    instead of the whole catalogue (actors/matching_index.py)."""
    b = len(req.user)
    p = stage_params(params, "matching", b)
    q = user_query(ctx, req, p[:, 2])
    rng = stage_rng(seed, "matching", req.request_id)
    index = ctx.index if index is None else index
    if index is not None and index.faiss_index is not None:
        cand, sc = index.search(q, p[:, 0], p[:, 1], min(pool * k, index.n))
        sc = sc + p[:, 3:4] * _gumbel(rng, sc.shape)
        idx = top_k(sc, k, ordered=False)
        return StageOutput(np.take_along_axis(cand, idx, axis=1), np.take_along_axis(sc, idx, axis=1))
    owner = ctx if index is None else index
    towers, popularity = tower_t64(owner), owner.popularity
    items = np.empty((b, k), np.int64)
    scores = np.empty((b, k), np.float32)
    for s in range(0, b, chunk):  # bounded memory at 1M items: chunk × N scores at a time
        sl = slice(s, s + chunk)
        sc = p[sl, :1] * (q[sl] @ towers) + p[sl, 1:2] * popularity
        noise = rng.rows(sl) if isinstance(rng, RowGenerators) else rng
        sc += p[sl, 3:4] * _gumbel(noise, sc.shape)
        idx = top_k(sc, k, ordered=False)
        items[sl], scores[sl] = idx, np.take_along_axis(sc, idx, axis=1)
    return StageOutput(items, scores)


def pre_ranking(ctx: StageContext, req: RequestBatch, candidates: np.ndarray, params=None, k: int = 50) -> StageOutput:
    """score = w_rel·⟨q, item⟩ + w_pop·popularity + w_quality·quality_estimate; top-k."""
    p = stage_params(params, "pre_ranking", len(req.user))
    q = user_query(ctx, req, np.full(len(req.user), DEFAULT_PARAMS["matching"][2], np.float32))
    rel = np.einsum("bd,bkd->bk", q, ctx.item_tower[candidates])
    sc = p[:, :1] * rel + p[:, 1:2] * ctx.popularity[candidates] + p[:, 2:3] * ctx.quality_estimate[candidates]
    idx = top_k(sc, k, ordered=True)
    return StageOutput(np.take_along_axis(candidates, idx, axis=1), np.take_along_axis(sc, idx, axis=1))


def ranking_predictions(
    ctx: StageContext, req: RequestBatch, candidates: np.ndarray, noise: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The multi-task ranker: true probabilities with N(0, noise²) on the logit scale.

    p_click     = P(click | examined)
    p_long_view = P(click and dwell ≥ 18 s) = p_click · exp(−(18 / (λ·duration))^k)   (Weibull survival)
    p_purchase  = P(click and purchase)
    """
    w, c = ctx.world, ctx.world.catalogue
    u = req.user
    logit_click = w.click_logit(u, candidates) + noise * rng.standard_normal(candidates.shape)
    p_click = sigmoid(logit_click)
    lam = w.watch_scale(u, candidates) * c.duration_s[candidates]
    survive = np.exp(-((LONG_VIEW_S / lam) ** w.config.watch_weibull_k))
    logit_long = np.log(np.clip(survive, 1e-6, 1 - 1e-6) / np.clip(1 - survive, 1e-6, 1)) + noise * rng.standard_normal(
        candidates.shape
    )
    p_buy = sigmoid(w.purchase_logit(u, candidates) + noise * rng.standard_normal(candidates.shape))
    return {
        "p_click": p_click.astype(np.float32),
        "p_long_view": (p_click * sigmoid(logit_long)).astype(np.float32),
        "p_purchase": (p_click * p_buy).astype(np.float32),
    }


def ranking(
    ctx: StageContext,
    req: RequestBatch,
    candidates: np.ndarray,
    params=None,
    k: int = 10,
    seed: int = 0,
    noise: float | None = None,
) -> StageOutput:
    """Utility score Σ_k w_k·p_k over the multi-task predictions; the top-k, best first, is the slate."""
    p = stage_params(params, "ranking", len(req.user))
    rng = stage_rng(seed, "ranking", req.request_id)
    preds = ranking_predictions(
        ctx, req, candidates, ctx.world.config.prediction_noise if noise is None else noise, rng
    )
    utility = p[:, :1] * preds["p_click"] + p[:, 1:2] * preds["p_long_view"] + p[:, 2:3] * preds["p_purchase"]
    idx = top_k(utility, k, ordered=True)
    take = lambda a: np.take_along_axis(a, idx, axis=1)  # noqa: E731
    return StageOutput(take(candidates), take(utility), {name: take(v) for name, v in preds.items()})


def run_stage(
    ctx: StageContext,
    config: PipelineConfig,
    stage: str,
    req: RequestBatch,
    candidates: np.ndarray | None = None,
    params=None,
    index: MatchingIndex | None = None,
) -> StageOutput:
    """One stage on a request batch with the pipeline's sizes and seed (the only stage dispatch); ``index``
    overrides matching's (``ctx.index``), e.g. a replica's hot-swapped catalogue snapshot."""
    if stage == "matching":
        return matching(ctx, req, params, config.k_matching, config.seed, index=index, pool=config.ann_pool)
    if candidates is None:
        raise ValueError(f"{stage} needs the upstream candidates")
    if stage == "pre_ranking":
        return pre_ranking(ctx, req, candidates, params, config.k_pre_ranking)
    if stage == "ranking":
        return ranking(ctx, req, candidates, params, config.k_slate, config.seed)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
