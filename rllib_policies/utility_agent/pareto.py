"""Pareto sweeping: π_λ for λ on a grid, the non-dominated set, hypervolume, and the versioned
frontier artifact (JSON + PNG) that operators pick the live operating point from."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from rllib_policies import storage

from .exploration import OBJECTIVES


def lambda_grid(n: int = 25) -> np.ndarray:
    """n evenly spaced λ in [0, 1] (PRL-PUTS sweeps 25)."""
    if n < 2:
        raise ValueError(f"a λ sweep needs at least 2 points, got {n}")
    return np.linspace(0.0, 1.0, n)


def sweep_actions(scores: np.ndarray, lambdas: np.ndarray, allowed=None) -> np.ndarray:
    """π_λ(s) = argmax_{a ∈ allowed} λ·Q̃₁(s, a) + (1 − λ)·Q̃₂(s, a) for every λ: scores [N, A, 2]
    (common scale) → actions [L, N]; ``allowed``: action indices (all by default)."""
    lam = np.asarray(lambdas, np.float64)[:, None, None]
    values = lam * scores[None, ..., 0] + (1 - lam) * scores[None, ..., 1]
    if allowed is None:
        return values.argmax(axis=-1)
    mask = np.full(values.shape[-1], -np.inf)
    mask[np.asarray(allowed, np.int64)] = 0.0
    return (values + mask).argmax(axis=-1)


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the points [M, 2] no other point dominates (≥ on both objectives, > on one)."""
    p = np.asarray(points, np.float64)
    ge = (p[None, :, :] >= p[:, None, :]).all(-1)  # [i, j]: j ≥ i everywhere
    gt = (p[None, :, :] > p[:, None, :]).any(-1)
    dominated = (ge & gt).any(axis=1)
    return ~dominated & np.isfinite(p).all(axis=1)


def hypervolume_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by the points [M, 2] and bounded below by ``ref`` (both objectives maximised):
    sweep the non-dominated points by the first objective, descending, adding
    (x_i − ref_x)·(y_i − y_prev) for each rise in the second."""
    p = np.asarray(points, np.float64)
    p = p[non_dominated(p) & (p > np.asarray(ref)).all(axis=1)]
    if len(p) == 0:
        return 0.0
    p = p[np.argsort(-p[:, 0])]
    area, y_prev = 0.0, float(ref[1])
    for x, y in p:
        if y > y_prev:
            area += (x - ref[0]) * (y - y_prev)
            y_prev = y
    return float(area)


def write_frontier(path: str, points: list[dict], meta: dict) -> dict:
    """Write the versioned frontier artifact: {"version", "created", "objectives", "meta", "points"};
    ``points`` are per-λ dicts (lambda, both objectives with CIs, ess, action distribution, cohorts,
    non_dominated). The version is the previous file's + 1. Atomic replace."""
    version = 1
    if os.path.exists(path):
        try:
            with open(path) as f:
                version = int(json.load(f).get("version", 0)) + 1
        except (OSError, ValueError):
            pass
    artifact = {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "objectives": list(OBJECTIVES),
        "meta": meta,
        "points": points,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:  # strict JSON: NaN (no estimate) is written as null
        json.dump(storage.json_safe(artifact), f, indent=1, default=_json_default, allow_nan=False)
    os.replace(tmp, path)
    return artifact


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plot_frontier(path: str, series: dict[str, dict], title: str) -> None:
    """Scatter + line per series {name: {"x", "y", "xerr", "yerr", "labels"?}} (x = clicks,
    y = long views per request)."""
    import matplotlib  # noqa: PLC0415 - optional dependency: callers skip the plots without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the headless backend

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, s in series.items():
        x, y = np.asarray(s["x"]), np.asarray(s["y"])
        order = np.argsort(x)
        ax.errorbar(
            x[order],
            y[order],
            xerr=np.asarray(s.get("xerr", np.zeros_like(x)))[order],
            yerr=np.asarray(s.get("yerr", np.zeros_like(y)))[order],
            fmt=s.get("fmt", "o-"),
            ms=4,
            capsize=2,
            lw=1,
            alpha=0.85,
            label=name,
        )
        for lbl, xi, yi in zip(s.get("labels", []), x, y):
            ax.annotate(lbl, (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("clicks per request (engagement head)")
    ax.set_ylabel("long views (≥ 18 s) per request")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cohort_frontiers(path: str, artifact: dict, key: str = "off_policy") -> None:
    """One panel per user cohort: π_λ's per-cohort values (``key``: off_policy or simulator) along λ."""
    import matplotlib  # noqa: PLC0415 - optional dependency: callers skip the plots without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the headless backend

    cohorts = sorted({c for p in artifact["points"] for c in p.get(key, {}).get("cohorts", {})})
    if not cohorts:
        return
    fig, axes = plt.subplots(1, len(cohorts), figsize=(5 * len(cohorts), 4), squeeze=False)
    for ax, cohort in zip(axes[0], cohorts):
        pts = [
            (p["lambda"], p[key]["cohorts"][cohort]) for p in artifact["points"] if cohort in p[key].get("cohorts", {})
        ]
        x = np.array([np.nan if v.get("clicks") is None else v["clicks"] for _, v in pts], float)
        y = np.array([np.nan if v.get("long_views") is None else v["long_views"] for _, v in pts], float)
        sc = ax.scatter(x, y, c=[lam for lam, _ in pts], cmap="viridis", s=18)
        ax.plot(x, y, lw=0.6, alpha=0.5)
        ax.set_title(f"cohort {cohort}", fontsize=10)
        ax.set_xlabel("clicks per request")
        ax.set_ylabel("long views per request")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(wspace=0.35, left=0.06, right=0.86, bottom=0.14)
    fig.colorbar(sc, ax=axes[0].tolist(), label="λ")
    fig.suptitle(f"π_λ per user cohort ({key.replace('_', '-')})", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
