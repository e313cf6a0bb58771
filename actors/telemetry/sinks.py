"""Event sinks: Parquet files (embedded default) and Redis Streams. Both are at-least-once; readers
dedupe on event_id.

ParquetSink    root/user_bucket=K/part-<time>-<uuid>.parquet, with K = hash(user_id) mod n_buckets,
               so one user's (and one session's) events sit together. Each file is written under a
               '.'-prefixed temporary name and renamed into place, so a reader never sees half a file.
RedisStreamSink  one XADD per batch of ≤ entry_rows events (an Arrow IPC payload), pipelined;
               readers use consumer groups (RedisStreamReader).
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import redis

from .schema import EVENT_SCHEMA, conform, dedupe


def user_bucket(user_id: np.ndarray, n_buckets: int) -> np.ndarray:
    """bucket = (user_id · 0x9E3779B97F4A7C15 mod 2⁶⁴) >> 32 mod n_buckets (Fibonacci hashing)."""
    mixed = np.asarray(user_id, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(n_buckets)).astype(np.int64)


class ParquetSink:
    def __init__(self, root: str, n_buckets: int = 16, fsync: bool = False):
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
        self.root, self.n_buckets, self.fsync = root, n_buckets, fsync
        os.makedirs(root, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        buckets = user_bucket(table["user_id"].to_numpy(), self.n_buckets)
        order = np.argsort(buckets, kind="stable")
        sorted_buckets = buckets[order]
        starts = np.flatnonzero(np.r_[True, np.diff(sorted_buckets) != 0])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            part = table.take(pa.array(order[s:e]))
            folder = os.path.join(self.root, f"user_bucket={int(sorted_buckets[s])}")
            os.makedirs(folder, exist_ok=True)
            name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = os.path.join(folder, f".{name}.tmp")
            pq.write_table(part, tmp)
            if self.fsync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, name))


def read_parquet_events(root: str) -> pa.Table:
    """All events under a ParquetSink root, deduplicated on event_id (unreadable files skipped)."""
    return read_event_files(root)[0]


PRUNE_SLACK_US = 60_000_000  # a file written this long before a slot's start may still hold its events (clocks)


def _written_ns(name: str) -> int | None:
    """The write time a ParquetSink file's name carries (``part-<time_ns>-<uuid>.parquet``), or None."""
    stem = name.split("-")
    return int(stem[1]) if len(stem) >= 3 and stem[0] == "part" and stem[1].isdigit() else None


def read_event_files(root: str, start_us: int | None = None, end_us: int | None = None) -> tuple[pa.Table, list[str]]:
    """The events under a ParquetSink root served in [start_us, end_us) (µs since the epoch; None: open),
    deduplicated on event_id, and the files skipped as unreadable (corrupt or partial: a bad footer, or
    pages that do not decode). Nothing is deleted: a skipped file stays for inspection. A file written more
    than a minute before ``start_us`` (its name carries the write time) holds no event of the slot and is
    not opened."""
    if not os.path.isdir(root):
        return EVENT_SCHEMA.empty_table(), []
    files, skipped = [], []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in sorted(names):
            if not name.endswith(".parquet") or name.startswith((".", "_")):
                continue
            written = _written_ns(name)
            if start_us is not None and written is not None and written // 1000 < start_us - PRUNE_SLACK_US:
                continue
            path = os.path.join(folder, name)
            try:
                pq.read_metadata(path)
                files.append(path)
            except (OSError, pa.ArrowException):
                skipped.append(path)
    where = None
    if start_us is not None:
        where = pc.field("ts") >= pa.scalar(start_us, pa.timestamp("us", tz="UTC"))
    if end_us is not None:
        before = pc.field("ts") < pa.scalar(end_us, pa.timestamp("us", tz="UTC"))
        where = before if where is None else where & before

    def read(paths: list[str]) -> pa.Table:
        return pads.dataset(paths, format="parquet", schema=EVENT_SCHEMA).to_table(filter=where)

    try:
        events = read(files) if files else EVENT_SCHEMA.empty_table()
    except (OSError, pa.ArrowException):  # some file's pages do not decode: find it, file by file
        tables = []
        for path in files:
            try:
                tables.append(read([path]))
            except (OSError, pa.ArrowException):
                skipped.append(path)
        events = pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()
    return dedupe(events), skipped


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


class RedisStreamSink:
    """Batched, pipelined XADD of Arrow IPC payloads to one stream."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        stream: str = "morl:events",
        entry_rows: int = 4096,
        timeout_s: float = 1.0,
    ):
        self.stream, self.entry_rows = stream, entry_rows
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def write(self, table: pa.Table) -> None:
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, table.num_rows, self.entry_rows):
            part = table.slice(start, self.entry_rows)
            pipe.xadd(self.stream, {"n": part.num_rows, "ipc": _ipc(part)})
        pipe.execute()


class RedisStreamReader:
    """A consumer in a consumer group: read() → (entry ids, events table); ack(ids) when processed."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        stream: str = "morl:events",
        group: str = "sessioniser",
        consumer: str = "c0",
        timeout_s: float = 5.0,
    ):
        self.stream, self.group, self.consumer = stream, group, consumer
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._pending_from: bytes | str | None = "0"  # after a restart: this consumer's unacked entries first

    def read(self, count: int = 64, block_ms: int = 100) -> tuple[list[bytes], pa.Table]:
        """This consumer's unacknowledged entries first (walked once, in order, after a restart),
        then new ones (">")."""
        if self._pending_from is not None:
            got = self.client.xreadgroup(self.group, self.consumer, {self.stream: self._pending_from}, count=count)
            entries = got[0][1] if got else []
            if entries:
                self._pending_from = entries[-1][0]  # continue after the last pending id next time
            else:
                self._pending_from = None
        else:
            entries = []
        if not entries and self._pending_from is None:
            got = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
            entries = got[0][1] if got else []
        ids = [eid for eid, _ in entries]
        tables = [conform(pa.ipc.open_stream(fields[b"ipc"]).read_all()) for _, fields in entries]
        return ids, (pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table())

    def ack(self, ids: list[bytes]) -> None:
        if ids:
            self.client.xack(self.stream, self.group, *ids)
