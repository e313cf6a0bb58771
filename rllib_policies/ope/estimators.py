"""Off-policy estimators for logged bandits, one small frozen dataclass each (Open Bandit Pipeline's
style), for grid actions and for continuous multivariate actions (weights a = log w, Jeunen et al.,
arXiv 2405.02141). Every estimator's ``estimate(data, target)`` returns an :class:`Estimate` with its
interval (``interval=``: Normal, Bootstrap, EssCorrected) and Kish's ESS, or an explicit abstention
(``abstain=``). Multiple rewards: one Estimate per reward column — ``estimate_all`` returns them by
reward name, ``estimate(..., reward=name_or_index)`` one of them.

Notation: w_i = π(a_i|x_i)/π₀(a_i|x_i), q̂(x, a) the reward model, q̂_π(x) = Σ_a π(a|x)·q̂(x, a).

Targets: grid estimators take π as [n, A] probabilities, [n] deterministic grid indices, or a callable
context [n, d] → either; DensityRatio* take a :class:`GaussianPolicy`; KernelSNIPS takes deterministic
actions [n, k] (or a callable context → [n, k])."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from .data import GaussianPolicy, LoggedBandit, LoggedDensity
from .intervals import AbstainRule, Estimate, Interval, Normal, Parts, kish_ess

# ---------------------------------------------------------------------------------------------- reward models


@dataclass(frozen=True)
class TabularMean:
    """q̂(x, a) = mean logged reward of action a (context ignored; the global mean for unseen actions)."""

    def __call__(self, data: LoggedBandit) -> np.ndarray:
        a, r = data.action, data.reward
        counts = np.bincount(a, minlength=data.n_actions).astype(np.float64)
        sums = np.stack([np.bincount(a, weights=r[:, k], minlength=data.n_actions) for k in range(r.shape[1])], 1)
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], r.mean(0))
        return np.broadcast_to(means, (len(data), *means.shape))


@dataclass(frozen=True)
class RidgeRewardModel:
    """q̂(x, a) = [1, x]·β_a, β_a = (X_aᵀX_a + αI)⁻¹X_aᵀr_a fitted per action on its logged rows
    (the intercept unpenalised); every reward column at once."""

    alpha: float = 1.0

    def __call__(self, data: LoggedBandit) -> np.ndarray:
        x = np.column_stack([np.ones(len(data)), data.context])
        penalty = self.alpha * np.eye(x.shape[1])
        penalty[0, 0] = 0.0
        onehot = np.eye(data.n_actions)[data.action]  # [n, A]
        gram = np.einsum("na,ni,nj->aij", onehot, x, x) + penalty + 1e-9 * np.eye(x.shape[1])
        xty = np.einsum("na,ni,nk->aik", onehot, x, data.reward)
        beta = np.linalg.solve(gram, xty)  # [A, d+1, K]
        return np.einsum("ni,aik->nak", x, beta)


RewardModel = Callable[[LoggedBandit], np.ndarray] | np.ndarray


def _q_hat(model: RewardModel, data: LoggedBandit) -> np.ndarray:
    q = np.asarray(model(data) if callable(model) else model, np.float64)
    k = data.reward.shape[1]
    if q.ndim == 2:
        q = q[:, :, None]
    if q.shape != (len(data), data.n_actions, k):
        raise ValueError(
            f"reward model gives shape {q.shape}; expected (n, A, K) = ({len(data)}, {data.n_actions}, {k})"
            " or (n, A) for one reward"
        )
    return q


# ---------------------------------------------------------------------------------------------- targets


def _grid_target(data: LoggedBandit, target) -> np.ndarray:
    """π(·|x_i) as [n, A] probabilities, validated."""
    if data.continuous:
        raise ValueError("column 'action' holds continuous actions; a grid estimator needs grid indices")
    pi = target(data.context) if callable(target) else target
    pi = np.asarray(pi)
    if pi.ndim == 1 and pi.dtype.kind in "iu":
        if len(pi) != len(data):
            raise ValueError(f"target has {len(pi)} rows, the table {len(data)}")
        bad = (pi < 0) | (pi >= data.n_actions)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"target row {i}: grid index {pi[i]} outside [0, {data.n_actions})")
        return np.eye(data.n_actions)[pi]
    pi = np.asarray(pi, np.float64)
    if pi.shape != (len(data), data.n_actions):
        raise ValueError(f"target has shape {pi.shape}; expected (n, A) = ({len(data)}, {data.n_actions})")
    bad = ~np.isfinite(pi).all(1) | (pi < 0).any(1) | (np.abs(pi.sum(1) - 1) > 1e-6)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target row {i}: π(·|x) must be a probability vector, got {pi[i].tolist()}")
    return pi


def _check_continuous(data: LoggedBandit, dim: int, what: str) -> None:
    if not data.continuous:
        raise ValueError("column 'action' holds grid indices; a continuous estimator needs weight vectors")
    if data.action_dim != dim:
        raise ValueError(f"column 'action' row 0: action has dimension {data.action_dim}, the {what} has {dim}")


# ---------------------------------------------------------------------------------------------- base


@dataclass(frozen=True)
class Estimator:
    """Base: subclasses reduce (data, target) to :class:`Parts`; the interval and the abstain rule do the rest."""

    interval: Interval = Normal()
    abstain: AbstainRule = AbstainRule()
    name: ClassVar[str] = "estimator"

    def parts(self, data: LoggedBandit, target) -> Parts:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def estimate_all(self, data: LoggedBandit, target) -> dict[str, Estimate]:
        """One Estimate per reward column, by reward name."""
        parts = self.parts(data, target)
        n, ess = parts.n, kish_ess(parts.weights)
        common = dict(ess=ess, n=n, method=self.name, interval=self.interval.name, level=self.interval.level)
        info = MappingProxyType(self.info())
        reason = self.abstain.reason(ess, n)
        if reason is not None:
            nan = float("nan")
            return {
                r: Estimate(nan, nan, nan, abstained=True, reason=reason, reward=r, info=info, **common)
                for r in data.reward_names
            }
        value = parts.value()
        low, high = self.interval.bounds(parts, value, data.clusters, ess)
        return {
            r: Estimate(float(value[k]), float(low[k]), float(high[k]), reward=r, info=info, **common)
            for k, r in enumerate(data.reward_names)
        }

    def estimate(self, data: LoggedBandit, target, reward: int | str = 0) -> Estimate:
        """The Estimate of one reward column (by index or name)."""
        name = data.reward_names[reward] if isinstance(reward, int) else reward
        if name not in data.reward_names:
            raise ValueError(f"missing reward column {name!r} (table has {list(data.reward_names)})")
        return self.estimate_all(data, target)[name]


def _ratio(num: np.ndarray, den: np.ndarray, weights: np.ndarray, self_normalised: bool = False) -> Parts:
    """One-component parts: num [n, K], den [n]."""
    return Parts(num[:, None, :], den[:, None], weights, self_normalised)


# ---------------------------------------------------------------------------------------------- grid actions


@dataclass(frozen=True)
class IPS(Estimator):
    """Inverse propensity scoring (unbiased when π₀ > 0 wherever π > 0):

    V̂ = (1/n) Σ_i w_i·r_i."""

    name: ClassVar[str] = "ips"

    def parts(self, data, target):
        w = _grid_target(data, target)[np.arange(len(data)), data.action] / data.propensity
        return _ratio(w[:, None] * data.reward, np.ones(len(data)), w)


@dataclass(frozen=True)
class SNIPS(Estimator):
    """Self-normalised IPS (biased O(1/n), bounded by the rewards' range, lower variance):

    V̂ = Σ_i w_i·r_i / Σ_i w_i."""

    name: ClassVar[str] = "snips"

    def parts(self, data, target):
        w = _grid_target(data, target)[np.arange(len(data)), data.action] / data.propensity
        return _ratio(w[:, None] * data.reward, w, w, self_normalised=True)


@dataclass(frozen=True)
class DM(Estimator):
    """Direct method: V̂ = (1/n) Σ_i q̂_π(x_i) = (1/n) Σ_i Σ_a π(a|x_i)·q̂(x_i, a). Unweighted (ESS = n);
    its interval covers V only as far as q̂ is unbiased (model error is not in the interval)."""

    reward_model: Any = RidgeRewardModel()
    name: ClassVar[str] = "dm"

    def parts(self, data, target):
        pi = _grid_target(data, target)
        q_pi = np.einsum("na,nak->nk", pi, _q_hat(self.reward_model, data))
        return _ratio(q_pi, np.ones(len(data)), np.ones(len(data)))


def _dr_terms(est, data, target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q̂_π(x_i) [n, K], w_i [n], r_i − q̂(x_i, a_i) [n, K])."""
    pi = _grid_target(data, target)
    q = _q_hat(est.reward_model, data)
    rows = np.arange(len(data))
    w = pi[rows, data.action] / data.propensity
    return np.einsum("na,nak->nk", pi, q), w, data.reward - q[rows, data.action]


@dataclass(frozen=True)
class DR(Estimator):
    """Doubly robust (unbiased if either π₀ or q̂ is right):

    V̂ = (1/n) Σ_i [q̂_π(x_i) + w_i·(r_i − q̂(x_i, a_i))]."""

    reward_model: Any = RidgeRewardModel()
    name: ClassVar[str] = "dr"

    def parts(self, data, target):
        q_pi, w, resid = _dr_terms(self, data, target)
        return _ratio(q_pi + w[:, None] * resid, np.ones(len(data)), w)


@dataclass(frozen=True)
class SNDR(Estimator):
    """Self-normalised DR:  V̂ = (1/n) Σ_i q̂_π(x_i) + Σ_i w_i·(r_i − q̂(x_i, a_i)) / Σ_i w_i."""

    reward_model: Any = RidgeRewardModel()
    name: ClassVar[str] = "sndr"

    def parts(self, data, target):
        q_pi, w, resid = _dr_terms(self, data, target)
        num = np.stack([q_pi, w[:, None] * resid], axis=1)
        return Parts(num, np.column_stack([np.ones(len(data)), w]), w)


@dataclass(frozen=True)
class SwitchDR(Estimator):
    """Switch-DR (Wang et al. 2017, as in Open Bandit Pipeline): DR whose correction is switched off
    where the weight exceeds τ (those rows fall back to the model):

        V̂ = (1/n) Σ_i [q̂_π(x_i) + w_i·1{w_i ≤ τ}·(r_i − q̂(x_i, a_i))];   ESS from the kept weights."""

    reward_model: Any = RidgeRewardModel()
    tau: float = float("inf")
    name: ClassVar[str] = "switch_dr"

    def parts(self, data, target):
        q_pi, w, resid = _dr_terms(self, data, target)
        kept = w * (w <= self.tau)
        return _ratio(q_pi + kept[:, None] * resid, np.ones(len(data)), kept)

    def info(self):
        return {"tau": self.tau}


# ---------------------------------------------------------------------------------------------- continuous actions


def _density_ratio(data: LoggedBandit, target: GaussianPolicy | LoggedDensity) -> np.ndarray:
    if not isinstance(target, (GaussianPolicy, LoggedDensity)):
        raise ValueError(f"target must be a GaussianPolicy or a LoggedDensity, got {type(target).__name__}")
    _check_continuous(data, target.dim, "target policy")
    return np.exp(target.log_density(data.action) - np.log(data.propensity))


@dataclass(frozen=True)
class DensityRatioIPS(Estimator):
    """IPS for a stochastic target over weight vectors a = log w ∈ ℝᵏ (π, π₀ densities; π₀'s truncation
    to a box enters through its normaliser, in the logged density column):

        w_i = π(a_i|x_i) / π₀(a_i|x_i),   V̂ = (1/n) Σ_i w_i·r_i."""

    name: ClassVar[str] = "density_ratio_ips"

    def parts(self, data, target):
        w = _density_ratio(data, target)
        return _ratio(w[:, None] * data.reward, np.ones(len(data)), w)


@dataclass(frozen=True)
class DensityRatioSNIPS(Estimator):
    """Self-normalised density-ratio IPS:  V̂ = Σ_i w_i·r_i / Σ_i w_i,  w_i = π(a_i|x_i)/π₀(a_i|x_i)."""

    name: ClassVar[str] = "density_ratio_snips"

    def parts(self, data, target):
        w = _density_ratio(data, target)
        return _ratio(w[:, None] * data.reward, w, w, self_normalised=True)


@dataclass(frozen=True)
class KernelSNIPS(Estimator):
    """Gaussian-kernel SNIPS for a deterministic target a = π(x) ∈ ℝᵏ (Kallus & Zhou 2018):

        w_i = K_H(a_i − π(x_i)) / π₀(a_i|x_i),   K_H(u) = (2π)^{-k/2}|H|^{-1/2} exp(−½ uᵀH⁻¹u),
        V̂ = Σ_i w_i·r_i / Σ_i w_i.

    H (``bandwidth``: a scalar h → h²I, a [k] vector of h_j → diag(h_j²), or a [k, k] matrix) is the
    bias knob: V̂ estimates the value of π smoothed by N(0, H), → the deterministic value as H → 0 while
    the ESS shrinks. It is reported in ``Estimate.info['bandwidth']``."""

    bandwidth: Any = 0.1
    name: ClassVar[str] = "kernel_snips"

    def matrix(self, k: int) -> np.ndarray:
        h = np.asarray(self.bandwidth, np.float64)
        if h.ndim == 0:
            return float(h) ** 2 * np.eye(k)
        if h.shape == (k,):
            return np.diag(h**2)
        if h.shape == (k, k):
            return h
        raise ValueError(f"bandwidth has shape {h.shape}; expected a scalar, ({k},) or ({k}, {k})")

    def parts(self, data, target):
        actions = np.asarray(target(data.context) if callable(target) else target, np.float64)
        actions = actions.reshape(len(data), -1)
        _check_continuous(data, actions.shape[1], "target's actions")
        kernel = GaussianPolicy(actions, self.matrix(actions.shape[1]))
        w = np.exp(kernel.log_density(data.action) - np.log(data.propensity))
        return _ratio(w[:, None] * data.reward, w, w, self_normalised=True)

    def info(self):
        h = np.asarray(self.bandwidth, np.float64)
        return {"bandwidth": h.tolist()}
