"""Confidence intervals for every estimator in :mod:`rllib_policies.ope.estimators`, the typed result,
and the abstain rule.

Every estimator reduces a table to *parts*: per row i and component j, a numerator n_ij [K] and a
denominator d_ij, with the estimate a sum of ratios of sums

    V̂ = Σ_j (Σ_i n_ij) / (Σ_i d_ij)            (IPS/DM/DR: d = 1; SNIPS: d = w; SNDR: one of each),

so one linearisation serves all of them (delta method): V̂ − V ≈ (1/n) Σ_i ψ_i with
ψ_i = Σ_j (n_ij − V̂_j·d_ij) / d̄_j, and one bootstrap recomputes the same ratio on resampled rows.

Intervals (all two-sided at confidence ``level``, quantiles from scipy.stats):

- :class:`Normal`: V̂ ± z·s.e., z = Φ⁻¹((1+level)/2), s.e.² = C/(C−1) · Σ_c Ψ_c² / n², Ψ_c = Σ_{i∈c} ψ_i summed
  per cluster c (per row without cluster ids; C = number of clusters).
- :class:`Bootstrap`: percentile interval of B replicates, resampling whole clusters (rows without ids)
  with replacement, fixed seed. The reward model of DM/DR is held fixed (not refitted per replicate).
- :class:`EssCorrected`: the normal interval assumes the n rows carry n rows' worth of information; under
  importance weighting they carry about ESS = (Σw)²/Σw² (Kish), and a normal interval built on a
  variance estimated from few effective rows under-covers (the variance estimate is itself noisy and
  correlated with the estimate). Following Jeunen et al. (arXiv 2405.02141), n is replaced by the ESS:
  half-width = t_{ν}((1+level)/2) · max(s.e._delta, s.e._Kish), with ν = min(ESS, C) − 1 Student-t degrees of
  freedom and, for self-normalised estimators, s.e._Kish = √(Σ_i w̄_i (r_i − V̂)² / ESS) (the target-weighted
  reward spread over ESS effective draws; w̄ = w/Σw). The max and the t quantile only ever widen the normal
  interval, most where the ESS is small; at large ESS both factors → 1 and it equals :class:`Normal`.

Abstain: an estimate whose ESS < ``min_ess`` or ESS/n < ``min_ess_fraction`` is reported as abstained
(value, low, high = NaN) with a reason naming the threshold and the measured ESS — never a silent number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np


def normal_quantile(level: float) -> float:
    """z = Φ⁻¹((1 + level)/2), the two-sided normal CI's multiplier at confidence ``level``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    from scipy import stats  # noqa: PLC0415  (SciPy on first use: serving replicas import this module)

    return float(stats.norm.ppf(0.5 + level / 2))


def cluster_sums(terms: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    """Per-row terms [N, ...] summed within each cluster → [C, ...] (one row per distinct id, sorted;
    unchanged when ``clusters`` is None: every row its own cluster)."""
    if clusters is None:
        return terms
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    flat = terms.reshape(len(terms), -1)
    summed = np.stack([np.bincount(inverse, weights=flat[:, k]) for k in range(flat.shape[1])], axis=1)
    return summed.reshape((-1, *terms.shape[1:]))


def kish_ess(weights: np.ndarray) -> float:
    """Kish's effective sample size (Σw)² / Σw² (0 when every weight is 0)."""
    w = np.asarray(weights, np.float64)
    sq = float((w**2).sum())
    return float(w.sum() ** 2 / sq) if sq > 0 else 0.0


@dataclass(frozen=True)
class Parts:
    """An estimator's reduction of a table: V̂ = Σ_j Σ_i num[i, j] / Σ_i den[i, j].

    num [n, J, K], den [n, J], weights [n] (the importance weights behind the ESS; ones for DM),
    self_normalised: the single component divides by Σw (SNIPS-like: Kish's s.e. applies)."""

    num: np.ndarray
    den: np.ndarray
    weights: np.ndarray
    self_normalised: bool = False

    @property
    def n(self) -> int:
        return len(self.weights)

    def value(self) -> np.ndarray:
        """V̂ [K] (NaN where a denominator sums to 0)."""
        den = self.den.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.num.sum(0) / np.where(den == 0, np.nan, den)[:, None]).sum(0)

    def influence(self) -> np.ndarray:
        """ψ_i [n, K] with V̂ − V ≈ mean(ψ): Σ_j (num_ij − V̂_j·den_ij) / mean_i(den_ij)."""
        den_mean = self.den.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):  # a component with Σd = 0: NaN, as its value
            v_j = self.num.sum(0) / (den_mean * self.n)[:, None]
            return ((self.num - v_j[None] * self.den[:, :, None]) / den_mean[None, :, None]).sum(1)


class Interval(Protocol):
    """(low [K], high [K]) around V̂ from an estimator's parts."""

    level: float
    name: str

    def bounds(
        self, parts: Parts, value: np.ndarray, clusters: np.ndarray | None, ess: float
    ) -> tuple[np.ndarray, np.ndarray]: ...


def _normal_se(parts: Parts, clusters: np.ndarray | None) -> tuple[np.ndarray, int]:
    psi = cluster_sums(parts.influence(), clusters)
    c = len(psi)
    if c < 2:
        return np.full(psi.shape[1:], np.nan), c
    return np.sqrt(c / (c - 1) * (psi**2).sum(0)) / parts.n, c


@dataclass(frozen=True)
class Normal:
    """CLT / delta-method interval V̂ ± Φ⁻¹((1+level)/2)·s.e., clustered when ids are given."""

    level: float = 0.95
    name: str = "normal"

    def bounds(self, parts, value, clusters, ess):
        se, _ = _normal_se(parts, clusters)
        half = normal_quantile(self.level) * se
        return value - half, value + half


def clustered_means(
    values: np.ndarray, clusters: np.ndarray | None, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``values`` [n, K]: the mean and its ``level`` interval clustered by ``clusters`` (e.g. a
    user's requests are not independent): (mean [K], low [K], high [K]); NaN bounds with fewer than 2 clusters."""
    values = np.asarray(values, np.float64)
    n = len(values)
    parts = Parts(values[:, None, :], np.ones((n, 1)), np.ones(n))
    mean = parts.value()
    low, high = Normal(level).bounds(parts, mean, clusters, float(n))
    return mean, low, high


@dataclass(frozen=True)
class EssCorrected:
    """Normal interval with n replaced by the ESS (see the module docstring):
    V̂ ± t_{min(ESS, C)−1}((1+level)/2) · max(s.e._delta, s.e._Kish)."""

    level: float = 0.95
    name: str = "ess_corrected"

    def bounds(self, parts, value, clusters, ess):
        normal_quantile(self.level)  # validates level
        se, c = _normal_se(parts, clusters)
        if parts.self_normalised and ess > 0:
            w_bar = parts.weights / parts.weights.sum()
            resid = parts.num[:, 0, :] / np.where(parts.weights == 0, 1.0, parts.weights)[:, None] - value
            se = np.fmax(se, np.sqrt((w_bar[:, None] * resid**2).sum(0) / ess))
        df = max(min(ess, c) - 1.0, 1.0)
        from scipy import stats  # noqa: PLC0415  (SciPy on first use: serving replicas import this module)

        half = float(stats.t.ppf(0.5 + self.level / 2, df)) * se
        return value - half, value + half


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap: B replicates of V̂ on rows (or whole clusters) drawn with replacement,
    seeded; bounds = the (1∓level)/2 quantiles of the replicates."""

    level: float = 0.95
    n_boot: int = 500
    seed: int = 0
    name: str = "bootstrap"

    def bounds(self, parts, value, clusters, ess):
        normal_quantile(self.level)
        num = cluster_sums(parts.num, clusters)  # [C, J, K]
        den = cluster_sums(parts.den, clusters)  # [C, J]
        c, j, k = num.shape
        rng = np.random.default_rng(self.seed)
        chunk = max(1, int(4e6 // max(c * j * (k + 1), 1)))
        reps = []
        for start in range(0, self.n_boot, chunk):  # chunks of replicates, bounded memory
            idx = rng.integers(0, c, size=(min(chunk, self.n_boot - start), c))
            num_b, den_b = num[idx].sum(1), den[idx].sum(1)  # [b, J, K], [b, J]
            with np.errstate(invalid="ignore", divide="ignore"):
                reps.append((num_b / np.where(den_b == 0, np.nan, den_b)[:, :, None]).sum(1))
        reps = np.concatenate(reps)
        alpha = (1 - self.level) / 2
        low, high = np.nanquantile(reps, [alpha, 1 - alpha], axis=0)
        return low, high


@dataclass(frozen=True)
class AbstainRule:
    """Abstain (value NaN, with a reason) when ESS < min_ess or ESS/n < min_ess_fraction."""

    min_ess: float = 100.0
    min_ess_fraction: float = 0.01

    def reason(self, ess: float, n: int) -> str | None:
        if ess < self.min_ess:
            return f"ESS {ess:.1f} < min_ess {self.min_ess:g} (n={n})"
        if n and ess / n < self.min_ess_fraction:
            return f"ESS/n {ess / n:.4f} < min_ess_fraction {self.min_ess_fraction:g} (ESS {ess:.1f}, n={n})"
        return None


@dataclass(frozen=True)
class Estimate:
    """One policy value for one reward column, with its interval. Abstained results carry
    value = low = high = NaN and ``reason`` naming the failed threshold and the measured ESS."""

    value: float
    low: float
    high: float
    ess: float
    n: int
    method: str
    interval: str
    abstained: bool = False
    reason: str | None = None
    reward: str = ""
    level: float = 0.95
    info: Any = field(default_factory=lambda: MappingProxyType({}))

    @property
    def width(self) -> float:
        return self.high - self.low

    def covers(self, truth: float) -> bool:
        return bool(self.low <= truth <= self.high)
