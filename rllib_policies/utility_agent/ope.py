"""Off-policy estimators for deterministic per-request policies on exploration logs (small
dataclasses in the style of Open Bandit Pipeline), and the ratio-of-means CI the simulator's
ground truth uses. Every CI is a normal one at confidence ``level``: half-width z·s.e. with
z = Φ⁻¹((1 + level)/2) (1.95996… at 95 %)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rllib_policies.ope.intervals import cluster_sums, normal_quantile


@dataclass(frozen=True)
class OPEResult:
    value: np.ndarray  # [K] estimated mean reward per request, one per objective
    ci: np.ndarray  # [K] half-width of the confidence interval (the estimator's level)
    ess: float  # effective sample size (Σw)² / Σw²
    hits: int  # logged requests whose action equals the policy's

    def row(self, names) -> dict:
        return {
            **{n: float(v) for n, v in zip(names, self.value)},
            **{f"{n}_ci": float(c) for n, c in zip(names, self.ci)},
            "ess": self.ess,
            "hits": self.hits,
        }


@dataclass(frozen=True)
class RewardAtHit:
    """PRL-PUTS's "reward at hit" = self-normalised IPS for a deterministic policy π:

        w_i = 1{a_i = π(s_i)} / p_i,    V̂ = Σ_i w_i·r_i / Σ_i w_i,
        Var(V̂) ≈ Σ_c (Σ_{i∈c} w_i·(r_i − V̂))² / (Σ_i w_i)²   (delta method),   ESS = (Σ w)² / Σ w²,

    with clusters c = single requests by default, or the given cluster ids (users, sessions): requests
    of one user are correlated, and the per-request variance understates the uncertainty (seen here:
    long views vary across users far more than across requests). Under uniform logging
    (p_i = 1/|A|) V̂ is the mean reward of the logged requests whose action equals the policy's."""

    level: float = 0.95  # confidence level of the CI

    @property
    def z(self) -> float:
        return normal_quantile(self.level)

    def estimate(
        self,
        logged_actions: np.ndarray,
        propensity: np.ndarray,
        rewards: np.ndarray,
        policy_actions: np.ndarray,
        clusters: np.ndarray | None = None,
    ) -> OPEResult:
        rewards = np.asarray(rewards, np.float64).reshape(len(logged_actions), -1 if len(logged_actions) else 2)
        w = (np.asarray(logged_actions) == np.asarray(policy_actions)) / np.asarray(propensity, np.float64)
        total = w.sum()
        if total == 0:  # no hits (or no rows): no estimate
            nan = np.full(rewards.shape[1], np.nan)
            return OPEResult(nan, nan, 0.0, 0)
        value = (w[:, None] * rewards).sum(0) / total
        terms = w[:, None] * (rewards - value)
        terms = cluster_sums(terms, clusters)
        var = (terms**2).sum(0) / total**2
        return OPEResult(value, self.z * np.sqrt(var), float(total**2 / (w**2).sum()), int((w > 0).sum()))

    def difference(
        self,
        logged_actions: np.ndarray,
        propensity: np.ndarray,
        rewards: np.ndarray,
        policy_a: np.ndarray,
        policy_b: np.ndarray,
        clusters: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Paired Δ̂ = V̂(π_a) − V̂(π_b) on the same logs and its standard error [K] (not a CI): the
        two estimates' linearised terms ψ_i = w_i·(r_i − V̂)/Σw subtract per row, then add per cluster,

            Var(Δ̂) ≈ Σ_c (Σ_{i∈c} ψ_{a,i} − ψ_{b,i})²,

        so requests both policies agree on cancel and one user's correlated requests count once.
        NaN where either policy has no hit."""
        rewards = np.asarray(rewards, np.float64).reshape(len(logged_actions), -1)
        logged, p = np.asarray(logged_actions), np.asarray(propensity, np.float64)
        psi, values = [], []
        for policy in (policy_a, policy_b):
            w = (logged == np.asarray(policy)) / p
            total = w.sum()
            if total == 0:
                nan = np.full(rewards.shape[1], np.nan)
                return nan, nan
            v = (w[:, None] * rewards).sum(0) / total
            values.append(v)
            psi.append(w[:, None] * (rewards - v) / total)
        terms = psi[0] - psi[1]
        terms = cluster_sums(terms, clusters)
        return values[0] - values[1], np.sqrt((terms**2).sum(0))


@dataclass(frozen=True)
class InversePropensity:
    """Unnormalised IPS: V̂ = (1/N)·Σ_i w_i·r_i, Var ≈ Var_i(w_i·r_i)/N (unbiased, higher variance)."""

    level: float = 0.95  # confidence level of the CI

    @property
    def z(self) -> float:
        return normal_quantile(self.level)

    def estimate(self, logged_actions, propensity, rewards, policy_actions) -> OPEResult:
        rewards = np.asarray(rewards, np.float64).reshape(len(logged_actions), -1)
        w = (np.asarray(logged_actions) == np.asarray(policy_actions)) / np.asarray(propensity, np.float64)
        terms = w[:, None] * rewards
        n = len(w)
        ess = float(w.sum() ** 2 / max((w**2).sum(), 1e-12))
        return OPEResult(terms.mean(0), self.z * terms.std(0, ddof=1) / np.sqrt(n), ess, int((w > 0).sum()))


def ratio_mean_ci(numerator: np.ndarray, denominator: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean per request over sessions, V = Σ_s R_s / Σ_s N_s, with its CI by linearisation:
    ℓ_s = (R_s − V·N_s)/N̄, half-width = z·sd(ℓ_s)/√S. numerator [S, K], denominator [S]."""
    num = np.asarray(numerator, np.float64).reshape(len(denominator), -1)
    den = np.asarray(denominator, np.float64)
    value = num.sum(0) / den.sum()
    lin = (num - value * den[:, None]) / den.mean()
    return value, normal_quantile(level) * lin.std(0, ddof=1) / np.sqrt(len(den))


def paired_ratio_difference(num_a, den_a, num_b, den_b, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """V_a − V_b for two policies run on the same sessions (common users and draws), with the CI of
    the paired linearised difference."""
    va, _ = ratio_mean_ci(num_a, den_a)
    vb, _ = ratio_mean_ci(num_b, den_b)
    la = (np.asarray(num_a, np.float64).reshape(len(den_a), -1) - va * np.asarray(den_a)[:, None]) / np.mean(den_a)
    lb = (np.asarray(num_b, np.float64).reshape(len(den_b), -1) - vb * np.asarray(den_b)[:, None]) / np.mean(den_b)
    d = la - lb
    return va - vb, normal_quantile(level) * d.std(0, ddof=1) / np.sqrt(len(d))
