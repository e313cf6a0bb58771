"""The gate a candidate passes before promotion, and the monitor that rolls a promotion back.

Policies here are what a ``weights`` arm serves with Gaussian weight logging: a = log w ~ N(log μ, σ²I)
truncated to the ranking box [LOG_LOW, LOG_HIGH]³ — so what the gate certifies is exactly what is served.

Gate (every check runs; the candidate passes when all do):
    bounds   every weight finite and inside the box [1e-3·high, high] (RANKING_ACTION_HIGH)
    kl       KL(π_live ‖ π_cand) = ½ Σ_k ((log μ_cand,k − log μ_live,k) / σ)² ≤ ``kl_bound``
             (the Gaussians' KL; the box's truncation is left out — it only shrinks a KL this small)
    ope      the paired one-sided lower bound of V(π_cand) − V(π_live) on held-out logged requests
             (``rllib_policies.crm.certify``: SNIPS with logged densities, clustered by user) is > 0

Monitor (on one day's live traffic, after a promotion):
    kl       KL(π_promoted ‖ π_served) with μ_served the mean of the treatment's logged ``weight_mean``
             (in log space) > ``kl_bound``: the arm serves something other than what was promoted
    kpi      treatment − control of the per-request objective, one-sided upper bound at ``level`` < 0
             (independent users: s.e.² = s.e._t² + s.e._c², each clustered by user)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from rllib_policies.crm.algorithm import certify
from rllib_policies.crm.logs import LOG_HIGH, LOG_LOW
from rllib_policies.ope import GaussianPolicy, LoggedBandit
from rllib_policies.ope.intervals import clustered_means


def log_weights(weights) -> np.ndarray:
    """a = log w for weights [..., 3] (no clipping: the bounds check judges the raw weights)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(weights, np.float64))


def kl_to(live, candidate, sigma: float) -> float:
    """KL(N(log live, σ²I) ‖ N(log candidate, σ²I)) = ½‖log candidate − log live‖² / σ²."""
    d = log_weights(candidate) - log_weights(live)
    return float(0.5 * np.sum(d**2) / sigma**2)


def served_policy(weights, sigma: float, n: int) -> GaussianPolicy:
    """The arm's logging policy around ``weights`` as an OPE target on ``n`` rows."""
    mean = np.clip(log_weights(weights), LOG_LOW, LOG_HIGH)
    return GaussianPolicy(np.broadcast_to(mean, (n, 3)), np.full(3, float(sigma)), LOG_LOW, LOG_HIGH)


def scale_free(live, proposal) -> np.ndarray:
    """``proposal`` with the common log-scale of its step from ``live`` removed: ranking by Σ w·p is invariant
    to w → c·w, so a step along log c changes nothing served and would only spend the trust region."""
    step = log_weights(proposal) - log_weights(live)
    return np.exp(log_weights(live) + step - step.mean())


def trust_region(live, proposal, sigma: float, max_kl: float) -> np.ndarray:
    """``proposal`` moved back along the line to ``live`` until KL(live ‖ ·) ≤ ``max_kl`` (weights)."""
    a, b = log_weights(live), np.clip(log_weights(proposal), LOG_LOW, LOG_HIGH)
    kl = kl_to(live, np.exp(b), sigma)
    scale = 1.0 if kl <= max_kl else float(np.sqrt(max_kl / kl))
    return np.exp(a + scale * (b - a))


@dataclass(frozen=True)
class Check:
    ok: bool
    value: float
    bound: float
    why: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(f"{k} {'ok' if c.ok else 'FAILED'}: {c.why}" for k, c in self.checks.items())

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": {k: vars(c) for k, c in self.checks.items()}}


def gate(candidate, live, data: LoggedBandit, sigma: float, level: float = 0.95, kl_bound: float = 1.0) -> GateDecision:
    """The gate (module docstring) for candidate weights against the live weights on held-out ``data``."""
    cand = np.asarray(candidate, np.float64)
    a = log_weights(cand)
    finite = cand.shape == (3,) and bool(np.isfinite(a).all())
    outside = float(np.max(np.maximum(LOG_LOW - a, a - LOG_HIGH))) if finite else np.inf  # in log space
    inside = outside <= 1e-6
    box = f"[{np.exp(LOG_LOW).round(4).tolist()}, {np.exp(LOG_HIGH).round(4).tolist()}]"
    checks = {
        "bounds": Check(
            inside,
            outside,
            0.0,
            f"every weight inside {box}" if inside else f"weights {np.round(cand, 4).tolist()} outside the box {box}",
        )
    }
    if not inside:
        return GateDecision(False, checks)
    kl = kl_to(live, cand, sigma)
    checks["kl"] = Check(
        kl <= kl_bound, kl, kl_bound, f"KL(live ‖ candidate) {kl:.3f} {'≤' if kl <= kl_bound else '>'} {kl_bound:g}"
    )
    cert = certify(data, served_policy(cand, sigma, len(data)), served_policy(live, sigma, len(data)), level)
    low = cert.difference_low
    checks["ope"] = Check(
        bool(cert.certified),
        float(low),
        0.0,
        f"V̂(candidate) − V̂(live) {cert.difference:+.4f}, {level:.0%} lower bound {low:+.4f}"
        if np.isfinite(low)
        else cert.reason,
    )
    return GateDecision(all(c.ok for c in checks.values()), checks)


def _mean_se(values: np.ndarray, users: np.ndarray) -> tuple[float, float]:
    mean, low, high = clustered_means(values[:, None], users, 0.95)
    return float(mean[0]), float((high[0] - low[0]) / (2 * stats.norm.ppf(0.975)))


def monitor(
    objective_t: np.ndarray,
    users_t: np.ndarray,
    objective_c: np.ndarray,
    users_c: np.ndarray,
    served_means: np.ndarray,
    promoted,
    sigma: float,
    level: float = 0.95,
    kl_bound: float = 0.5,
) -> dict:
    """The live monitor (module docstring) on one day: per-request objectives of the treatment and control
    arms with their users, the treatment's logged μ per request [n, 3]; returns the figures and ``breach``."""
    out: dict = {"breach": False, "why": []}
    if len(served_means):
        mu = np.exp(log_weights(served_means).mean(0))
        kl = kl_to(promoted, mu, sigma)
        out |= {"kl": kl, "served_weights": mu.round(4).tolist()}
        if kl > kl_bound:
            out["breach"] = True
            out["why"].append(f"KL(promoted ‖ served) {kl:.3f} > {kl_bound:g}")
    if len(objective_t) > 1 and len(objective_c) > 1:
        (mt, st), (mc, sc) = _mean_se(objective_t, users_t), _mean_se(objective_c, users_c)
        diff, se = mt - mc, float(np.hypot(st, sc))
        high = diff + stats.norm.ppf(level) * se if np.isfinite(se) else np.inf
        out |= {"treatment": mt, "control": mc, "difference": diff, "difference_high": high}
        if high < 0:
            out["breach"] = True
            out["why"].append(f"treatment − control {diff:+.4f}, {level:.0%} upper bound {high:+.4f} < 0")
    return out
