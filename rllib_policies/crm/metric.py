"""The learnt metric: a linear combination of short-term per-request signals that tracks a North-Star
KPI across sessions with lower variance, usable as CRM's reward (``crm(reward="learnt_metric")``).

Per group g (a user's logged requests; sessions of one user pooled), S_g = Σ_{i∈g} s_i (signals [k]) and
Y_g = Σ_{i∈g} y_i (the KPI). Ridge on standardised S_g:  β = argmin Σ_g (Y_g − β₀ − βᵀS_g)² + α‖β‖²;
the per-request metric is m_i = βᵀ s_i. Checks: every β_k keeps its sign in ≥ ``min_sign_agreement``
of B bootstrap resamples of the groups (else ValueError naming the signal), and the report holds
corr(m_g, Y_g) and Var(m_i)/Var(y_i) (the variance ratio the metric buys per request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIGNALS = ("clicks", "long_views", "purchases")


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    xc, yc = x - x.mean(0), y - y.mean()
    return np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)


@dataclass(frozen=True)
class LearntMetric:
    """m_i = Σ_k coef_k · signal_ik; ``report`` holds the fit's checks (module docstring)."""

    signals: tuple[str, ...]
    coef: np.ndarray
    report: dict = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        rows: dict[str, np.ndarray],
        kpi: str = "revenue",
        signals: tuple[str, ...] = SIGNALS,
        alpha: float = 1.0,
        n_boot: int = 200,
        min_sign_agreement: float = 0.9,
        seed: int = 0,
    ) -> LearntMetric:
        missing = [k for k in (kpi, *signals) if k not in rows]
        if missing:
            raise ValueError(f"learnt metric: rows have no column(s) {missing}")
        _, group = np.unique(rows["user_id"], return_inverse=True)
        s = np.stack([np.asarray(rows[k], np.float64) for k in signals], axis=1)
        y = np.asarray(rows[kpi], np.float64)
        sg = np.stack([np.bincount(group, s[:, j]) for j in range(s.shape[1])], axis=1)
        yg = np.bincount(group, y)
        if len(yg) < 10:
            raise ValueError(f"learnt metric: {len(yg)} groups; need at least 10 to fit and check stability")
        scale = np.maximum(sg.std(0), 1e-12)
        coef = _ridge(sg / scale, yg, alpha) / scale
        rng = np.random.default_rng(seed)
        boots = np.stack(
            [_ridge(sg[i] / scale, yg[i], alpha) / scale for i in rng.integers(0, len(yg), (n_boot, len(yg)))]
        )
        agreement = (np.sign(boots) == np.sign(coef)).mean(0)
        bad = [f"{k} (sign kept in {a:.0%})" for k, a in zip(signals, agreement) if a < min_sign_agreement]
        if bad:
            raise ValueError(
                f"learnt metric for {kpi!r} is unstable: coefficient sign flips across {n_boot} bootstrap resamples "
                f"for {', '.join(bad)}; drop those signals or log more groups"
            )
        m = s @ coef
        report = {
            "kpi": kpi,
            "coef": dict(zip(signals, coef.tolist())),
            "sign_agreement": dict(zip(signals, agreement.tolist())),
            "corr_groups": float(np.corrcoef(sg @ coef, yg)[0, 1]),
            "variance_ratio": float(m.var() / max(y.var(), 1e-12)),
            "groups": len(yg),
        }
        return cls(tuple(signals), coef, report)

    def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(rows[k], np.float64) for k in self.signals], axis=1) @ self.coef
