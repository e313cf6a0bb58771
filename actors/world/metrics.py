"""Ranking metrics with exact ground truth, and the two summaries every measurement reports: a mean with its
t-interval, and the fraction of the gap to the oracle that a learner closed."""

from __future__ import annotations

import numpy as np


def dcg(gains: np.ndarray, k: int) -> np.ndarray:
    """DCG@k = Σ_{r=1..k} (2^g_r − 1) / log2(r + 1), over the last axis (graded relevance g)."""
    g = np.asarray(gains, np.float64)[..., :k]
    discounts = 1.0 / np.log2(np.arange(2, g.shape[-1] + 2))
    return ((2.0**g - 1.0) * discounts).sum(axis=-1)


def ndcg_at_k(served_relevance: np.ndarray, ideal_relevance: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k = DCG@k(served order) / DCG@k(ideal order); ideal = the best k grades available
    (sorted here, so any order may be passed). 0 where the ideal DCG is 0."""
    ideal = -np.sort(-np.asarray(ideal_relevance), axis=-1)
    idcg = dcg(ideal, k)
    return np.divide(dcg(served_relevance, k), idcg, out=np.zeros_like(idcg), where=idcg > 0)


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """(x̄, half-width of the Student-t interval): x̄ ± t_{(1+level)/2, n−1}·s/√n; NaN half-width for n < 2."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    from scipy import stats  # noqa: PLC0415  (SciPy on first use: every serving replica imports this module, ~1 s of CPU a process)

    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def gap_closed(start: float, final: float, oracle: float) -> float:
    """(final − start) / (oracle − start): the fraction of the gap to the oracle closed; NaN when there is no gap."""
    gap = oracle - start
    return float((final - start) / gap) if gap > 1e-12 else float("nan")
