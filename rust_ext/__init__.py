"""Rust hot paths of the recommender. The inner reward, per served item:

    reward_i = clip(click_w·clicked_i + dwell_w·ln(1 + dwell_i) + skip_penalty·skipped_i
                    + rel_w·relevance_i, clip_lo, clip_hi)

``inner_reward`` scores one slate (or any flat batch); ``inner_reward_slates`` scores many
CSR-packed slates in one call and also returns each slate's total. Both read bool/uint8 and
float32 NumPy arrays in place (no copy), release the GIL on large batches, and split batches of
``PARALLEL_MIN_ITEMS`` or more across threads. Other inputs (lists, float64, pyarrow arrays)
are converted first. Bad values raise ``ValueError`` naming the field and index.
"""

from __future__ import annotations

import numpy as np

from . import _native
from ._coerce import as_f32, as_flags, as_offsets
from ._native import GIL_RELEASE_MIN_ITEMS, PARALLEL_MIN_ITEMS, RewardWeights, ln_1p_f32
from .reference import inner_reward_numpy, inner_reward_slates_numpy

__all__ = [
    "RewardWeights",
    "inner_reward",
    "inner_reward_slates",
    "inner_reward_numpy",
    "inner_reward_slates_numpy",
    "ln_1p_f32",
    "PARALLEL_MIN_ITEMS",
    "GIL_RELEASE_MIN_ITEMS",
]


def inner_reward(clicked, dwell, skipped, relevance, weights: RewardWeights | None = None, out=None) -> np.ndarray:
    """Per-item inner reward (float32 array; written into ``out`` when given)."""
    try:
        return _native.inner_reward(clicked, dwell, skipped, relevance, weights, out)
    except TypeError:
        if weights is not None and not isinstance(weights, RewardWeights):
            raise TypeError(f"weights: expected RewardWeights, got {type(weights).__name__}") from None
    return _native.inner_reward(
        as_flags(clicked, "clicked"),
        as_f32(dwell, "dwell"),
        as_flags(skipped, "skipped"),
        as_f32(relevance, "relevance"),
        weights,
        out,
    )


def inner_reward_slates(offsets, clicked, dwell, skipped, relevance, weights: RewardWeights | None = None):
    """(per-item rewards, per-slate totals) for slates packed CSR-style: slate j is
    items offsets[j]:offsets[j+1]."""
    try:
        return _native.inner_reward_slates(offsets, clicked, dwell, skipped, relevance, weights)
    except TypeError:
        if weights is not None and not isinstance(weights, RewardWeights):
            raise TypeError(f"weights: expected RewardWeights, got {type(weights).__name__}") from None
    clicked = as_flags(clicked, "clicked")
    return _native.inner_reward_slates(
        as_offsets(offsets),
        clicked,
        as_f32(dwell, "dwell"),
        as_flags(skipped, "skipped"),
        as_f32(relevance, "relevance"),
        weights,
    )
