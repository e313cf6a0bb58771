"""Synthetic served-item event streams for the telemetry tests."""

import time

import numpy as np
import pyarrow as pa

from actors.telemetry import slate_events

T0_US = 1_700_000_000_000_000


def make_requests(n_requests: int, slate: int = 10, n_users: int = 50, seed: int = 0, step_s: float = 60.0):
    """n_requests slates of `slate` events: users round-robin, `step_s` apart per user."""
    rng = np.random.default_rng(seed)
    batches = []
    for r in range(n_requests):
        user = r % n_users
        clicked = rng.random(slate) < 0.1
        batches.append(
            slate_events(
                request_uid=seed * 10**9 + r + 1,
                ts_us=T0_US + int((r // n_users) * step_s * 1e6),
                user_id=user,
                items=rng.integers(0, 1000, slate),
                clicked=clicked,
                dwell_s=np.where(clicked, 10.0, 0.0),
                skipped=~clicked,
                inner_reward=rng.random(slate),
                predictions={"p_click": rng.random(slate)},
                utility_weights=np.array([1.0, 0.5, 10.0]),
                revenue=np.where(clicked, 2.0, 0.0),
            )
        )
    return batches


def request_at(user: int, uid: int, ts_s: float, reward: float = 1.0, slate: int = 2) -> pa.RecordBatch:
    """One request of `slate` unclicked items at T0 + ts_s, worth `reward` in total."""
    return slate_events(
        request_uid=uid,
        ts_us=T0_US + int(ts_s * 1e6),
        user_id=user,
        items=np.arange(slate),
        clicked=np.zeros(slate, bool),
        dwell_s=np.zeros(slate),
        skipped=np.ones(slate, bool),
        inner_reward=np.full(slate, reward / slate),
        predictions={"p_click": np.zeros(slate)},
    )


def wait_until(cond, timeout_s: float = 30.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
