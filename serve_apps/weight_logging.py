"""Gaussian weight logging in serving (Jeunen et al., arXiv 2405.02141: the scalarisation weights are a
continuous action, a = log w).

Per request the ranking utility weights are drawn around the live weights μ:

    a ~ N(log μ, Σ) truncated to the box [log(floor·high), log(high)]^k,   w = exp(a)

(high = ``actors.stages.RANKING_ACTION_HIGH``; a weight of μ below floor·high — a zero one — is lifted to it,
one above high lowered to it). The draw is exact: per dimension ``scipy.stats.truncnorm`` for a diagonal Σ,
rejection (the first of iid candidates inside the box) for a full Σ. Its log density

    log π(a | μ) = log φ_Σ(a − log μ) − log Z(log μ),   Z = P_{N(log μ, Σ)}(box)

is ``rllib_policies.ope.GaussianPolicy(log μ, Σ, low, high).log_density`` — the policy OPE evaluates with —
so serving and OPE agree by construction. The weights are served as float32 (the telemetry's
``utility_weights``) and μ is logged as float32 (``weight_mean``); both are rounded *before* the density is
taken and the box's ends are float32 values, so ``log_density(weight_mean, utility_weights)`` on the logged
columns gives the logged ``weight_log_density`` exactly for a diagonal Σ. For a full Σ, Z is Genz's
quasi-Monte Carlo box probability (scipy, fixed generator, tolerance 1e-7), so a recomputation agrees to
about 1e-7 rather than bit for bit.

No torch and no running Ray needed: usable outside Serve (simulators, offline checks).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from actors.served_policies import CRMPolicy, log_box_floor
from actors.stages import RANKING_ACTION_HIGH, RANKING_PARAMS
from rllib_policies.ope import GaussianPolicy

DEFAULT_STD = 0.3  # per weight, in log space: ≈ ±30 % around μ
DEFAULT_FLOOR = 1e-3
CONFIG_KEYS = ("std", "cov", "floor", "seed", "max_tries")


def _float32_box(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 weights inside [low, high]: smallest float32 ≥ low, largest float32 ≤ high."""
    lo32, hi32 = np.asarray(low, np.float32), np.asarray(high, np.float32)
    lo32 = np.where(lo32.astype(np.float64) < low, np.nextafter(lo32, np.float32(np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) > high, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    return lo32.astype(np.float32), hi32.astype(np.float32)


@dataclass(frozen=True)
class WeightLogging:
    """The truncated log-normal logging policy over the k ranking weights.

    ``std`` [k] (diagonal Σ = diag(std²)) or ``cov`` [k, k] (full Σ, symmetric positive definite), both in
    log space; ``floor`` ∈ (0, 1) sets the box's lower end floor·high; ``seed`` seeds the draws (None: fresh
    entropy); ``max_tries`` bounds the rejection candidates per request for a full Σ."""

    std: np.ndarray | None = None
    cov: np.ndarray | None = None
    floor: float = DEFAULT_FLOOR
    seed: int | None = None
    max_tries: int = 100_000
    high: np.ndarray = field(default_factory=lambda: RANKING_ACTION_HIGH.astype(np.float64))
    weight_low: np.ndarray = field(init=False)  # the box's ends: float32 weights, and their logs
    weight_high: np.ndarray = field(init=False)
    log_low: np.ndarray = field(init=False)
    log_high: np.ndarray = field(init=False)
    _truncnorm: object = field(init=False, repr=False, compare=False)  # scipy.stats.truncnorm (__post_init__)

    @classmethod
    def from_config(cls, config: dict | None, high: np.ndarray = RANKING_ACTION_HIGH) -> WeightLogging | None:
        """``{"std": float | [k], "cov": [[k × k]], "floor": 1e-3, "seed": 0, "max_tries": 100000}`` → a
        validated policy (None: off). Give ``std`` or ``cov``, not both (neither: std 0.3 per weight).
        Bad values raise ValueError naming the field."""
        if config is None:
            return None
        if not isinstance(config, dict):
            raise ValueError(f"weight_logging must be a dict or None, got {type(config).__name__}")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"weight_logging: unknown keys {unknown}; known are {list(CONFIG_KEYS)}")
        high = np.asarray(high, np.float64)
        k = len(high)
        names = ", ".join(RANKING_PARAMS) if k == len(RANKING_PARAMS) else f"{k} weights"
        if "std" in config and "cov" in config:
            raise ValueError("weight_logging: give 'std' (a diagonal Σ) or 'cov' (a full Σ), not both")
        std = cov = None
        if "cov" in config:
            cov = np.asarray(config["cov"], np.float64)
            if cov.shape != (k, k):
                raise ValueError(f"weight_logging.cov has shape {cov.shape}; expected ({k}, {k}) over ({names})")
            if not np.isfinite(cov).all():
                raise ValueError("weight_logging.cov must be finite")
            if not np.allclose(cov, cov.T, rtol=0, atol=1e-12):
                raise ValueError("weight_logging.cov must be symmetric")
            if np.linalg.eigvalsh(cov).min() <= 0:
                raise ValueError(
                    f"weight_logging.cov must be positive definite (eigenvalues {np.linalg.eigvalsh(cov).round(6)})"
                )
        else:
            std = np.asarray(config.get("std", DEFAULT_STD), np.float64)
            if std.ndim == 0:
                std = np.full(k, float(std))
            if std.shape != (k,):
                raise ValueError(
                    f"weight_logging.std has {std.size} entries; expected one float or {k} (one per weight: {names})"
                )
            if not (np.isfinite(std).all() and (std > 0).all()):
                raise ValueError(f"weight_logging.std must be finite and > 0 (log-space), got {std.tolist()}")
        floor = config.get("floor", DEFAULT_FLOOR)
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 < floor < 1:
            raise ValueError(f"weight_logging.floor must be a number in (0, 1), got {floor!r}")
        seed = config.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"weight_logging.seed must be an integer >= 0 or None, got {seed!r}")
        max_tries = config.get("max_tries", 100_000)
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"weight_logging.max_tries must be an integer >= 1, got {max_tries!r}")
        return cls(std=std, cov=cov, floor=float(floor), seed=seed, max_tries=max_tries, high=high)

    @classmethod
    def on_box(cls, std: np.ndarray, low: np.ndarray, high: np.ndarray, seed: int | None = None) -> WeightLogging:
        """The diagonal policy with log-space ``std`` [k] on the log-weight box [low, high]^k, as a learned weight
        policy states it (actors.served_policies.CRMPolicy); ValueError when that box is not one this logging
        can serve (a lower end floor·high with one floor in (0, 1) for every weight)."""
        high = np.asarray(high, np.float64)
        floor = log_box_floor(low, high)
        std = np.asarray(std, np.float64)
        if std.shape != high.shape or not (np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"std must be {len(high)} finite values > 0 (log-space), got {std.tolist()}")
        return cls(std=std, floor=floor, seed=seed, high=np.exp(high))

    def __post_init__(self) -> None:
        lo32, hi32 = _float32_box(self.floor * np.asarray(self.high, np.float64), np.asarray(self.high, np.float64))
        put = object.__setattr__
        put(self, "weight_low", lo32)
        put(self, "weight_high", hi32)
        put(self, "log_low", np.log(lo32.astype(np.float64)))
        put(self, "log_high", np.log(hi32.astype(np.float64)))
        # SciPy's truncated normal, imported here: a replica that logs weights pays for it at deploy, not on its
        # first request; one that does not never imports it
        from scipy.stats import truncnorm  # noqa: PLC0415

        put(self, "_truncnorm", truncnorm)

    @property
    def diagonal(self) -> bool:
        return self.cov is None

    def rng(self, stream: str = "") -> np.random.Generator:
        """The draws' generator: ``seed`` with a stable ``stream`` key (e.g. the replica id), so replicas
        seeded alike still draw apart; fresh entropy when ``seed`` is None."""
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, zlib.crc32(stream.encode())])

    def clip_mean(self, weights: np.ndarray) -> np.ndarray:
        """μ as logged (float32, [..., k]): the live weights moved into the box (0 → floor·high)."""
        return np.clip(np.asarray(weights, np.float32), self.weight_low, self.weight_high)

    def policy(self, mean: np.ndarray) -> GaussianPolicy:
        """The truncated Gaussian over a = log w around μ = ``mean`` (weight units, [k] or [n, k])."""
        log_mean = np.log(self.clip_mean(mean).astype(np.float64))
        scale = self.std if self.diagonal else self.cov
        return GaussianPolicy(log_mean, scale, self.log_low, self.log_high)

    def log_density(self, mean: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """log π(log w | μ) per row [n] (−inf outside the box): recomputes ``weight_log_density`` from the
        logged ``weight_mean`` and ``utility_weights`` columns."""
        a = np.log(np.asarray(weights, np.float32).astype(np.float64))
        return self.policy(mean).log_density(a)

    def sample_log(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """a [n, k] drawn exactly from the truncated Gaussian around each row of ``mean`` [n, k] (weight
        units); None for a full Σ when a row found no candidate inside the box in ``max_tries``."""
        mu = np.log(self.clip_mean(np.atleast_2d(mean)).astype(np.float64))
        if self.diagonal:
            return self._truncnorm.rvs(
                (self.log_low - mu) / self.std,
                (self.log_high - mu) / self.std,
                loc=mu,
                scale=self.std,
                size=mu.shape,
                random_state=rng,
            )
        chol = np.linalg.cholesky(self.cov)
        out = np.empty_like(mu)
        chunk = min(self.max_tries, 256)
        for i, m in enumerate(mu):  # the first of iid candidates inside the box is an exact truncated draw
            for _ in range(-(-self.max_tries // chunk)):
                cand = m + rng.standard_normal((chunk, len(m))) @ chol.T
                inside = np.flatnonzero(np.all((cand >= self.log_low) & (cand <= self.log_high), axis=1))
                if len(inside):
                    out[i] = cand[inside[0]]
                    break
            else:
                return None
        return out

    def draw(self, mean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float] | None:
        """One request: (served weights float32 [k], μ float32 [k], log density of the served log w), or None
        when a full Σ could not be sampled exactly (then serve μ unexplored and log no density)."""
        if not np.all(np.isfinite(mean)):
            raise ValueError(f"weight_logging: the live weights must be finite, got {np.asarray(mean).tolist()}")
        a = self.sample_log(mean, rng)
        if a is None:
            return None
        weights = np.clip(np.exp(a[0]).astype(np.float32), self.weight_low, self.weight_high)
        mu = self.clip_mean(mean)
        return weights, mu, float(self.log_density(mu, weights)[0])


@dataclass(frozen=True)
class ServedCRM:
    """A published CRM weight policy as a recommend replica serves it: m(x) from the policy, the draw around
    exp(m(x)) and its logged log density from ``WeightLogging`` on the policy's box with the policy's std, so
    the logged density is the served policy's exactly and its traffic trains the next round."""

    policy: CRMPolicy
    logging: WeightLogging

    @classmethod
    def from_params(cls, params: dict) -> ServedCRM:
        """ValueError naming the field for a malformed policy (CRMPolicy, which also refuses a box serving cannot
        draw on)."""
        policy = CRMPolicy(params)
        return cls(policy, WeightLogging.on_box(policy.std, policy.low, policy.high))

    def draw(self, context: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
        """One request [1, context_dim] → (served weights float32 [k], exp(m(x)) float32 [k], log density of
        the served log w); ValueError for a context of another width."""
        drawn = self.logging.draw(np.exp(self.policy.mean_log_weights(context)[0]), rng)
        assert drawn is not None  # a diagonal Σ always draws exactly
        return drawn
