"""Ranking metrics with exact ground truth."""

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
