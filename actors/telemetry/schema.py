"""The served-item event: one pyarrow schema shared by producers, buffer, sinks and sessioniser.

``event_id`` is 16 bytes: the request's 64-bit uid then the item's position (both little-endian),
unique per served item and cheap to build for a whole slate at once.

``context`` is the request's observation as the policy saw it (feature logging), so learners
train on exactly what was served from and never rebuild features offline. It is stored once per
request, on position 0 (null elsewhere, and when not logged).

``relevance`` is the inner reward's relevance term as it was scored: the retrieval towers'
similarity (1 + cos)/2 (``actors.stages.retrieval_relevance``), not the ranker's ``p_click``,
which keeps its own column.

``weight_mean`` and ``weight_log_density`` are Gaussian weight logging's record (Jeunen et al.): the
request's utility weights were drawn as log w ~ N(log μ, Σ) truncated to a box, ``weight_mean`` is μ
(weight units) and ``weight_log_density`` the log density of the served log w under that truncated
Gaussian — what an off-policy estimate divides by. Null when the weights were not drawn that way.

``arm`` and ``arm_version`` name the live A/B arm (serve_apps/experiments.py) and the version of the
arm's policy that served the request; null outside an experiment.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

N_UTILITY_WEIGHTS = 3

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.binary(16), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("session_id", pa.string()),  # client's session id if any; the sessioniser assigns its own
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("policy_version", pa.int32()),
        pa.field("arm", pa.string()),  # the A/B arm the user is assigned to (null outside an experiment)
        pa.field("arm_version", pa.int32()),  # the version of the arm's policy that served the request
        # who chose the request's ranking weights ("request", "held", "arm", "utility_agent", "outer_controller",
        # "crm", "stage_policy") and that policy's version (null for the request's own weights)
        pa.field("ranking_policy", pa.string()),
        pa.field("ranking_policy_version", pa.int32()),
        pa.field("utility_weights", pa.list_(pa.float32(), N_UTILITY_WEIGHTS)),
        pa.field("propensity", pa.float32()),
        pa.field("weight_mean", pa.list_(pa.float32(), N_UTILITY_WEIGHTS)),
        pa.field("weight_log_density", pa.float64()),
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
        # shadow mode: a candidate's would-be weights for this request (never served), the log density of the
        # served log w under the candidate's policy (what OPE needs), and the candidate's version
        pa.field("shadow_weights", pa.list_(pa.float32(), N_UTILITY_WEIGHTS)),
        pa.field("shadow_log_density", pa.float64()),
        pa.field("shadow_version", pa.int32()),
    ]
)


SHADOW_COLUMNS = ("shadow_weights", "shadow_log_density", "shadow_version")


def event_ids(request_uids: np.ndarray, positions: np.ndarray) -> pa.Array:
    """16-byte ids: uint64 request uid ‖ uint64 position, little-endian, one per row."""
    raw = np.empty((len(positions), 2), "<u8")
    raw[:, 0] = request_uids
    raw[:, 1] = positions
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(positions), [None, pa.py_buffer(raw.tobytes())])


def slate_events(
    *,
    request_uid: int,
    ts_us: int,
    user_id: int,
    items: np.ndarray,
    clicked: np.ndarray,
    dwell_s: np.ndarray,
    skipped: np.ndarray,
    inner_reward: np.ndarray,
    predictions: dict[str, np.ndarray],
    relevance: np.ndarray | None = None,
    utility_weights: np.ndarray | None = None,
    policy_version: int = 0,
    propensity: float = 1.0,
    purchased: np.ndarray | None = None,
    revenue: np.ndarray | None = None,
    session_id: str | None = None,
    context: np.ndarray | None = None,
    weight_mean: np.ndarray | None = None,
    weight_log_density: float | None = None,
    arm: str | None = None,
    arm_version: int | None = None,
    ranking_policy: str | None = None,
    ranking_policy_version: int | None = None,
    shadow: dict | None = None,
) -> pa.RecordBatch:
    """The events of one served slate with its feedback, as one RecordBatch (see ``slates_events``)."""
    row = lambda a: None if a is None else np.asarray(a)[None]  # noqa: E731
    return slates_events(
        request_uids=np.array([request_uid], np.uint64),
        ts_us=np.array([ts_us], np.int64),
        user_ids=np.array([user_id], np.int64),
        items=row(items),
        clicked=row(clicked),
        dwell_s=row(dwell_s),
        skipped=row(skipped),
        inner_reward=row(inner_reward),
        predictions={k: row(v) for k, v in predictions.items()},
        relevance=row(relevance),
        utility_weights=row(utility_weights),
        policy_version=policy_version,
        propensity=np.array([propensity]),
        purchased=row(purchased),
        revenue=row(revenue),
        session_ids=None if session_id is None else [session_id],
        context=row(context),
        weight_mean=row(weight_mean),
        weight_log_density=None if weight_log_density is None else np.array([weight_log_density]),
        arm=arm,
        arm_version=arm_version,
        ranking_policy=ranking_policy,
        ranking_policy_version=ranking_policy_version,
        shadow=None if shadow is None else {k: v if k == "version" else np.asarray(v)[None] for k, v in shadow.items()},
    )


def slates_events(
    *,
    request_uids: np.ndarray,
    ts_us: np.ndarray,
    user_ids: np.ndarray,
    items: np.ndarray,
    clicked: np.ndarray,
    dwell_s: np.ndarray,
    skipped: np.ndarray,
    inner_reward: np.ndarray,
    predictions: dict[str, np.ndarray],
    relevance: np.ndarray | None = None,
    utility_weights: np.ndarray | None = None,
    policy_version: int = 0,
    propensity: np.ndarray | float = 1.0,
    purchased: np.ndarray | None = None,
    revenue: np.ndarray | None = None,
    session_ids: list[str] | None = None,
    context: np.ndarray | None = None,
    weight_mean: np.ndarray | None = None,
    weight_log_density: np.ndarray | None = None,
    arm: str | None = None,
    arm_version: int | None = None,
    ranking_policy: str | None = None,
    ranking_policy_version: int | None = None,
    shadow: dict | None = None,
) -> pa.RecordBatch:
    """The events of B served slates of K items ([B] per-request and [B, K] per-item arrays; utility
    weights [B, 3], context [B, d]) as one RecordBatch of B·K rows, slate by slate (vectorised).
    ``relevance`` [B, K] is the inner reward's relevance term (``actors.stages.retrieval_relevance``,
    the two-tower similarity; null when not given), kept apart from the ranker's ``p_click``.
    ``weight_mean`` [B, 3] and ``weight_log_density`` [B]: Gaussian weight logging (null when not given).
    ``arm``, ``arm_version``: the A/B arm of all B requests (null when not given). ``ranking_policy``,
    ``ranking_policy_version``: who chose the B requests' ranking weights, and its version. ``shadow``:
    {"weights" [B, 3], "log_density" [B], "version"}: a shadow candidate's would-be weights and its density of
    the served weights."""
    items = np.asarray(items, np.int64)
    b, k = items.shape
    n = b * k
    per_request = lambda a, dt: np.repeat(np.asarray(a, dt).reshape(b), k)  # noqa: E731
    uids = per_request(request_uids, np.uint64)
    pos = np.tile(np.arange(k, dtype=np.int16), b)
    weights = (
        np.zeros((b, N_UTILITY_WEIGHTS), np.float32)
        if utility_weights is None
        else np.broadcast_to(np.asarray(utility_weights, np.float32), (b, N_UTILITY_WEIGHTS))
    )
    f32 = lambda a: pa.array(np.asarray(a, np.float32).ravel())  # noqa: E731
    zeros = np.zeros(n)
    if context is None or n == 0:
        context_col = pa.nulls(n, pa.list_(pa.float32()))
    else:  # on position 0 of each slate only
        ctx = np.asarray(context, np.float32).reshape(b, -1)
        lengths = np.where(pos == 0, ctx.shape[1], 0).astype(np.int32)
        context_col = pa.ListArray.from_arrays(
            pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)), pa.array(ctx.ravel()), mask=pa.array(pos > 0)
        )
    cols = {
        "event_id": event_ids(uids, pos.astype(np.uint64)),
        "ts": pa.array(per_request(ts_us, np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "user_id": pa.array(per_request(user_ids, np.int64)),
        "session_id": pa.array(
            [None] * n if session_ids is None else list(np.repeat(np.asarray(session_ids, object), k)), pa.string()
        ),
        "request_id": pa.array(np.char.mod("%016x", uids).tolist() if n else [], pa.string()),
        "position": pa.array(pos),
        "item_id": pa.array(items.ravel()),
        "policy_version": pa.array(np.full(n, policy_version, np.int32)),
        "arm": pa.array([arm] * n, pa.string()),
        "arm_version": pa.array([arm_version] * n, pa.int32()),
        "ranking_policy": pa.array([ranking_policy] * n, pa.string()),
        "ranking_policy_version": pa.array([ranking_policy_version] * n, pa.int32()),
        "utility_weights": pa.FixedSizeListArray.from_arrays(
            pa.array(np.repeat(weights, k, axis=0).ravel()), N_UTILITY_WEIGHTS
        ),
        "propensity": f32(per_request(np.broadcast_to(propensity, (b,)), np.float32)),
        "weight_mean": pa.nulls(n, EVENT_SCHEMA.field("weight_mean").type)
        if weight_mean is None
        else pa.FixedSizeListArray.from_arrays(
            pa.array(np.repeat(np.asarray(weight_mean, np.float32).reshape(b, N_UTILITY_WEIGHTS), k, axis=0).ravel()),
            N_UTILITY_WEIGHTS,
        ),
        "weight_log_density": pa.nulls(n, pa.float64())
        if weight_log_density is None
        else pa.array(per_request(weight_log_density, np.float64)),
        "p_click": f32(predictions["p_click"]),
        "p_long_view": f32(predictions.get("p_long_view", zeros)),
        "p_purchase": f32(predictions.get("p_purchase", zeros)),
        "relevance": pa.nulls(n, pa.float32()) if relevance is None else f32(np.broadcast_to(relevance, (b, k))),
        "clicked": pa.array(np.asarray(clicked, bool).ravel()),
        "dwell_s": f32(dwell_s),
        "skipped": pa.array(np.asarray(skipped, bool).ravel()),
        "purchased": pa.array(np.zeros(n, bool) if purchased is None else np.asarray(purchased, bool).ravel()),
        "revenue": f32(zeros if revenue is None else revenue),
        "inner_reward": f32(inner_reward),
        "context": context_col,
        **_shadow_columns(shadow, b, k),
    }
    return pa.RecordBatch.from_arrays(list(cols.values()), schema=EVENT_SCHEMA)


def _shadow_columns(shadow: dict | None, b: int, k: int) -> dict[str, pa.Array]:
    n = b * k
    if shadow is None:
        return {name: pa.nulls(n, EVENT_SCHEMA.field(name).type) for name in SHADOW_COLUMNS}
    weights = np.repeat(np.asarray(shadow["weights"], np.float32).reshape(b, N_UTILITY_WEIGHTS), k, axis=0)
    return {
        "shadow_weights": pa.FixedSizeListArray.from_arrays(pa.array(weights.ravel()), N_UTILITY_WEIGHTS),
        "shadow_log_density": pa.array(np.repeat(np.asarray(shadow["log_density"], np.float64).reshape(b), k)),
        "shadow_version": pa.array(np.full(n, shadow["version"], np.int32)),
    }


def conform(table: pa.Table) -> pa.Table:
    """``table`` in EVENT_SCHEMA's column order and types, with columns it lacks (events written before a
    column existed) as nulls: entries of several schema versions then concatenate."""
    n = table.num_rows
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type) for f in EVENT_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=EVENT_SCHEMA)


def dedupe(events: pa.Table) -> pa.Table:
    """Keep the first row of each event_id (sinks deliver at least once)."""
    if events.num_rows == 0:
        return events
    ids = np.frombuffer(
        events["event_id"].combine_chunks().buffers()[1],
        dtype="V16",
        count=events.num_rows,
        offset=events["event_id"].combine_chunks().offset * 16,
    )
    _, first = np.unique(ids, return_index=True)
    if len(first) == events.num_rows:
        return events
    return events.take(pa.array(np.sort(first)))
