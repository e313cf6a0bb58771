"""A live A/B split: users assigned to named arms by a salted hash, each arm a versioned policy.

Assignment is sticky and stateless: arm(u) = the arm whose share interval holds ``user_uniform(u, salt)``
(actors.world.user_uniform, splitmix64 of the id), so every replica, restarted or not, puts a user in
the same arm for as long as the salt and the shares stay. Each arm's ranking weights live in their own
``VersionedParamStore`` (``{store_prefix}_arm_{name}``): a promotion is a versioned hot update of one
arm, a rollback restores the arm's previous version. An arm's ``policy`` says where its requests' weights
come from: ``"weights"`` (the arm's held weights), ``"utility_agent"`` (the agent's choice at the live
operating point), ``"outer_controller"`` (its published policy μ(s), actors.served_policies) or ``"crm"``
(the published CRM weight policy, a Gaussian-logged draw around exp(m(x))).

Per-arm KPIs come from the logged events (one row per served item, ``arm`` column): per request the
clicks, long views (clicked and watched ≥ LONG_VIEW_S), purchases, revenue and inner reward; per arm
their mean with a 95 % interval clustered by user (rllib_policies.ope.intervals.Normal: a user's
requests are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.stages import LONG_VIEW_S, RANKING_PARAMS
from actors.world import user_uniform
from rllib_policies.ope.intervals import clustered_means

POLICIES = ("weights", "utility_agent", "outer_controller", "crm")
REQUEST_KPIS = ("clicks", "long_views", "purchases", "revenue", "inner_reward")


@dataclass(frozen=True)
class Arm:
    """One arm: its share of users, where its weights come from, and its initial weights."""

    name: str
    share: float
    policy: str = "weights"
    weights: tuple[float, float, float] = (1.0, 1.0, 10.0)


@dataclass(frozen=True)
class ArmSplit:
    """Users → arms by ``user_uniform(user_id, salt)`` against the arms' cumulative shares.

    Args:
        name: the experiment's name (reported, and the salt unless ``salt`` is given).
        arms: the arms in order; their shares sum to 1.
        salt: a new salt reshuffles every user (a new experiment on the same users).
    """

    name: str
    arms: tuple[Arm, ...]
    salt: str

    @classmethod
    def from_config(cls, config: dict) -> ArmSplit:
        """{"name": str, "salt": str (default: name), "arms": {name: {"share": float, "policy": "weights" |
        "utility_agent" | "outer_controller" | "crm", "weights": [w_click, w_long_view, w_purchase]}}};
        ValueError naming the field."""
        cfg = dict(config)
        unknown = set(cfg) - {"name", "salt", "arms"}
        if unknown:
            raise ValueError(f"unknown experiment options: {sorted(unknown)}")
        name = cfg.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"experiment.name must be a non-empty string, got {name!r}")
        arms_cfg = cfg.get("arms")
        if not isinstance(arms_cfg, dict) or len(arms_cfg) < 1:
            raise ValueError("experiment.arms must map at least one arm name to {share, policy, weights}")
        arms = []
        for arm_name, arm in arms_cfg.items():
            where = f"experiment.arms.{arm_name}"
            unknown = set(arm) - {"share", "policy", "weights"}
            if unknown:
                raise ValueError(f"unknown {where} options: {sorted(unknown)}")
            share = arm.get("share")
            if not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(f"{where}.share must be a number in (0, 1], got {share!r}")
            policy = arm.get("policy", "weights")
            if policy not in POLICIES:
                raise ValueError(f"{where}.policy must be one of {list(POLICIES)}, got {policy!r}")
            weights = tuple(float(w) for w in arm.get("weights", Arm.weights))
            if len(weights) != 3 or not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"{where}.weights must be 3 finite weights >= 0, not all 0, got {weights!r}")
            arms.append(Arm(str(arm_name), float(share), policy, weights))
        total = sum(a.share for a in arms)
        if not np.isclose(total, 1.0, atol=1e-9):
            raise ValueError(f"experiment.arms shares must sum to 1, got {total:g}")
        return cls(name, tuple(arms), str(cfg.get("salt", name)))

    @property
    def by_name(self) -> MappingProxyType:
        return MappingProxyType({a.name: a for a in self.arms})

    def arm_id(self, arm: Arm) -> str:
        """What events log as ``arm``: "<experiment>/<arm>", so a later experiment's arms never pool with it."""
        return f"{self.name}/{arm.name}"

    def assign(self, user_ids: np.ndarray) -> np.ndarray:
        """Arm index per user id (vectorised)."""
        edges = np.cumsum([a.share for a in self.arms])
        edges[-1] = np.inf  # shares summing to 1 − ε never leave a user without an arm
        return np.searchsorted(edges, user_uniform(np.asarray(user_ids), self.salt), side="right")


def arm_weights_params(weights) -> dict[str, float]:
    """An arm store's params: the ranking weights by name."""
    return dict(zip(RANKING_PARAMS, map(float, weights)))


def request_kpis(events: pa.Table) -> pa.Table:
    """One row per logged request: arm, arm_version, user_id and the REQUEST_KPIS summed over its slate."""
    clicked = pc.fill_null(events["clicked"], False)
    long_view = pc.and_(clicked, pc.greater_equal(pc.fill_null(events["dwell_s"], 0.0), LONG_VIEW_S))
    table = pa.table(
        {
            "request_id": events["request_id"],
            "arm": events["arm"],
            "arm_version": events["arm_version"],
            "user_id": events["user_id"],
            "clicks": pc.cast(clicked, pa.int64()),
            "long_views": pc.cast(long_view, pa.int64()),
            "purchases": pc.cast(pc.fill_null(events["purchased"], False), pa.int64()),
            "revenue": pc.fill_null(events["revenue"], 0.0),
            "inner_reward": pc.fill_null(events["inner_reward"], 0.0),
        }
    )
    out = table.group_by(["request_id", "arm", "arm_version", "user_id"]).aggregate([(k, "sum") for k in REQUEST_KPIS])
    return out.rename_columns([c.removesuffix("_sum") for c in out.column_names])


def _finite(x: float) -> float | None:
    """JSON has no NaN: an interval that cannot be computed (fewer than two users) is null."""
    return float(x) if np.isfinite(x) else None


def arm_report(
    events: pa.Table, split: ArmSplit, versions: dict[str, int | None] | None = None, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Per arm of ``split`` with logged requests: requests, users and each KPI's {"mean", "low", "high"}
    (interval clustered by user). ``versions``: arm → the version to report (None or absent: all versions),
    so a promotion's KPIs are not pooled with its predecessor's."""
    versions = versions or {}
    per_request = request_kpis(events.filter(pc.is_valid(events["arm"])))
    report = {}
    for arm in split.arms:
        keep = pc.equal(per_request["arm"], split.arm_id(arm))
        if versions.get(arm.name) is not None:
            keep = pc.and_(keep, pc.equal(per_request["arm_version"], versions[arm.name]))
        rows = per_request.filter(keep)
        if rows.num_rows == 0:
            continue
        values = np.stack([rows[k].to_numpy().astype(np.float64) for k in REQUEST_KPIS], axis=1)  # [n, K]
        users = rows["user_id"].to_numpy()
        mean, low, high = clustered_means(values, users, level)
        report[arm.name] = {
            "requests": len(values),
            "users": int(len(np.unique(users))),
            "kpis": {
                k: {"mean": _finite(m), "low": _finite(lo), "high": _finite(hi)}
                for k, m, lo, hi in zip(REQUEST_KPIS, mean, low, high)
            },
        }
    return report
