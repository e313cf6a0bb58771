"""The simulated world: ground truth, user response to slates, sessions and delayed return.

Every function is batched over B concurrent requests × K slate positions (NumPy). Equations and
their sources are in docs/world.md; the defaults' calibration is checked by tests/actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import ULTRA_PBM_TOP10, WorldConfig
from .entities import Catalogue, Users, seed_sequence


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def examination_curve(cfg: WorldConfig, max_rank: int = 200) -> np.ndarray:
    """P(examine rank r) for the PBM: ULTRA's table for ranks 1-10, then 0.68·(1/r)^η; or 0.68·(1/r)^η."""
    r = np.arange(1, max_rank + 1, dtype=np.float64)
    if cfg.pbm_eta is None:
        curve = 0.68 / r
        curve[:10] = ULTRA_PBM_TOP10
        curve[10:] = np.minimum(curve[10:], ULTRA_PBM_TOP10[-1])
    else:
        curve = 0.68 * r ** (-cfg.pbm_eta)
    return curve.astype(np.float32)


@dataclass
class Response:
    """Per-item feedback for B slates of K items (arrays [B, K])."""

    examined: np.ndarray
    clicked: np.ndarray
    dwell_s: np.ndarray
    skipped: np.ndarray
    purchased: np.ndarray
    revenue: np.ndarray
    relevance: np.ndarray  # graded ground truth 0-4
    p_click: np.ndarray  # true click probability if examined


@dataclass
class Sessions:
    """B concurrent sessions: hidden state (temper, NPE) and running KPIs."""

    user: np.ndarray
    temper: np.ndarray
    npe: np.ndarray
    active: np.ndarray
    requests: np.ndarray
    items: np.ndarray
    clicks: np.ndarray
    dwell_s: np.ndarray
    purchases: np.ndarray
    revenue: np.ndarray
    category_counts: np.ndarray  # [B, C]
    history: np.ndarray  # [B, H] recently clicked item ids, -1 = empty
    returned_next_day: np.ndarray = field(default=None)
    return_gap_days: np.ndarray = field(default=None)

    @property
    def size(self) -> int:
        return len(self.user)


class World:
    """Catalogue + users + response model, calibrated at construction (deterministic in seed)."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = cfg = config or WorldConfig()
        self.catalogue = Catalogue.build(cfg)
        self.users = Users.build(cfg, self.catalogue)
        self.examination = examination_curve(cfg)
        self.click_bias, self.purchase_bias, self.relevance_mean = self._calibrate()

    # ------------------------------------------------------------------ ground truth
    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Cosine affinity of users [B] with items [B, K] → [B, K]."""
        return np.einsum("bd,bkd->bk", self.users.preference[users], self.catalogue.embedding[items])

    def relevance(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True long-term value in (0, 1): affinity and quality; clickbait counts against it."""
        c = self.catalogue
        return sigmoid(
            4.0 * (self.affinity(users, items) - 0.25) + 2.5 * (c.quality[items] - 0.5) - 1.5 * c.clickbait[items]
        )

    def graded_relevance(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Graded relevance 0-4 (for NDCG): floor(5 · relevance)."""
        return np.minimum((5.0 * self.relevance(users, items)).astype(np.int8), 4)

    # The three response models below, called with the default ``taste=False``, are what a trained
    # multi-task ranker can learn (``actors.stages.ranking_predictions`` calls them so); the user's
    # response adds the hidden engagement-type taste τ (``taste=True``; zero outside the
    # heterogeneous preset, where both views coincide).
    def _taste(self, users: np.ndarray, k: int, taste: bool) -> np.ndarray | None:
        """τ_k of users [B] as [B, 1], or None (taste off, or the ranker's view)."""
        t = self.users.taste
        return t[users, k][:, None] if taste and t is not None else None

    def click_logit(
        self, users: np.ndarray, items: np.ndarray, bias: float | None = None, taste: bool = False
    ) -> np.ndarray:
        """Log-odds of a click given examination: b₀ + user propensity + slope·aff + lift·c (+ τ_click)."""
        cfg, c = self.config, self.catalogue
        b = self.click_bias if bias is None else bias
        logit = (
            b
            + self.users.click_propensity[users][:, None]
            + cfg.affinity_click_slope * self.affinity(users, items)
            + cfg.clickbait_click_lift * c.clickbait[items]
        )
        tau = self._taste(users, 0, taste)
        return logit if tau is None else logit + tau

    def purchase_logit(
        self, users: np.ndarray, items: np.ndarray, bias: float | None = None, taste: bool = False
    ) -> np.ndarray:
        """Log-odds of a purchase given a click (+ τ_purchase)."""
        c = self.catalogue
        b = self.purchase_bias if bias is None else bias
        logit = (
            b
            + self.users.purchase_propensity[users][:, None]
            + 2.0 * self.affinity(users, items)
            + 1.5 * (c.quality[items] - 0.5)
            - 0.4 * np.log(c.price[items] / 20.0)
        )
        tau = self._taste(users, 2, taste)
        return logit if tau is None else logit + tau

    def watch_scale(
        self, users: np.ndarray, items: np.ndarray, relevance: np.ndarray | None = None, taste: bool = False
    ) -> np.ndarray:
        """Weibull scale λ of the watch ratio: 0.91 · user multiplier · exp(slope·(relevance − mean)) (· e^τ_watch)."""
        cfg = self.config
        rel = self.relevance(users, items) if relevance is None else relevance
        scale = (
            cfg.watch_weibull_scale
            * self.users.dwell_propensity[users][:, None]
            * np.exp(cfg.watch_relevance_slope * (rel - self.relevance_mean))
        )
        tau = self._taste(users, 1, taste)
        return scale if tau is None else scale * np.exp(tau)

    def ideal_relevance(self, users: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
        """The k best graded relevances over the whole catalogue per user (ideal DCG), [B, k]."""
        out = np.empty((len(users), k), np.int8)
        c = self.catalogue
        for s in range(0, len(users), chunk):
            u = users[s : s + chunk]
            aff = self.users.preference[u] @ c.embedding.T
            rel = sigmoid(4.0 * (aff - 0.25) + 2.5 * (c.quality - 0.5) - 1.5 * c.clickbait)
            top = -np.partition(-rel, k - 1, axis=1)[:, :k]
            out[s : s + chunk] = np.minimum((5.0 * np.sort(top, axis=1)[:, ::-1]).astype(np.int8), 4)
        return out

    # ------------------------------------------------------------------ response to slates
    def examine_probs(self, p_click: np.ndarray) -> np.ndarray:
        """Expected examination per position [B, K]: PBM curve, or cascade (stop at first click)."""
        k = p_click.shape[1]
        if self.config.click_model == "pbm":
            return np.broadcast_to(self.examination[:k], p_click.shape)
        att = self.config.cascade_attention
        keep = np.cumprod(np.concatenate([np.ones((len(p_click), 1)), att * (1 - p_click[:, :-1])], axis=1), axis=1)
        return keep

    def respond(self, users: np.ndarray, slates: np.ndarray, rng: np.random.Generator) -> Response:
        """Sample feedback for slates [B, K] of item ids shown to users [B]."""
        c, cfg = self.catalogue, self.config
        p_click = sigmoid(self.click_logit(users, slates, taste=True))
        u = rng.random(slates.shape)
        if cfg.click_model == "pbm":
            examined = u < self.examination[: slates.shape[1]]
            clicked = examined & (rng.random(slates.shape) < p_click)
        else:  # cascade: examine in order; go on past r only if r was not clicked and attention holds
            click_draw = rng.random(slates.shape) < p_click
            go_on = ~click_draw[:, :-1] & (u[:, 1:] < cfg.cascade_attention)
            examined = np.concatenate([np.ones((len(slates), 1), bool), np.cumprod(go_on, axis=1).astype(bool)], axis=1)
            clicked = examined & click_draw
        rel = self.relevance(users, slates)
        scale = self.watch_scale(users, slates, rel, taste=True)
        ratio = np.minimum(scale * rng.weibull(cfg.watch_weibull_k, slates.shape), cfg.watch_ratio_cap)
        dwell = np.where(clicked, ratio * c.duration_s[slates], 0.0).astype(np.float32)
        p_buy = sigmoid(self.purchase_logit(users, slates, taste=True))
        purchased = clicked & (rng.random(slates.shape) < p_buy)
        revenue = np.where(purchased, c.price[slates], 0.0).astype(np.float32)
        graded = np.minimum((5.0 * rel).astype(np.int8), 4)
        return Response(
            examined, clicked, dwell, examined & ~clicked, purchased, revenue, graded, p_click.astype(np.float32)
        )

    def item_response(self, users: np.ndarray, items: np.ndarray, long_view_s: float = 18.0) -> dict[str, np.ndarray]:
        """Each item's exact response probabilities [B, K], before examination (no sampling):

        p_click      P(click | examined)
        p_long_view  P(dwell ≥ t | click) = P(min(λ·W, cap)·duration ≥ t), W ~ Weibull(k):
                     exp(−(t/(duration·λ))^k) when cap·duration ≥ t, else 0
        p_purchase   P(purchase | click);   price   revenue of a purchase
        """
        c, cfg = self.catalogue, self.config
        p_click = sigmoid(self.click_logit(users, items, taste=True))
        ratio_needed = long_view_s / c.duration_s[items]
        survive = np.exp(-((ratio_needed / self.watch_scale(users, items, taste=True)) ** cfg.watch_weibull_k))
        return {
            "p_click": p_click,
            "p_long_view": np.where(ratio_needed <= cfg.watch_ratio_cap, survive, 0.0),
            "p_purchase": sigmoid(self.purchase_logit(users, items, taste=True)),
            "price": c.price[items],
        }

    def slate_expectations(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Exact expected KPIs per position [B, K] of slates whose items respond as ``item_response``:
        E[click] = P(examine)·p_click (PBM curve, or the cascade's survival); E[long view] =
        E[click]·p_long_view; E[purchase] = E[click]·p_purchase; E[revenue] = E[purchase]·price."""
        clicks = self.examine_probs(item["p_click"]) * item["p_click"]
        purchases = clicks * item["p_purchase"]
        return {
            "clicks": clicks,
            "long_views": clicks * item["p_long_view"],
            "purchases": purchases,
            "revenue": purchases * item["price"],
        }

    def expected_kpis(self, users: np.ndarray, slates: np.ndarray, long_view_s: float = 18.0) -> dict[str, np.ndarray]:
        """Exact expected clicks, long views, purchases and revenue per position [B, K] of slates [B, K]."""
        return self.slate_expectations(self.item_response(users, slates, long_view_s))

    def expected_response(
        self, users: np.ndarray, slates: np.ndarray, long_view_s: float = 18.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact expected clicks and long views per position [B, K] (``expected_kpis``, two of them)."""
        kpis = self.expected_kpis(users, slates, long_view_s)
        return kpis["clicks"], kpis["long_views"]

    # ------------------------------------------------------------------ sessions
    def start_sessions(self, users: np.ndarray, history_len: int = 20) -> Sessions:
        b = len(users)
        z = lambda dt=np.float32: np.zeros(b, dt)  # noqa: E731
        return Sessions(
            user=np.asarray(users, np.int64),
            temper=self.users.patience[users].copy(),
            npe=z(),
            active=np.ones(b, bool),
            requests=z(np.int32),
            items=z(np.int32),
            clicks=z(np.int32),
            dwell_s=z(),
            purchases=z(np.int32),
            revenue=z(),
            category_counts=np.zeros((b, self.config.n_categories), np.float32),
            history=np.full((b, history_len), -1, np.int64),
        )

    def satisfaction(self, sessions: Sessions) -> np.ndarray:
        """RecSim: satisfaction = sigmoid(sensitivity · NPE + user baseline)."""
        return sigmoid(
            self.config.satisfaction_sensitivity * sessions.npe + self.users.baseline_satisfaction[sessions.user]
        )

    def step(self, sessions: Sessions, slates: np.ndarray, rng: np.random.Generator) -> Response:
        """Serve one slate to every active session, update hidden state, end sessions, draw returns.

        NPE ← decay·NPE − 2·Σ_clicked(clickbait − 0.5) − repetition·(share of slate in categories
        seen ≥ 3 times) + N(0, σ); temper ← temper − 1 + refund·clicks − cost·(1 − satisfaction);
        a session ends when temper ≤ 0 or at max_requests.
        """
        cfg, c = self.config, self.catalogue
        resp = self.respond(sessions.user, slates, rng)
        act = sessions.active
        cats = c.category[slates]
        seen = np.take_along_axis(sessions.category_counts, cats, axis=1)
        repetition = (seen >= 3).mean(axis=1)
        bait = np.where(resp.clicked, c.clickbait[slates] - 0.5, 0.0).sum(axis=1)
        npe = (
            cfg.npe_decay * sessions.npe
            - 2.0 * bait
            - cfg.repetition_penalty * repetition
            + cfg.npe_noise * rng.standard_normal(sessions.size)
        )
        sessions.npe = np.where(act, npe, sessions.npe).astype(np.float32)
        sat = self.satisfaction(sessions)
        n_clicks = resp.clicked.sum(axis=1)
        temper = (
            sessions.temper - 1.0 + cfg.temper_click_refund * n_clicks - cfg.temper_dissatisfaction_cost * (1 - sat)
        )
        sessions.temper = np.where(act, temper, sessions.temper).astype(np.float32)
        a = act.astype(np.int32)
        sessions.requests += a
        sessions.items += a * slates.shape[1]
        sessions.clicks += a * n_clicks
        sessions.dwell_s += np.where(act, resp.dwell_s.sum(axis=1), 0)
        sessions.purchases += a * resp.purchased.sum(axis=1)
        sessions.revenue += np.where(act, resp.revenue.sum(axis=1), 0)
        np.add.at(sessions.category_counts, (np.repeat(np.flatnonzero(act), slates.shape[1]), cats[act].ravel()), 1.0)
        self._push_history(sessions, slates, resp.clicked & act[:, None])
        ending = act & ((sessions.temper <= 0) | (sessions.requests >= cfg.max_requests))
        sessions.active = act & ~ending
        self._draw_return(sessions, ending, sat, rng)
        return resp

    @staticmethod
    def _push_history(sessions: Sessions, slates: np.ndarray, clicked: np.ndarray) -> None:
        """Append clicked items (in slate order) to each session's fixed-length recent history."""
        h = sessions.history.shape[1]
        new = np.where(clicked, slates, -1)
        order = np.argsort(~clicked, axis=1, kind="stable")  # clicked first, in slate order
        new = np.take_along_axis(new, order, axis=1)
        n = clicked.sum(axis=1)
        merged = np.concatenate([sessions.history, new], axis=1)
        # keep the last h valid entries: shift by the number of new clicks
        idx = np.arange(h)[None, :] + n[:, None]
        sessions.history = np.take_along_axis(merged, idx, axis=1)

    def _draw_return(self, sessions: Sessions, ending: np.ndarray, sat: np.ndarray, rng: np.random.Generator) -> None:
        """Delayed KPI: next-day return ~ Bernoulli(sigmoid(logit P(1) + tilt·(satisfaction − ½)));
        otherwise the gap follows KuaiRand's P(2..7) renormalised, else 8 (more than a week)."""
        cfg = self.config
        if sessions.returned_next_day is None:
            sessions.returned_next_day = np.zeros(sessions.size, bool)
            sessions.return_gap_days = np.zeros(sessions.size, np.int8)
        if not ending.any():
            return
        probs = np.asarray(cfg.return_gap_probs, np.float64)
        back = rng.random(ending.sum()) < self.return_probability(sat[ending])
        later = np.append(probs[1:], max(0.0, 1.0 - probs.sum()))
        gap = 2 + rng.choice(len(later), size=ending.sum(), p=later / later.sum())
        sessions.returned_next_day[ending] = back
        sessions.return_gap_days[ending] = np.where(back, 1, gap)

    def return_probability(self, satisfaction: np.ndarray) -> np.ndarray:
        """P(next-day return | satisfaction at the session's end) = σ(logit P(1) + tilt·(satisfaction − ½))."""
        p1 = self.config.return_gap_probs[0]
        return sigmoid(np.log(p1 / (1 - p1)) + self.config.return_satisfaction_tilt * (satisfaction - 0.5))

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, n_users: int = 2000, n_candidates: int = 500, k: int = 10):
        """Click and purchase biases so that a reference policy hits the target rates exactly.

        Reference policy: for each user, 500 random candidates ranked by true relevance + N(0, 0.1)
        (a decent production ranker), top k served. Solves E[CTR per impression] = target_ctr
        and E[P(purchase | click)] = purchase_given_click for the biases (Brent's method, scipy brentq).
        """
        cfg = self.config
        rng = seed_sequence(cfg.seed, "calibration")
        users = rng.integers(0, self.users.n, n_users)
        cands = rng.integers(0, self.catalogue.n, (n_users, n_candidates))
        rel = self.relevance(users, cands) + 0.1 * rng.standard_normal(cands.shape)
        slates = np.take_along_axis(cands, np.argsort(-rel, axis=1)[:, :k], axis=1)
        relevance_mean = float(self.relevance(users, slates).mean())

        def ctr(bias):
            p = sigmoid(self.click_logit(users, slates, bias, taste=True))
            return float((self.examine_probs(p) * p).mean())

        if ctr(20.0) < cfg.target_ctr:
            raise ValueError(
                f"target_ctr={cfg.target_ctr} is unreachable under this examination model "
                f"(CTR at the bias bound: {ctr(20.0):.4f}); lower it or flatten position bias"
            )
        click_bias = _solve(ctr, cfg.target_ctr, -20.0, 20.0)
        p_click = sigmoid(self.click_logit(users, slates, click_bias, taste=True))
        weight = self.examine_probs(p_click) * p_click

        def cvr(bias):
            return float((weight * sigmoid(self.purchase_logit(users, slates, bias, taste=True))).sum() / weight.sum())

        purchase_bias = _solve(cvr, cfg.purchase_given_click, -25.0, 15.0) if cfg.purchase_given_click > 0 else -50.0
        return click_bias, purchase_bias, relevance_mean


def _solve(fn, target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with fn(x) = target, fn increasing (Brent's method; the bound nearer the target
    when it lies outside fn's range there)."""
    f_lo, f_hi = fn(lo) - target, fn(hi) - target
    if f_lo >= 0 or f_hi <= 0:
        return lo if f_lo >= 0 else hi
    from scipy.optimize import brentq  # noqa: PLC0415  (SciPy on first use: importing the world stays light)

    return float(brentq(lambda x: fn(x) - target, lo, hi, xtol=1e-13, rtol=4 * np.finfo(float).eps))
