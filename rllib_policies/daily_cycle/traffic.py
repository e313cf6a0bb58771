"""A simulated day of traffic through the real Serve apps: the world's users request slates over HTTP
(``POST /recommend``), the world responds to what was served, the feedback goes back (``POST /feedback``
with the signed ``served_record``, so any replica scores it). Serving logs the events (its telemetry sink);
this side only keeps what the world knows and serving cannot: who comes back, and when.

Each round asks for one slate per active session (``concurrency`` requests in flight), steps the world
once on the served slates, posts the feedback. Users whose session ends come back after the world's
return gap (1 day: next-day return, the KPI the sessioniser backfills).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import numpy as np

from actors.world import World


@dataclass(frozen=True)
class DayTraffic:
    """What one day's traffic did: requests, per-status failures, and the users coming back by day offset."""

    sessions: int
    requests: int
    failed: dict[int | str, int]
    returning: dict[int, list[int]]  # days from now → user ids
    wall_s: float


async def _post(http: httpx.AsyncClient, sem: asyncio.Semaphore, path: str, body: dict) -> dict | int | str:
    """The JSON reply, or the HTTP status (an int) / the transport error's name (a str) on failure."""
    async with sem:
        try:
            r = await http.post(path, json=body)
        except httpx.HTTPError as e:
            return type(e).__name__
    return r.json() if r.status_code == 200 else r.status_code


async def _run_day(world: World, url: str, users: np.ndarray, rng: np.random.Generator, concurrency: int):
    sessions = world.start_sessions(users)
    sem, failed, requests = asyncio.Semaphore(concurrency), {}, 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while sessions.active.any():
            active = np.flatnonzero(sessions.active)
            recs = await asyncio.gather(
                *(
                    _post(
                        http,
                        sem,
                        "/recommend",
                        {
                            "user_id": int(users[b]),
                            "history": [int(i) for i in sessions.history[b] if i >= 0],
                            "step": int(sessions.requests[b]),
                            "clicks": int(sessions.clicks[b]),
                        },
                    )
                    for b in active
                )
            )
            ok = [(b, r) for b, r in zip(active, recs) if isinstance(r, dict)]
            for r in recs:
                if not isinstance(r, dict):
                    failed[r] = failed.get(r, 0) + 1
            if not ok:  # serving is down for every active session: end them rather than spin
                sessions.active[active] = False
                break
            slate = np.zeros((sessions.size, len(ok[0][1]["slate"])), np.int64)
            for b, r in ok:
                slate[b] = r["slate"]
            served = np.zeros(sessions.size, bool)
            served[[b for b, _ in ok]] = True
            sessions.active &= served  # a session whose request failed ends there (the user left)
            resp = world.step(sessions, slate, rng)
            requests += len(ok)
            replies = await asyncio.gather(
                *(
                    _post(
                        http,
                        sem,
                        "/feedback",
                        {
                            "request_id": r["request_id"],
                            "served_record": r["served_record"],
                            "clicked": resp.clicked[b].tolist(),
                            "dwell_s": resp.dwell_s[b].tolist(),
                            "skipped": resp.skipped[b].tolist(),
                            "purchased": resp.purchased[b].tolist(),
                            "revenue": resp.revenue[b].tolist(),
                        },
                    )
                    for b, r in ok
                )
            )
            for r in replies:
                if not isinstance(r, dict):
                    failed[f"feedback {r}"] = failed.get(f"feedback {r}", 0) + 1
    returning: dict[int, list[int]] = {}
    if sessions.return_gap_days is not None:
        for gap in np.unique(sessions.return_gap_days):
            if 1 <= gap <= 7:
                returning[int(gap)] = users[sessions.return_gap_days == gap].tolist()
    return requests, failed, returning


def day_traffic(
    world: World, url: str, users: np.ndarray, rng: np.random.Generator, concurrency: int = 16
) -> DayTraffic:
    """One session per user in ``users`` through ``url``'s recommend app (module docstring)."""
    t0 = time.perf_counter()
    requests, failed, returning = asyncio.run(_run_day(world, url, users, rng, concurrency))
    return DayTraffic(len(users), requests, failed, returning, time.perf_counter() - t0)
