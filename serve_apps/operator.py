"""The operator's page of the recommend app: the frontier, the live operating point, the A/B arms, the daily
cycle's promotions, rejections and rollbacks, and the inner-reward weights in force, from one JSON document
(``GET /operator/state``) drawn by a static page shipped in the package (``operator_page/``: no CDN, no build
step). The same figures are Prometheus gauges through Ray's metrics API (``OperatorMetrics``), exported by
every node's metrics agent as ``ray_morl_*``.

Changes go through the app's versioned endpoints, never through the page's own state: a switch names the version
it was made against (a stale one answers 409) and who made it; the parameter stores keep the audit log.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rllib_policies import storage

PAGE_DIR = Path(__file__).with_name("operator_page")
ASSETS = {"operator.js": "text/javascript", "operator.css": "text/css"}  # what /operator/assets/{name} serves
DAY_FILE = re.compile(r"day_(\d{3,})\.json$")
_DAYS: dict[str, dict[str, Any]] = {}  # day record path → its summary (a record is never rewritten)


def page() -> str:
    return (PAGE_DIR / "index.html").read_text()


def asset(name: str) -> tuple[bytes, str] | None:
    """(bytes, media type) of one of the page's files, or None for any other name (never a path walk)."""
    if name not in ASSETS:
        return None
    return (PAGE_DIR / name).read_bytes(), ASSETS[name]


def cycle_timeline(root: str | None, limit: int = 365) -> dict[str, Any] | None:
    """The daily cycle's day records under ``root`` (``days/day_NNN.json``, as ``DailyCycle`` writes them),
    oldest first, each cut to what an operator reads: the candidate's fate (promoted, rejected and why, in
    shadow, training failed), the live monitor (KL, breach, rollback) and each arm's objective with its
    interval. None when no cycle root is configured; an unreadable record is listed as such, never fatal.
    A day's record is written once, when the day ends: each is read once per process (``_DAYS``)."""
    if not root:
        return None
    days_dir = storage.join(root, "days")
    names = storage.list_dir(days_dir) if storage.exists(days_dir) else []
    found = sorted((int(m.group(1)), n) for n in names if (m := DAY_FILE.search(n)))  # by day: day_1000 after 999
    days = []
    for day, name in found[-limit:]:
        path = storage.join(days_dir, name)
        if path not in _DAYS:
            try:
                _DAYS[path] = storage.json_safe(day_summary(storage.read_json(path)))
            except Exception as e:  # corrupt, half-copied, not a record: listed, and read again next time
                days.append({"day": day, "unreadable": f"{type(e).__name__}: {e}"})
                continue
        days.append(_DAYS[path])
    counts = {"promotions": 0, "rejections": 0, "rollbacks": 0, "training_failures": 0}
    for d in days:
        status, shadow = d.get("status"), d.get("shadow_status")
        counts["promotions"] += (status == "promoted") + (shadow == "promoted after shadow")
        counts["rejections"] += (status == "rejected") + (shadow == "rejected in shadow")
        counts["rollbacks"] += d.get("rolled_back_to") is not None
        counts["training_failures"] += status == "training failed"
    return {"root": root, "days": days, "counts": counts}


def day_summary(record: dict[str, Any]) -> dict[str, Any]:
    cand, mon = record.get("candidate") or {}, record.get("monitor") or {}
    gate = cand.get("gate") or {}
    failed = [f"{k}: {c.get('why')}" for k, c in (gate.get("checks") or {}).items() if not c.get("ok")]
    return {
        "day": record.get("day"),
        "status": cand.get("status"),
        "error": cand.get("error"),
        "candidate": cand.get("candidate"),
        "gate_failed": failed,
        "kl": mon.get("kl"),
        "breach": bool(mon.get("breach")),
        "why": mon.get("why") or [],
        "rolled_back_to": mon.get("rolled_back_to"),
        "shadow_status": (record.get("shadow") or {}).get("status"),
        "live": record.get("live"),
        "requests": (record.get("traffic") or {}).get("requests"),
        "arms": {
            arm: {"requests": a.get("requests"), "objective": a.get("objective")}
            for arm, a in (record.get("arms") or {}).items()
        },
        "injected": record.get("injected") or [],
    }


class OperatorMetrics:
    """The page's figures as Prometheus gauges (``ray.util.metrics``; Ray prefixes ``ray_``), refreshed from
    ``collect`` (the app's ``operator_state``) every ``interval_s`` on a daemon thread of the replica, and on every
    page load. Every replica exports its own series (tag ``WorkerId``): aggregate with max or avg."""

    def __init__(self, app: str, collect: Callable[[], dict[str, Any]], interval_s: float = 15.0):
        from ray.util.metrics import Gauge  # noqa: PLC0415  only inside a Ray worker

        def gauge(name: str, description: str, *tags: str) -> Gauge:  # Ray takes ASCII descriptions only
            return Gauge(f"morl_{name}", description=description, tag_keys=("app", *tags))

        self.app, self.collect, self.interval_s = app, collect, interval_s
        self.g = {
            "operating_point_lambda": gauge(
                "operating_point_lambda", "the live operating point's lambda (NaN: fixed weights)"
            ),
            "operating_point_version": gauge("operating_point_version", "the operating point's store version"),
            "frontier_version": gauge("frontier_version", "the served frontier artifact's version"),
            "arm_share": gauge("arm_share", "an A/B arm's traffic share", "arm"),
            "arm_version": gauge("arm_version", "an A/B arm's served version", "arm"),
            "arm_weight": gauge("arm_weight", "an A/B arm's ranking weight", "arm", "name"),
            "arm_objective": gauge(
                "arm_objective", "an arm's objective per request, the cycle's last day", "arm", "bound"
            ),
            "inner_reward_weight": gauge("inner_reward_weight", "the inner reward's weight in force", "name"),
            "inner_reward_version": gauge("inner_reward_version", "the inner reward weights' version"),
            "cycle_day": gauge("cycle_day", "the daily cycle's last finished day"),
            "cycle_events": gauge("cycle_events", "the daily cycle's promotions, rejections, rollbacks", "event"),
            "cycle_kl": gauge("cycle_monitor_kl", "KL(promoted || served) of the treatment arm on the last day"),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="operator-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update(self.collect())
            except Exception:  # a store restarting, the inner-reward app redeploying: the next round retries
                pass

    def stop(self) -> None:
        self._stop.set()

    def _set(self, gauge: str, value: Any, **tags: str) -> None:
        if value is None:
            return
        value = float(value)
        if math.isfinite(value) or gauge == "operating_point_lambda":
            self.g[gauge].set(value, tags={"app": self.app, **tags})

    def update(self, state: dict[str, Any]) -> None:
        op = state.get("operating_point") or {}
        if op:
            self._set("operating_point_version", op.get("version"))
            self._set("operating_point_lambda", math.nan if op.get("lambda") is None else op["lambda"])
        self._set("frontier_version", (state.get("frontier") or {}).get("version"))
        for arm, a in ((state.get("experiment") or {}).get("arms") or {}).items():
            self._set("arm_share", a.get("share"), arm=arm)
            self._set("arm_version", a.get("version"), arm=arm)
            for name, w in zip(("click", "long_view", "purchase"), a.get("weights") or []):
                self._set("arm_weight", w, arm=arm, name=name)
        inner = state.get("inner_reward") or {}
        self._set("inner_reward_version", inner.get("version"))
        for name, w in (inner.get("weights") or {}).items():
            self._set("inner_reward_weight", w, name=name)
        cycle = state.get("cycle") or {}
        days = [d for d in cycle.get("days") or [] if "unreadable" not in d]
        if days:
            last = days[-1]
            self._set("cycle_day", last["day"])
            self._set("cycle_kl", last.get("kl"))
            for arm, a in last["arms"].items():
                for bound in ("mean", "low", "high"):
                    self._set("arm_objective", (a.get("objective") or {}).get(bound), arm=arm, bound=bound)
        for event, n in (cycle.get("counts") or {}).items():
            self._set("cycle_events", n, event=event)
