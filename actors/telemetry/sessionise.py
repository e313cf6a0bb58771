"""Events → sessions → trajectories for the learners.

A session is a user's run of requests with no gap longer than ``gap_s`` (default 30 min). A step is
one request: its action (utility weights), propensity, the summed inner reward of its items,
clicks and revenue. A trajectory row carries a window of at most ``max_steps`` (512) steps.
Longer sessions are cut into windows that overlap by ``overlap`` (64) steps, the seed's
credit-assignment context cap. Each row also carries the session's delayed KPIs: revenue, length,
and ``returned``, which is whether the user's next session starts within ``return_window_s`` of
this one's end. ``returned`` is null while that window is still open in the data.

``sessionise`` is a pure function on one table (vectorised with pandas). ``sessionise_dataset``
runs it as a Ray Data job, grouped by user, over a ParquetSink root.

Late KPIs: ``returned`` closes up to ``return_window_s`` after a session ends. The batch job recomputes it
from all the data it reads. The streaming sessioniser writes a session as soon as it closes, so it
backfills: when the user's next event arrives, or the watermark passes the window, it writes the
session's ``returned`` once to ``<out_dir>/_returns/`` (RETURNS_SCHEMA). ``read_trajectories`` applies
those updates (first one per session) to the trajectory rows.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from actors.stages import LONG_VIEW_S

from .schema import EVENT_SCHEMA, dedupe
from .sinks import RedisStreamReader

TRAJECTORY_SCHEMA = pa.schema(
    [
        ("session_id", pa.string()),
        ("user_id", pa.int64()),
        ("window", pa.int32()),
        ("first_step", pa.int32()),
        ("n_steps", pa.int32()),
        ("session_steps", pa.int32()),
        ("start_ts", pa.timestamp("us", tz="UTC")),
        ("end_ts", pa.timestamp("us", tz="UTC")),
        ("request_ids", pa.list_(pa.string())),
        ("actions", pa.list_(pa.list_(pa.float32()))),
        ("propensities", pa.list_(pa.float32())),
        ("rewards", pa.list_(pa.float32())),
        ("clicks", pa.list_(pa.int32())),
        ("step_revenue", pa.list_(pa.float32())),
        ("session_revenue", pa.float32()),
        ("session_clicks", pa.int32()),
        ("returned", pa.bool_()),
        ("observations", pa.list_(pa.list_(pa.float32()))),  # logged request contexts (null entries if not logged)
    ]
)


RETURNS_SCHEMA = pa.schema(
    [
        ("session_id", pa.string()),
        ("user_id", pa.int64()),
        ("returned", pa.bool_()),
        ("resolved_ts", pa.timestamp("us", tz="UTC")),  # the event time at which the window was decided
    ]
)
RETURNS_DIR = "_returns"  # '_'-prefixed: dataset discovery over the trajectory folder skips it


def _write_atomically(table: pa.Table, folder: str, prefix: str) -> None:
    os.makedirs(folder, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex}.parquet"
    tmp = os.path.join(folder, f".{name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, os.path.join(folder, name))


def read_returns(out_dir: str | list[str]) -> pa.Table:
    """The backfilled late-KPI decisions under ``<out_dir>/_returns`` (RETURNS_SCHEMA; empty when none)."""
    folders = [os.path.join(d, RETURNS_DIR) for d in ([out_dir] if isinstance(out_dir, str) else out_dir)]
    folders = [f for f in folders if os.path.isdir(f)]
    if not folders:
        return RETURNS_SCHEMA.empty_table()
    return pa.concat_tables(
        pads.dataset(f, format="parquet", schema=RETURNS_SCHEMA, ignore_prefixes=[".", "_"]).to_table() for f in folders
    )


def apply_returns(trajectories: pa.Table, updates: pa.Table) -> pa.Table:
    """Trajectory rows whose ``returned`` is null take the first backfilled decision for their session."""
    if trajectories.num_rows == 0 or updates.num_rows == 0:
        return trajectories
    at = pc.index_in(trajectories["session_id"], value_set=updates["session_id"])  # first match per session
    filled = pc.coalesce(trajectories["returned"], pc.take(updates["returned"], at))
    return trajectories.set_column(trajectories.schema.get_field_index("returned"), "returned", filled)


def read_trajectories(out_dir: str) -> pa.Table:
    """Trajectory rows under ``out_dir`` with the backfilled late KPIs of ``<out_dir>/_returns`` applied."""
    ds = pads.dataset(out_dir, format="parquet", schema=TRAJECTORY_SCHEMA, ignore_prefixes=[".", "_"])
    return apply_returns(ds.to_table(), read_returns(out_dir))


def window_starts(n_steps: int, max_steps: int = 512, overlap: int = 64) -> list[int]:
    """Start steps of the windows covering n_steps: 0, s, 2s, … (s = max_steps − overlap) until a
    window reaches the end. E.g. 512 → [0]; 513 → [0, 448]; 961 → [0, 448, 896]."""
    if max_steps <= overlap:
        raise ValueError(f"max_steps ({max_steps}) must exceed overlap ({overlap})")
    stride, starts = max_steps - overlap, [0]
    while starts[-1] + max_steps < n_steps:
        starts.append(starts[-1] + stride)
    return starts


def requests_table(events: pa.Table) -> pd.DataFrame:
    """One row per request (a step), ordered by user then time; ``long_views`` counts clicked items
    watched at least LONG_VIEW_S (18 s, KuaiRand's long view)."""
    df = events.select(
        [
            "user_id",
            "request_id",
            "ts",
            "inner_reward",
            "clicked",
            "dwell_s",
            "revenue",
            "propensity",
            "utility_weights",
            "context",
        ]
    ).to_pandas()
    df["long_view"] = df["clicked"].fillna(False).astype(bool) & (df["dwell_s"] >= LONG_VIEW_S)
    g = df.groupby(["user_id", "request_id"], sort=False)
    steps = g.agg(
        ts=("ts", "min"),
        reward=("inner_reward", "sum"),
        clicks=("clicked", "sum"),
        revenue=("revenue", "sum"),
        long_views=("long_view", "sum"),
        propensity=("propensity", "first"),
        action=("utility_weights", "first"),
        context=("context", "first"),
    ).reset_index()
    return steps.sort_values(["user_id", "ts", "request_id"], kind="stable").reset_index(drop=True)


def sessionise(
    events: pa.Table,
    gap_s: float = 1800.0,
    max_steps: int = 512,
    overlap: int = 64,
    return_window_s: float = 86400.0,
    data_end=None,
) -> pa.Table:
    """Deduplicated events → trajectory windows (TRAJECTORY_SCHEMA)."""
    events = dedupe(events)
    if events.num_rows == 0:
        return TRAJECTORY_SCHEMA.empty_table()
    steps = requests_table(events)
    ts = steps["ts"].astype("int64").to_numpy()  # µs
    user = steps["user_id"].to_numpy()
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_session = new_user | np.r_[True, np.diff(ts) > gap_s * 1e6]
    steps["session"] = np.cumsum(new_session) - 1
    steps["step"] = steps.groupby("session").cumcount()
    sess = steps.groupby("session").agg(
        user_id=("user_id", "first"),
        start=("ts", "min"),
        end=("ts", "max"),
        n=("step", "size"),
        revenue=("revenue", "sum"),
        clicks=("clicks", "sum"),
    )
    start_us = sess["start"].astype("int64").to_numpy()
    end_us = sess["end"].astype("int64").to_numpy()
    same_user_next = np.r_[sess["user_id"].to_numpy()[1:] == sess["user_id"].to_numpy()[:-1], False]
    next_start = np.r_[start_us[1:], 0]
    horizon = int(pd.Timestamp(data_end).value // 1000) if data_end is not None else int(ts.max())
    returned = np.where(
        same_user_next,
        next_start - end_us <= return_window_s * 1e6,
        np.where(horizon - end_us >= return_window_s * 1e6, False, np.nan),
    )
    rows = []
    by_session = steps.groupby("session", sort=True)
    for sid, group in by_session:  # one iteration per session; the work inside is vectorised
        k = int(sid)
        session_id = f"{int(sess['user_id'].iat[k])}-{start_us[k]}"
        for w, s in enumerate(window_starts(len(group), max_steps, overlap)):
            part = group.iloc[s : s + max_steps]
            rows.append(
                {
                    "session_id": session_id,
                    "user_id": int(sess["user_id"].iat[k]),
                    "window": w,
                    "first_step": s,
                    "n_steps": len(part),
                    "session_steps": int(sess["n"].iat[k]),
                    "start_ts": sess["start"].iat[k],
                    "end_ts": sess["end"].iat[k],
                    "request_ids": part["request_id"].tolist(),
                    "actions": [list(a) for a in part["action"]],
                    "propensities": part["propensity"].astype(np.float32).tolist(),
                    "rewards": part["reward"].astype(np.float32).tolist(),
                    "clicks": part["clicks"].astype(np.int32).tolist(),
                    "step_revenue": part["revenue"].astype(np.float32).tolist(),
                    "session_revenue": float(sess["revenue"].iat[k]),
                    "session_clicks": int(sess["clicks"].iat[k]),
                    "returned": None if np.isnan(returned[k]) else bool(returned[k]),
                    "observations": [None if c is None else list(c) for c in part["context"]],
                }
            )
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


def parquet_max_ts(events_root: str):
    """The newest event time under a Parquet root, from row-group statistics (no data scan)."""
    ds = pads.dataset(events_root, format="parquet", schema=EVENT_SCHEMA, ignore_prefixes=[".", "_"])
    col = EVENT_SCHEMA.get_field_index("ts")
    best = None
    for frag in ds.get_fragments():
        meta = frag.metadata
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            if stats is not None and stats.has_min_max and (best is None or stats.max > best):
                best = stats.max
    return best


def map_user_partitions(ds, fn, num_partitions: int = 8, num_cpus: float = 0.25):
    """Hash-partition a Ray Dataset by user_id and apply the vectorised ``fn`` (pyarrow Table →
    Table) to each whole partition: every user's rows meet in one call, and there is one call per
    partition, not one per user (``map_groups`` costs ~5 ms of Python per user). A few partitions:
    Ray Data's default of 200 costs minutes of task overhead on a laptop."""
    return ds.repartition(num_partitions, keys=["user_id"]).map_batches(
        fn, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus
    )


def sessionise_dataset(
    events_root: str,
    out_dir: str | None = None,
    gap_s: float = 1800.0,
    max_steps: int = 512,
    overlap: int = 64,
    return_window_s: float = 86400.0,
    num_cpus: float = 0.25,
    num_partitions: int = 8,
):
    """The Ray Data job: read the Parquet sink, group by user, sessionise each group, optionally
    write trajectory Parquet. Returns the (materialised) trajectory Dataset.

    Its tasks ask for ``num_cpus`` each, so the job runs beside Serve replicas on a small cluster
    (whole-CPU read tasks starve behind them on 2 cores)."""
    data_end = parquet_max_ts(events_root)
    import ray.data  # noqa: PLC0415  Ray Data only where a dataset is read: serving replicas import this module

    ds = ray.data.read_parquet(
        events_root, schema=EVENT_SCHEMA, partitioning=None, file_extensions=["parquet"], num_cpus=num_cpus
    )

    def per_user(batch: pa.Table) -> pa.Table:
        return sessionise(batch, gap_s, max_steps, overlap, return_window_s, data_end)

    trajectories = map_user_partitions(ds, per_user, num_partitions, num_cpus).materialize()
    if out_dir is not None:
        trajectories.write_parquet(out_dir, ray_remote_args={"num_cpus": num_cpus})
    return trajectories


class StreamSessioniser:
    """Incremental sessioniser over a Redis stream (run it as a Ray actor: ``StreamSessioniserActor``).

    ``poll()`` reads new entries through a consumer group and keeps each user's events in memory.
    A user whose last event is older than the watermark (the newest event time seen) minus
    ``gap_s`` has closed sessions. Those are sessionised and written as one trajectory Parquet file,
    by atomic rename. Only then are the stream entries acknowledged whose events all belong to
    written sessions, so a crash re-delivers whatever was not yet written (at least once; ids dedupe).

    ``returned`` is known at close only for a user's earlier sessions in the same batch (or once the
    watermark has passed the window). A written session whose return is open waits in ``awaiting``. It is
    decided by the user's first event more than ``gap_s`` after its end (a later session: returned iff
    within ``return_window_s``; an event that arrives late but belongs to the closed session's time does
    not count), or by the watermark passing end + ``return_window_s`` (not returned). Each decision is
    written once to ``<out_dir>/_returns/`` (see ``read_trajectories``). The open returns are persisted to
    ``<out_dir>/_returns/_open.json`` (atomic rename) before any stream entry is acknowledged, so a
    restarted sessioniser resumes them.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        out_dir: str,
        group: str = "sessioniser",
        consumer: str = "s0",
        gap_s: float = 1800.0,
        max_steps: int = 512,
        overlap: int = 64,
        return_window_s: float = 86400.0,
    ):
        self.reader = RedisStreamReader(url, stream, group, consumer)
        self.out_dir, self.gap_s, self.max_steps, self.overlap = out_dir, gap_s, max_steps, overlap
        self.return_window_us = int(return_window_s * 1e6)
        self.gap_us = int(gap_s * 1e6)
        # session id → [user, end µs, first event µs > end + gap seen so far (None: not yet)]
        self.awaiting: dict[str, list] = {}
        self.returns_backfilled = 0
        self._open_path = os.path.join(out_dir, RETURNS_DIR, "_open.json")
        if os.path.exists(self._open_path):
            with open(self._open_path) as f:
                saved = json.load(f)
            self.awaiting, self.returns_backfilled = saved["awaiting"], saved["returns_backfilled"]
        os.makedirs(out_dir, exist_ok=True)
        self.pending: dict[int, list[pa.Table]] = {}
        self.last_us: dict[int, int] = {}  # newest event time per pending user
        self.entry_users: dict[bytes, set[int]] = {}
        self.watermark_us = 0
        self.sessions_written = 0

    def poll(self, max_entries: int = 1024, block_ms: int = 50) -> dict[str, int]:
        ids, table = self.reader.read(count=max_entries, block_ms=block_ms)
        if table.num_rows:
            users = table["user_id"].to_numpy()
            order = np.argsort(users, kind="stable")
            bounds = np.flatnonzero(np.r_[True, np.diff(users[order]) != 0, True])
            ts = table["ts"].cast(pa.int64()).to_numpy()
            self.watermark_us = max(self.watermark_us, int(ts.max()))
            for s, e in zip(bounds[:-1], bounds[1:]):
                user, rows = int(users[order[s]]), order[s:e]
                self.pending.setdefault(user, []).append(table.take(pa.array(rows)))
                self.last_us[user] = max(self.last_us.get(user, 0), int(ts[rows].max()))
            self._note_next_events(users, ts)
            read_users = set(np.unique(users).tolist())
            for eid in ids:  # an entry's users: conservatively all users of this read
                self.entry_users[eid] = read_users
        self._backfill_returns()
        self._close(lambda last_us: last_us < self.watermark_us - self.gap_s * 1e6)
        return {
            "entries": len(ids),
            "open_users": len(self.pending),
            "sessions_written": self.sessions_written,
            "returns_backfilled": self.returns_backfilled,
        }

    def flush_all(self) -> dict[str, int]:
        """Close every open session (end of stream or shutdown); returns still open stay awaiting."""
        self._backfill_returns()
        self._close(lambda last_us: True)
        return {
            "open_users": len(self.pending),
            "sessions_written": self.sessions_written,
            "returns_backfilled": self.returns_backfilled,
        }

    def _note_next_events(self, users: np.ndarray, ts: np.ndarray) -> None:
        """For each awaiting session, the user's first event more than a gap after its end."""
        for entry in self.awaiting.values():
            user, end_us = entry[0], entry[1]
            later = ts[(users == user) & (ts > end_us + self.gap_us)]
            if len(later):
                entry[2] = int(later.min()) if entry[2] is None else min(entry[2], int(later.min()))

    def _backfill_returns(self) -> None:
        """Decide every awaiting session whose user came back (returned iff within the window) or whose
        window the watermark has passed (not returned); write the decisions once."""
        decided = []
        for session_id, (user, end_us, next_us) in self.awaiting.items():
            if next_us is not None:
                decided.append((user, session_id, next_us - end_us <= self.return_window_us))
            elif self.watermark_us - end_us > self.return_window_us:
                decided.append((user, session_id, False))
        if not decided:
            return
        users, sessions, returned = zip(*decided)
        resolved = pa.array([self.watermark_us] * len(users), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        table = pa.table([pa.array(sessions), pa.array(users), pa.array(returned), resolved], schema=RETURNS_SCHEMA)
        _write_atomically(table, os.path.join(self.out_dir, RETURNS_DIR), "returns")
        for session_id in sessions:
            del self.awaiting[session_id]
        self.returns_backfilled += len(sessions)
        self._save_open_returns()

    def _save_open_returns(self) -> None:
        folder = os.path.dirname(self._open_path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".open-{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            json.dump({"awaiting": self.awaiting, "returns_backfilled": self.returns_backfilled}, f)
        os.replace(tmp, self._open_path)

    def _close(self, is_closed) -> None:
        closing = [u for u in self.pending if is_closed(self.last_us[u])]
        if not closing:
            return
        events = pa.concat_tables([t for u in closing for t in self.pending[u]])
        watermark = pd.Timestamp(self.watermark_us, unit="us", tz="UTC")
        trajectories = sessionise(
            events, self.gap_s, self.max_steps, self.overlap, self.return_window_us / 1e6, data_end=watermark
        )
        _write_atomically(trajectories, self.out_dir, "trajectories")
        self.sessions_written += len(set(trajectories["session_id"].to_pylist()))
        # each closing user's last session: its return stays open until their next event or the window ends
        first_windows = trajectories.filter(pc.equal(trajectories["window"], 0))
        still_open = first_windows.filter(pc.is_null(first_windows["returned"]))
        ends = still_open["end_ts"].cast(pa.int64()).to_numpy()
        for user, session_id, end_us in zip(
            still_open["user_id"].to_pylist(), still_open["session_id"].to_pylist(), ends
        ):
            self.awaiting[session_id] = [user, int(end_us), None]
        self._save_open_returns()  # before any ack: a restart resumes the open returns
        for u in closing:
            del self.pending[u], self.last_us[u]
        done = [eid for eid, users in self.entry_users.items() if not users & self.pending.keys()]
        self.reader.ack(done)
        for eid in done:
            del self.entry_users[eid]


def stream_sessioniser_actor(**kwargs):
    """A StreamSessioniser as a Ray actor (call .poll.remote() / .flush_all.remote())."""
    return ray.remote(num_cpus=0)(StreamSessioniser).remote(**kwargs)
