"""Synthetic logged bandits with known policy values, to measure the intervals' empirical coverage.

- :class:`GridBandit`: linear contextual bandit over A grid actions, μ(x, a) = x·θ_a + b_a, Gaussian noise;
  logging π₀ = (1−f)·softmax(−β₀·μ(x, ·)) + f/A (it prefers the worse actions; f = floor),
  target π_ε = (1−ε)·π₀ + ε·greedy — ε is the distance (ε = 1: deterministic greedy, the far target).
- :class:`WeightBandit`: actions are weight vectors a = log w ∈ ℝᵏ; context x ~ N(0, I_d), best action
  a*(x) = M·x, mean reward μ(x, a) = exp(−‖a − a*(x)‖² / (2s²)) ∈ (0, 1]; logging N(½·M·x, σ₀²I) truncated to
  the box [−b, b]ᵏ; stochastic target N(M·x + δ·1, σ_π²I) truncated to the same box — δ is the distance;
  deterministic target clip(M·x + δ·1, box) for the kernel estimator.

Optional user clusters: ``rows_per_user`` > 1 adds a per-user reward offset u ~ N(0, τ²) shared by that
user's rows (zero mean: the policy values are unchanged) and returns the user ids as cluster ids.

True values: E_x E_{a~π}[μ(x, a)] by one large Monte-Carlo draw (fixed seed, 2·10⁶ contexts, cached per target);
its standard error (≈ 3·10⁻⁴ or less) is far below every interval width measured here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from .data import GaussianPolicy, LoggedBandit

MC_DRAWS = 2_000_000
MC_CHUNK = 100_000


def _user_offsets(rng: np.random.Generator, n: int, rows_per_user: int, scale: float):
    if rows_per_user <= 1:
        return np.zeros(n), None
    users = np.arange(n) // rows_per_user
    return rng.normal(0.0, scale, users[-1] + 1)[users], users


@dataclass(frozen=True)
class GridBandit:
    n_actions: int = 5
    dim: int = 3
    beta0: float = 1.0  # logging's preference against good actions
    floor: float = 0.2  # share of uniform exploration in the logging policy (bounds w ≤ A/floor)
    noise: float = 0.5
    user_scale: float = 0.5
    seed: int = 0

    @property
    def theta(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return rng.normal(0, 1 / np.sqrt(self.dim), (self.n_actions, self.dim)), rng.normal(0, 0.3, self.n_actions)

    def mean_reward(self, context: np.ndarray) -> np.ndarray:
        theta, bias = self.theta
        return context @ theta.T + bias  # [n, A]

    def logging(self, context: np.ndarray) -> np.ndarray:
        soft = special.softmax(-self.beta0 * self.mean_reward(context), axis=1)
        return (1 - self.floor) * soft + self.floor / self.n_actions

    def target(self, epsilon: float):
        """π_ε(·|x) = (1−ε)·π₀(·|x) + ε·1{a = argmax_a μ(x, a)}, as a callable context → [n, A]."""

        def policy(context: np.ndarray) -> np.ndarray:
            greedy = np.eye(self.n_actions)[self.mean_reward(context).argmax(1)]
            return (1 - epsilon) * self.logging(context) + epsilon * greedy

        return policy

    def logs(self, n: int, rng: np.random.Generator, rows_per_user: int = 1) -> LoggedBandit:
        x = rng.standard_normal((n, self.dim))
        p0 = self.logging(x)
        a = (p0.cumsum(1) < rng.random((n, 1))).sum(1).clip(max=self.n_actions - 1)
        offset, users = _user_offsets(rng, n, rows_per_user, self.user_scale)
        r = self.mean_reward(x)[np.arange(n), a] + offset + rng.normal(0, self.noise, n)
        return LoggedBandit(x, a, r[:, None], p0[np.arange(n), a], users, ("reward",), self.n_actions)

    def value(self, epsilon: float, draws: int = MC_DRAWS) -> float:
        return _grid_value(self, float(epsilon), draws)


@lru_cache(maxsize=64)
def _grid_value(bandit: GridBandit, epsilon: float, draws: int) -> float:
    rng, total, policy = np.random.default_rng(12345), 0.0, bandit.target(epsilon)
    for _ in range(max(draws // MC_CHUNK, 1)):
        x = rng.standard_normal((MC_CHUNK, bandit.dim))
        total += float((policy(x) * bandit.mean_reward(x)).sum())
    return total / (max(draws // MC_CHUNK, 1) * MC_CHUNK)


@dataclass(frozen=True)
class WeightBandit:
    dim: int = 2  # context
    action_dim: int = 2  # k weights, a = log w
    box: float = 2.0  # logging and target truncated to [−box, box]^k
    sigma0: float = 0.8  # logging spread
    sigma_pi: float = 0.5  # stochastic target spread
    width: float = 1.0  # s, the reward's tolerance around a*(x)
    noise: float = 0.1
    user_scale: float = 0.1
    seed: int = 0

    @property
    def m(self) -> np.ndarray:
        return np.random.default_rng(self.seed).normal(0, 0.5, (self.action_dim, self.dim))

    def mean_reward(self, context: np.ndarray, action: np.ndarray) -> np.ndarray:
        return np.exp(-((action - context @ self.m.T) ** 2).sum(-1) / (2 * self.width**2))

    def logging(self, context: np.ndarray) -> GaussianPolicy:
        return GaussianPolicy(0.5 * context @ self.m.T, np.full(self.action_dim, self.sigma0), -self.box, self.box)

    def target(self, context: np.ndarray, shift: float) -> GaussianPolicy:
        """π_δ(·|x) = N(M·x + δ·1, σ_π²I) truncated to the box."""
        mean = context @ self.m.T + shift
        return GaussianPolicy(mean, np.full(self.action_dim, self.sigma_pi), -self.box, self.box)

    def deterministic_target(self, shift: float):
        """π_δ(x) = clip(M·x + δ·1, box), as a callable context → [n, k]."""
        return lambda context: np.clip(context @ self.m.T + shift, -self.box, self.box)

    def logs(self, n: int, rng: np.random.Generator, rows_per_user: int = 1) -> LoggedBandit:
        x = rng.standard_normal((n, self.dim))
        logging = self.logging(x)
        a = logging.sample(rng)
        offset, users = _user_offsets(rng, n, rows_per_user, self.user_scale)
        r = self.mean_reward(x, a) + offset + rng.normal(0, self.noise, n)
        return LoggedBandit(x, a, r[:, None], logging.density(a), users, ("reward",))

    def value(self, shift: float, draws: int = MC_DRAWS) -> float:
        return _weight_value(self, float(shift), False, draws)

    def deterministic_value(self, shift: float, draws: int = MC_DRAWS) -> float:
        return _weight_value(self, float(shift), True, draws)


@lru_cache(maxsize=64)
def _weight_value(bandit: WeightBandit, shift: float, deterministic: bool, draws: int) -> float:
    rng, total = np.random.default_rng(12345), 0.0
    for _ in range(max(draws // MC_CHUNK, 1)):
        x = rng.standard_normal((MC_CHUNK, bandit.dim))
        if deterministic:
            a = bandit.deterministic_target(shift)(x)
        else:
            a = bandit.target(x, shift).sample(rng)
        total += float(bandit.mean_reward(x, a).sum())
    return total / (max(draws // MC_CHUNK, 1) * MC_CHUNK)


@dataclass(frozen=True)
class Coverage:
    """Over ``repeats`` fresh tables: how often the interval held the truth (among non-abstained),
    mean width, abstain rate."""

    covered: int
    valid: int
    repeats: int
    mean_width: float
    mean_ess: float

    @property
    def coverage(self) -> float:
        return self.covered / self.valid if self.valid else float("nan")

    @property
    def abstain_rate(self) -> float:
        return 1 - self.valid / self.repeats


def measure_coverage(draw, estimators: dict, truth: float, repeats: int, seed: int = 0) -> dict[str, Coverage]:
    """Empirical coverage of several estimators/intervals on the same ``repeats`` fresh tables:
    ``draw(rng) -> LoggedBandit``; ``estimators[label](data) -> Estimate``."""
    rng = np.random.default_rng(seed)
    results = {label: ([], []) for label in estimators}  # (estimates, ESS) per label
    for _ in range(repeats):  # repeats of a whole experiment, not rows
        data = draw(rng)
        for label, estimate in estimators.items():
            results[label][0].append(estimate(data))
    out = {}
    for label, (estimates, _) in results.items():
        kept = [e for e in estimates if not e.abstained]
        widths = [e.width for e in kept]
        out[label] = Coverage(
            covered=sum(e.covers(truth) for e in kept),
            valid=len(kept),
            repeats=repeats,
            mean_width=float(np.mean(widths)) if widths else float("nan"),
            mean_ess=float(np.mean([e.ess for e in estimates])),
        )
    return out
