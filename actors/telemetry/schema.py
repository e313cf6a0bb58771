"""The served-item event: one pyarrow schema shared by producers, buffer, sinks and sessioniser.

``event_id`` is 16 bytes: the request's 64-bit uid then the item's position (both little-endian),
unique per served item and cheap to build for a whole slate at once.

``context`` is the request's observation as the policy saw it (feature logging), so learners
train on exactly what was served from and never rebuild features offline. It is stored once per
request, on position 0 (null elsewhere, and when not logged).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

N_UTILITY_WEIGHTS = 3

EVENT_SCHEMA = pa.schema([
    pa.field("event_id", pa.binary(16), nullable=False),
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("session_id", pa.string()),            # client's session id if any; the sessioniser assigns its own
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("position", pa.int16(), nullable=False),
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("policy_version", pa.int32()),
    pa.field("utility_weights", pa.list_(pa.float32(), N_UTILITY_WEIGHTS)),
    pa.field("propensity", pa.float32()),
    pa.field("p_click", pa.float32()),
    pa.field("p_long_view", pa.float32()),
    pa.field("p_purchase", pa.float32()),
    pa.field("relevance", pa.float32()),
    pa.field("clicked", pa.bool_()),
    pa.field("dwell_s", pa.float32()),
    pa.field("skipped", pa.bool_()),
    pa.field("purchased", pa.bool_()),
    pa.field("revenue", pa.float32()),
    pa.field("inner_reward", pa.float32()),
    pa.field("context", pa.list_(pa.float32())),
])


def event_ids(request_uids: np.ndarray, positions: np.ndarray) -> pa.Array:
    """16-byte ids: uint64 request uid ‖ uint64 position, little-endian, one per row."""
    raw = np.empty((len(positions), 2), "<u8")
    raw[:, 0] = request_uids
    raw[:, 1] = positions
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(positions), [None, pa.py_buffer(raw.tobytes())])


def slate_events(*, request_uid: int, ts_us: int, user_id: int, items: np.ndarray, clicked: np.ndarray,
                 dwell_s: np.ndarray, skipped: np.ndarray, inner_reward: np.ndarray, predictions: dict[str, np.ndarray],
                 utility_weights: np.ndarray | None = None, policy_version: int = 0, propensity: float = 1.0,
                 purchased: np.ndarray | None = None, revenue: np.ndarray | None = None,
                 session_id: str | None = None, context: np.ndarray | None = None) -> pa.RecordBatch:
    """The events of one served slate with its feedback, as one RecordBatch (vectorised)."""
    n = len(items)
    pos = np.arange(n, dtype=np.int16)
    weights = np.zeros(N_UTILITY_WEIGHTS, np.float32) if utility_weights is None else np.asarray(utility_weights, np.float32)
    f32 = lambda a: pa.array(np.asarray(a, np.float32))  # noqa: E731
    cols = {
        "event_id": event_ids(np.full(n, request_uid, np.uint64), pos.astype(np.uint64)),
        "ts": pa.array(np.full(n, ts_us, np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "user_id": pa.array(np.full(n, user_id, np.int64)),
        "session_id": pa.array([session_id] * n, pa.string()),
        "request_id": pa.array([f"{request_uid:016x}"] * n, pa.string()),
        "position": pa.array(pos),
        "item_id": pa.array(np.asarray(items, np.int64)),
        "policy_version": pa.array(np.full(n, policy_version, np.int32)),
        "utility_weights": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(weights, n)), N_UTILITY_WEIGHTS),
        "propensity": f32(np.full(n, propensity)),
        "p_click": f32(predictions["p_click"]),
        "p_long_view": f32(predictions.get("p_long_view", np.zeros(n))),
        "p_purchase": f32(predictions.get("p_purchase", np.zeros(n))),
        "relevance": f32(predictions["p_click"]),
        "clicked": pa.array(np.asarray(clicked, bool)),
        "dwell_s": f32(dwell_s),
        "skipped": pa.array(np.asarray(skipped, bool)),
        "purchased": pa.array(np.zeros(n, bool) if purchased is None else np.asarray(purchased, bool)),
        "revenue": f32(np.zeros(n) if revenue is None else revenue),
        "inner_reward": f32(inner_reward),
        "context": (pa.nulls(n, pa.list_(pa.float32())) if context is None or n == 0 else   # on position 0 only
                    pa.ListArray.from_arrays(pa.array(np.r_[0, np.full(n, len(context))].astype(np.int32)),
                                             pa.array(np.asarray(context, np.float32)),
                                             mask=pa.array(np.arange(n) > 0))),
    }
    return pa.RecordBatch.from_arrays(list(cols.values()), schema=EVENT_SCHEMA)


def dedupe(events: pa.Table) -> pa.Table:
    """Keep the first row of each event_id (sinks deliver at least once)."""
    if events.num_rows == 0:
        return events
    ids = np.frombuffer(events["event_id"].combine_chunks().buffers()[1], dtype="V16",
                        count=events.num_rows, offset=events["event_id"].combine_chunks().offset * 16)
    _, first = np.unique(ids, return_index=True)
    if len(first) == events.num_rows:
        return events
    return events.take(pa.array(np.sort(first)))
