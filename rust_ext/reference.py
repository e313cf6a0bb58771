"""NumPy reference for the inner reward: the specification the Rust kernel is tested against.

reward_i = clip(click_w·clicked_i + dwell_w·ln(1 + dwell_i) + skip_penalty·skipped_i
                + rel_w·relevance_i, clip_lo, clip_hi)

Computed in float64 (the exact answer the float32 kernel approximates) with the same input
checks and error messages as the kernel.
"""

from __future__ import annotations

import numpy as np

from ._coerce import as_f32, as_flags, as_offsets
from ._native import RewardWeights

F32_MAX = float(np.finfo(np.float32).max)


def _first_bad(values: np.ndarray, ok: np.ndarray, field: str, rule: str) -> None:
    if not ok.all():
        i = int(np.argmin(ok))
        raise ValueError(f"{field}[{i}] = {values[i]}: {rule}")


def inner_reward_numpy(clicked, dwell, skipped, relevance, weights: RewardWeights | None = None) -> np.ndarray:
    """The inner reward of every item, float32, exactly as the kernel specifies it."""
    w = weights if weights is not None else RewardWeights()
    c, s = as_flags(clicked, "clicked"), as_flags(skipped, "skipped")
    d, r = as_f32(dwell, "dwell"), as_f32(relevance, "relevance")
    for name, arr in (("dwell", d), ("skipped", s), ("relevance", r)):
        if len(arr) != len(c):
            raise ValueError(f"length mismatch: clicked has {len(c)} items but {name} has {len(arr)}")
    with np.errstate(invalid="ignore"):
        _first_bad(d, (d >= 0) & (d <= F32_MAX), "dwell", "dwell seconds must be finite and >= 0")
        _first_bad(r, np.abs(r) <= F32_MAX, "relevance", "relevance must be finite")
    reward = (
        w.click_w * c + w.dwell_w * np.log1p(d.astype(np.float64)) + w.skip_penalty * s + w.rel_w * r.astype(np.float64)
    )
    return np.clip(reward, w.clip_lo, w.clip_hi).astype(np.float32)


def inner_reward_slates_numpy(offsets, clicked, dwell, skipped, relevance, weights=None):
    """(per-item rewards, per-slate totals) for CSR-packed slates."""
    rewards = inner_reward_numpy(clicked, dwell, skipped, relevance, weights)
    offs = as_offsets(offsets)
    if len(offs) == 0 or offs[0] != 0 or np.any(np.diff(offs) < 0) or offs[-1] != len(rewards):
        raise ValueError(f"offsets: not a valid CSR offset array for {len(rewards)} items")
    cumulative = np.concatenate([[0.0], np.cumsum(rewards, dtype=np.float64)])
    totals = cumulative[offs[1:]] - cumulative[offs[:-1]]
    return rewards, totals.astype(np.float32)
