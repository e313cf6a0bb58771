"""The logged-bandit table every estimator reads, its validation, and the Gaussian policies over
log-space weights (Jeunen et al., arXiv 2405.02141: the action is a weight vector, a = log w).

A table holds, per logged row i: context x_i [d], action a_i (a grid index, or a weight vector [k]),
rewards r_i [K] (one column per objective), the logging propensity p_i = π₀(a_i|x_i) (a probability in
(0, 1] for grid actions, a density > 0 for continuous ones) and optionally a cluster id (the user):
rows of one cluster are correlated, and the intervals then resample / sum per cluster.
Bad input raises ValueError naming the column and the first offending row."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # optional: tables may also come as Arrow / Parquet
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - pyarrow ships with Ray
    pa = pq = None


def _first_bad(mask: np.ndarray) -> int:
    """Index of the first row where ``mask`` (any trailing axes collapsed) is true."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(1))[0])


def _check_finite(column: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"column {column!r} row {i}: value must be finite, got {values[i].tolist()}")


def list_matrix(values, name: str, dtype=np.float64) -> np.ndarray:
    """A list column (one equal-length list per row) as [n, d] ``dtype``; a null or ragged row is refused, naming it."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    lengths = np.asarray(values.value_lengths().fill_null(0))
    if len(lengths) and (lengths != lengths[0]).any():
        i = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(f"column {name!r} row {i}: dimension {lengths[i]}, expected {lengths[0]} (as row 0)")
    flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype)
    return flat.reshape(len(values), lengths[0] if len(lengths) else 0)


@dataclass(frozen=True)
class LoggedBandit:
    """A validated logged-bandit table (numpy columns, float64 except integer grid actions).

    context [n, d]; action [n] int (grid index) or [n, k] float (a = log w); reward [n, K];
    propensity [n] (π₀(a_i|x_i): probability for grid actions, density for continuous ones);
    clusters [n] or None; reward_names K names; n_actions: |A| for grid actions (None: max + 1)."""

    context: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    propensity: np.ndarray
    clusters: np.ndarray | None = None
    reward_names: tuple[str, ...] = ()
    n_actions: int | None = None
    sources: dict[str, str] = field(default_factory=dict)  # field → the table's column name (errors name it)
    continuous: bool = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.propensity)
        put = object.__setattr__
        context = np.asarray(self.context, np.float64)
        put(self, "context", context.reshape(n, -1) if context.size or n == 0 else np.zeros((n, 0)))
        action = np.asarray(self.action)
        continuous = action.dtype.kind == "f" or action.ndim == 2
        put(self, "continuous", bool(continuous))
        put(self, "action", action.astype(np.float64).reshape(n, -1) if continuous else action.astype(np.int64))
        reward = np.asarray(self.reward, np.float64)
        put(self, "reward", reward.reshape(n, -1) if reward.ndim < 2 else reward)
        put(self, "propensity", np.asarray(self.propensity, np.float64).reshape(-1))
        if not self.reward_names:
            put(self, "reward_names", tuple(f"reward_{k}" for k in range(self.reward.shape[1])))
        put(self, "reward_names", tuple(self.reward_names))
        if self.clusters is not None:
            put(self, "clusters", np.asarray(self.clusters).reshape(-1))
        self._validate()
        if not continuous and self.n_actions is None:
            put(self, "n_actions", int(self.action.max()) + 1 if n else 0)

    def _validate(self) -> None:
        n = len(self.propensity)
        col = lambda name: self.sources.get(name, name)  # noqa: E731 (the table's name for a field)
        for name in ("context", "action", "reward") + (("clusters",) if self.clusters is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"column {col(name)!r} has {len(getattr(self, name))} rows, column {col('propensity')!r} has {n}"
                )
        if len(self.reward_names) != self.reward.shape[1]:
            raise ValueError(
                f"column 'reward' has {self.reward.shape[1]} columns but {len(self.reward_names)} reward names"
            )
        _check_finite(col("context"), self.context)
        for k, name in enumerate(self.reward_names):
            _check_finite(name, self.reward[:, k])
        _check_finite(col("propensity"), self.propensity)
        if self.continuous:
            _check_finite(col("action"), self.action)
        p = self.propensity
        bad = (p <= 0) | ((p > 1) if not self.continuous else np.zeros(n, bool))
        if bad.any():
            i = _first_bad(bad)
            want = "a density > 0" if self.continuous else "a probability in (0, 1]"
            raise ValueError(f"column {col('propensity')!r} row {i}: must be {want}, got {p[i]}")
        if not self.continuous:
            bad = (self.action < 0) | ((self.action >= self.n_actions) if self.n_actions else False)
            if np.any(bad):
                i = _first_bad(np.broadcast_to(bad, self.action.shape))
                raise ValueError(
                    f"column {col('action')!r} row {i}: grid index {self.action[i]} outside [0, {self.n_actions})"
                )

    def __len__(self) -> int:
        return len(self.propensity)

    @property
    def action_dim(self) -> int:
        """k, the weight vector's dimension (continuous actions only)."""
        return self.action.shape[1]

    @classmethod
    def from_table(
        cls,
        table,
        *,
        context: str | list[str] | None = "context",
        action: str = "action",
        reward: str | list[str] = "reward",
        propensity: str = "propensity",
        cluster: str | None = None,
        n_actions: int | None = None,
    ) -> LoggedBandit:
        """Build from a pyarrow Table, a Parquet path, or a mapping of column name → array.
        A column may be scalar or a (fixed-size) list column; list columns must have one length
        in every row. ``context`` may name several scalar columns (stacked in that order)."""
        if isinstance(table, str | Path):
            if pq is None:  # pragma: no cover
                raise ImportError("reading Parquet needs pyarrow")
            table = pq.read_table(table)
        names = list(table.column_names) if pa is not None and isinstance(table, pa.Table) else list(table)
        context_cols = [] if context is None else [context] if isinstance(context, str) else list(context)
        reward_cols = [reward] if isinstance(reward, str) else list(reward)
        wanted = [*context_cols, action, *reward_cols, propensity] + ([cluster] if cluster else [])
        for col in wanted:
            if col not in names:
                raise ValueError(f"missing column {col!r} (table has {names})")

        def column(name: str) -> np.ndarray:
            values = table[name]
            if pa is not None and isinstance(values, pa.ChunkedArray | pa.Array):
                if pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
                    return list_matrix(values, name)
                return values.to_numpy(zero_copy_only=False)
            return np.asarray(values)

        n = len(column(propensity))
        ctx = np.concatenate([column(c).reshape(n, -1) for c in context_cols], axis=1) if context_cols else None
        rewards = np.column_stack([column(c).astype(np.float64) for c in reward_cols])
        return cls(
            context=ctx if ctx is not None else np.zeros((n, 0)),
            action=column(action),
            reward=rewards,
            propensity=column(propensity),
            clusters=column(cluster) if cluster else None,
            reward_names=tuple(reward_cols),
            n_actions=n_actions,
            sources={
                "action": action,
                "propensity": propensity,
                **({"context": ", ".join(context_cols)} if context_cols else {}),
                **({"clusters": cluster} if cluster else {}),
            },
        )


@dataclass(frozen=True)
class GaussianPolicy:
    """a | x ~ N(μ(x), Σ) over log-space weights, optionally truncated to the box [low, high]^k.

    Density of the truncated normal:  π(a|x) = φ_Σ(a − μ(x)) · 1{low ≤ a ≤ high} / Z(μ(x)),
    Z(μ) = P_{a~N(μ,Σ)}(low ≤ a ≤ high) = Π_j [Φ((high_j − μ_j)/σ_j) − Φ((low_j − μ_j)/σ_j)] for a diagonal Σ,
    and the multivariate normal cdf over the box (scipy.stats.multivariate_normal.cdf with lower_limit)
    for a full Σ. ``mean`` is [n, k] (one row per logged context) or [k]; ``cov`` a [k] vector of standard
    deviations (diagonal) or a [k, k] covariance."""

    mean: np.ndarray
    cov: np.ndarray
    low: np.ndarray | float | None = None
    high: np.ndarray | float | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        mean = np.atleast_1d(np.asarray(self.mean, np.float64))
        put(self, "mean", mean)
        k = mean.shape[-1]
        cov = np.asarray(self.cov, np.float64)
        if cov.ndim == 0:
            cov = np.full(k, float(cov))
        if cov.shape not in ((k,), (k, k)):
            raise ValueError(f"cov has shape {cov.shape}; expected ({k},) standard deviations or ({k}, {k})")
        put(self, "cov", cov)
        for name in ("low", "high"):
            v = getattr(self, name)
            if v is not None:
                put(self, name, np.broadcast_to(np.asarray(v, np.float64), (k,)).copy())

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    @property
    def diagonal(self) -> bool:
        return self.cov.ndim == 1

    @property
    def truncated(self) -> bool:
        return self.low is not None or self.high is not None

    def _box(self) -> tuple[np.ndarray, np.ndarray]:
        low = self.low if self.low is not None else np.full(self.dim, -np.inf)
        high = self.high if self.high is not None else np.full(self.dim, np.inf)
        return low, high

    def box_probability(self) -> np.ndarray:
        """Z(μ(x)) per row [n] (1 when untruncated)."""
        mean = self.mean.reshape(-1, self.dim)
        if not self.truncated:
            return np.ones(len(mean))
        from scipy import stats  # noqa: PLC0415  (SciPy on first use: serving replicas import this module)

        low, high = self._box()
        if self.diagonal:
            z = stats.norm.cdf((high - mean) / self.cov) - stats.norm.cdf((low - mean) / self.cov)
            return z.prod(axis=1)
        # Genz's randomised quasi-Monte Carlo, with a fixed generator so the same μ always gives the same Z
        # (a logged density is recomputed later and must match) and a tolerance 100× tighter than scipy's
        mvn = stats.multivariate_normal(np.zeros(self.dim), self.cov, abseps=1e-7, releps=1e-7)
        z = mvn.cdf(high - mean, lower_limit=low - mean, rng=np.random.default_rng(0))
        return np.atleast_1d(z).reshape(len(mean))

    def log_density(self, action: np.ndarray) -> np.ndarray:
        """log π(a_i|x_i) per row [n] (−inf outside the box)."""
        action = np.asarray(action, np.float64)
        if action.shape[-1] != self.dim:
            raise ValueError(f"column 'action' row 0: action has dimension {action.shape[-1]}, policy has {self.dim}")
        from scipy import stats  # noqa: PLC0415  (SciPy on first use: serving replicas import this module)

        u = action - self.mean
        if self.diagonal:
            logpdf = stats.norm.logpdf(u / self.cov).sum(-1) - np.log(self.cov).sum()
        else:
            logpdf = stats.multivariate_normal(np.zeros(self.dim), self.cov).logpdf(u)
        logpdf = np.atleast_1d(logpdf)
        if self.truncated:
            low, high = self._box()
            inside = np.all((action >= low) & (action <= high), axis=-1)
            logpdf = np.where(inside, logpdf - np.log(self.box_probability()), -np.inf)
        return logpdf

    def density(self, action: np.ndarray) -> np.ndarray:
        return np.exp(self.log_density(action))

    def sample(self, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
        """Draw one action per row of ``mean`` (or ``n`` draws of a [k] mean); truncation by
        vectorised rejection (redraw only the rows outside the box)."""
        mean = self.mean if n is None else np.broadcast_to(self.mean, (n, self.dim))
        chol = np.diag(self.cov) if self.diagonal else np.linalg.cholesky(self.cov)
        out = mean + rng.standard_normal(mean.shape) @ chol.T
        if self.truncated:
            low, high = self._box()
            for _ in range(1000):  # rejection rounds, not rows
                outside = ~np.all((out >= low) & (out <= high), axis=-1)
                if not outside.any():
                    break
                out[outside] = mean[outside] + rng.standard_normal((int(outside.sum()), self.dim)) @ chol.T
            else:  # pragma: no cover
                raise RuntimeError("box holds too little of the Gaussian's mass to sample by rejection")
        return out


@dataclass(frozen=True)
class LoggedDensity:
    """A target policy known only through its log density at the logged actions, row by row: log π(a_i|x_i)
    [n] (shadow mode logs it per request: the candidate's density of the served weights). It evaluates on
    exactly the rows it was logged for, in their order."""

    log_densities: np.ndarray
    dim: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_densities", np.asarray(self.log_densities, np.float64).reshape(-1))

    def log_density(self, action: np.ndarray) -> np.ndarray:
        if len(action) != len(self.log_densities):
            raise ValueError(
                f"a LoggedDensity holds {len(self.log_densities)} rows' densities; the data has {len(action)} rows"
            )
        return self.log_densities
