"""Telemetry: ring buffer bounds and drops, emit never blocks, Parquet and Redis sinks lose and
duplicate nothing (after dedupe), Redis restart, sessioniser gaps and 512/64 windows."""

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

import rust_ext
from actors.cascade import build_world
from actors.stages import retrieval_relevance
from actors.telemetry import (
    EVENT_SCHEMA,
    BufferConfig,
    ParquetSink,
    RedisStreamReader,
    RedisStreamSink,
    StreamSessioniser,
    TelemetryBuffer,
    dedupe,
    read_parquet_events,
    read_trajectories,
    sessionise,
    slates_events,
    window_starts,
)
from actors.telemetry.schema import event_ids
from actors.telemetry.sinks import read_event_files
from benchmarks.common import RedisServer
from tests.telemetry_helpers import T0_US, make_requests, request_at, wait_until


class ListSink:
    def __init__(self):
        self.tables = []

    def write(self, table):
        self.tables.append(table)


class BlockedSink:
    """A sink that is down: every write blocks until released, then fails."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def write(self, table):
        self.calls += 1
        self.release.wait()
        raise ConnectionError("sink down")


def test_schema_and_event_ids_are_unique_per_item():
    batch = make_requests(3, slate=4)[0]
    assert batch.schema == EVENT_SCHEMA
    table = pa.Table.from_batches(make_requests(50, slate=4))
    assert dedupe(table).num_rows == table.num_rows == 200
    assert dedupe(pa.concat_tables([table, table.slice(10, 30)])).num_rows == 200


def _events(**kw) -> pa.RecordBatch:
    b, k = 2, 3
    return slates_events(
        request_uids=np.arange(1, b + 1),
        ts_us=np.zeros(b, np.int64),
        user_ids=np.arange(b),
        items=np.arange(b * k).reshape(b, k),
        clicked=np.zeros((b, k), bool),
        dwell_s=np.zeros((b, k)),
        skipped=np.ones((b, k), bool),
        inner_reward=np.zeros((b, k)),
        predictions={"p_click": np.full((b, k), 0.25)},
        **kw,
    )


def test_relevance_column_is_the_logged_relevance_never_p_click():
    rel = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], np.float32)
    batch = _events(relevance=rel)
    np.testing.assert_array_equal(batch["relevance"].to_numpy(), rel.ravel())
    np.testing.assert_array_equal(batch["p_click"].to_numpy(), np.full(6, 0.25, np.float32))
    assert _events()["relevance"].null_count == 6  # not given: unknown, not p_click
    with pytest.raises(ValueError, match="broadcast"):
        _events(relevance=np.zeros((2, 4)))


LOG_CONFIG = {"world": {"n_items": 1500, "n_users": 300}, "pipeline": {"k_matching": 100, "k_pre_ranking": 20}}


@pytest.mark.parametrize("producer", ["exploration", "outer_controller"])
def test_simulated_logs_carry_the_towers_relevance_and_its_inner_reward(producer, tmp_path):
    """Both log generators log relevance = the two-tower similarity of the served items, and the
    inner reward the kernel gives with it."""
    from rllib_policies.outer_controller.logs import simulate_logs
    from rllib_policies.utility_agent.exploration import ActionGrid, simulate_exploration_logs

    root = str(tmp_path / "events")
    if producer == "exploration":
        simulate_exploration_logs(LOG_CONFIG, root, n_sessions=12, grid=ActionGrid(3), batch_sessions=12)
    else:
        simulate_logs(LOG_CONFIG, root, days=1, users_per_day=12)
    events = read_parquet_events(root)
    assert events.num_rows > 0 and events["relevance"].null_count == 0
    _, pipeline = build_world(LOG_CONFIG)
    users, items = events["user_id"].to_numpy(), events["item_id"].to_numpy()
    towers = retrieval_relevance(pipeline.ctx, users, items[:, None])[:, 0]
    np.testing.assert_allclose(events["relevance"].to_numpy(), towers, atol=1e-6)
    assert not np.allclose(events["relevance"].to_numpy(), events["p_click"].to_numpy(), atol=1e-3)
    col = lambda name: events[name].to_numpy(zero_copy_only=False)  # noqa: E731
    expected = rust_ext.inner_reward_numpy(col("clicked"), col("dwell_s"), col("skipped"), towers)
    np.testing.assert_allclose(col("inner_reward"), expected, atol=1e-5)


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_full_buffer_drops_and_counts_instead_of_blocking(policy):
    buf = TelemetryBuffer(ListSink(), BufferConfig(capacity_events=100, drop_policy=policy), start=False)
    batches = make_requests(25, slate=10)  # 250 events into room for 100
    assert [buf.emit(b) for b in batches].count(True) == (25 if policy == "oldest" else 10)
    assert buf.buffered == 100 and buf.dropped == 150 and buf.emitted == (250 if policy == "oldest" else 100)
    buf.flush_once()
    kept = pa.concat_tables(buf.sink.tables)["request_id"].unique().to_pylist()
    expected = batches[-10:] if policy == "oldest" else batches[:10]
    assert kept == [b["request_id"][0].as_py() for b in expected]


def test_emit_never_blocks_while_the_sink_is_down():
    sink = BlockedSink()
    buf = TelemetryBuffer(sink, BufferConfig(capacity_events=5_000, flush_interval_s=0.001))
    batches = make_requests(2_000, slate=10)
    done = threading.Event()

    def produce():
        for b in batches:
            buf.emit(b)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    assert done.wait(60), "emit blocked behind a sink that is down"
    # every event is accounted for: dropped, waiting in the buffer (≤ capacity), or in the stuck write
    assert buf.buffered <= 5_000 and buf.dropped + buf.buffered + buf.in_flight == 20_000
    sink.release.set()
    buf.close(timeout_s=1)


def test_parquet_sink_no_loss_no_duplicates_through_the_sessioniser(tmp_path):
    root = str(tmp_path / "events")
    buf = TelemetryBuffer(ParquetSink(root, n_buckets=8), BufferConfig(capacity_events=1_000_000))
    batches = make_requests(30_000, slate=10, n_users=300)  # 300 000 events
    for b in batches:
        assert buf.emit(b)
    buf.close()
    assert buf.stats()["flushed"] == 300_000 and buf.dropped == 0
    events = read_parquet_events(root)
    assert events.num_rows == 300_000
    assert not list(tmp_path.rglob(".*.tmp")), "no half-written file is visible"
    trajectories = sessionise(events, gap_s=1800)
    assert sum(trajectories["n_steps"].to_pylist()) == 30_000
    assert trajectories["session_id"].unique().to_pylist().__len__() == 300  # 1 min apart: one session each


def test_parquet_sink_keeps_a_user_in_one_bucket(tmp_path):
    sink = ParquetSink(str(tmp_path), n_buckets=4)
    sink.write(pa.Table.from_batches(make_requests(200, n_users=20)))
    for folder in tmp_path.iterdir():
        users = set(
            pa.concat_tables([pa.parquet.read_table(f) for f in folder.glob("*.parquet")])["user_id"].to_pylist()
        )
        for other in tmp_path.iterdir():
            if other != folder:
                others = pa.concat_tables([pa.parquet.read_table(f) for f in other.glob("*.parquet")])
                assert not users & set(others["user_id"].to_pylist())


@pytest.mark.parametrize(
    "bad_name, bad_bytes",
    [
        ("part-garbage.parquet", b"PAR1 not a parquet file"),
        ("part-truncated.parquet", None),  # the first half of a real file: no footer
        ("part-empty.parquet", b""),
    ],
)
def test_read_event_files_skips_and_counts_unreadable_files_and_reads_a_slot(tmp_path, bad_name, bad_bytes):
    sink = ParquetSink(str(tmp_path), n_buckets=1)
    early = pa.Table.from_batches([_events()])
    sink.write(early)  # ts 0: outside the slot below
    time.sleep(0.01)
    start_us = time.time_ns() // 1000
    later = early.set_column(0, "event_id", event_ids(np.repeat([7, 8], 3), np.tile(np.arange(3), 2)))
    later = later.set_column(1, "ts", pa.array(np.full(6, start_us + 5)).cast(later.schema.field("ts").type))
    sink.write(later)
    sink.write(later)  # delivered twice: read once
    real = next(tmp_path.rglob("part-*.parquet"))
    bad = real.parent / bad_name
    bad.write_bytes(real.read_bytes()[: real.stat().st_size // 2] if bad_bytes is None else bad_bytes)
    events, skipped = read_event_files(str(tmp_path))
    assert skipped == [str(bad)] and events.num_rows == 12, "deduplicated on event_id, the bad file counted"
    assert bad.exists(), "a skipped file is kept for inspection"
    slot, skipped = read_event_files(str(tmp_path), start_us, start_us + 10)
    assert slot.num_rows == 6 and skipped == [str(bad)], "only the slot's events"
    assert read_event_files(str(tmp_path), start_us + 10, None)[0].num_rows == 0


@pytest.fixture()
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


def read_all(reader, expected_rows, timeout_s=30):
    tables, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        ids, table = reader.read(count=256, block_ms=50)
        if table.num_rows:
            tables.append(table)
            reader.ack(ids)
        if sum(t.num_rows for t in tables) >= expected_rows and not ids:
            break
    return dedupe(pa.concat_tables(tables)) if tables else EVENT_SCHEMA.empty_table()


def test_redis_stream_round_trip_with_consumer_group(redis_server):
    buf = TelemetryBuffer(RedisStreamSink(redis_server.url, "ev"), BufferConfig())
    batches = make_requests(5_000, slate=10)
    for b in batches:
        buf.emit(b)
    buf.close()
    events = read_all(RedisStreamReader(redis_server.url, "ev", "g1", "c1"), 50_000)
    assert events.num_rows == 50_000


def test_redis_restart_loses_nothing_the_buffer_could_hold(redis_server):
    buf = TelemetryBuffer(
        RedisStreamSink(redis_server.url, "ev", timeout_s=0.5),
        BufferConfig(capacity_events=200_000, flush_interval_s=0.005, backoff_max_s=0.2),
    )
    batches = make_requests(12_000, slate=10)  # 120 000 events
    for i, b in enumerate(batches):
        buf.emit(b)
        if i == 3_000:
            redis_server.stop(kill=True)  # broker killed mid-run ...
            assert wait_until(lambda: buf.sink_errors > 0, 10), "the flusher saw the outage"
        if i == 9_000:
            redis_server.start()  # ... and back
    buf.close(timeout_s=30)
    assert buf.dropped == 0 and buf.sink_errors > 0
    events = read_all(RedisStreamReader(redis_server.url, "ev", "g1", "c1"), 120_000)
    assert events.num_rows == 120_000


def test_window_starts_512_64():
    assert window_starts(1) == [0]
    assert window_starts(512) == [0]
    assert window_starts(513) == [0, 448]
    assert window_starts(960) == [0, 448]
    assert window_starts(961) == [0, 448, 896]
    with pytest.raises(ValueError, match="must exceed overlap"):
        window_starts(10, max_steps=64, overlap=64)


def test_session_gaps_are_exact():
    gap = 1800
    batches = [
        request_at(1, 1, 0),
        request_at(1, 2, gap),  # exactly 30 min: same session
        request_at(1, 3, 2 * gap + 1),  # 30 min + 1 s: new session
        request_at(2, 4, 10),
        request_at(1, 5, 2 * gap + 2),
    ]
    t = sessionise(pa.Table.from_batches(batches), gap_s=gap, return_window_s=86400).sort_by(
        [("user_id", "ascending"), ("start_ts", "ascending")]
    )
    assert t["user_id"].to_pylist() == [1, 1, 2]
    assert t["n_steps"].to_pylist() == [2, 2, 1]
    assert t["request_ids"].to_pylist()[0] == [f"{1:016x}", f"{2:016x}"]
    assert t["rewards"].to_pylist()[0] == pytest.approx([1.0, 1.0])
    # user 1's first session is followed by another within a day; the others are still open (null)
    assert t["returned"].to_pylist() == [True, None, None]


def test_long_sessions_are_windowed_512_64():
    batches = [request_at(7, i + 1, 10 * i, reward=float(i)) for i in range(1000)]
    t = sessionise(pa.Table.from_batches(batches))
    assert t["window"].to_pylist() == [0, 1, 2]
    assert t["first_step"].to_pylist() == [0, 448, 896]
    assert t["n_steps"].to_pylist() == [512, 512, 104]
    assert t["rewards"].to_pylist()[1][0] == pytest.approx(448.0)
    assert set(t["session_steps"].to_pylist()) == {1000}


@pytest.mark.ray
def test_ray_data_sessioniser_matches_in_process(ray_session, tmp_path):
    from actors.telemetry import sessionise_dataset

    root = str(tmp_path / "events")
    sink = ParquetSink(root, n_buckets=4)
    batches = make_requests(3_000, slate=5, n_users=40, step_s=700)  # gaps of 700 s: sessions of 3 requests
    for i in range(0, len(batches), 500):
        sink.write(pa.Table.from_batches(batches[i : i + 500]))
    local = sessionise(read_parquet_events(root), gap_s=1800)
    out = str(tmp_path / "trajectories")
    remote = pa.concat_tables(list(sessionise_dataset(root, out, gap_s=1800).iter_batches(batch_format="pyarrow")))
    key = [("session_id", "ascending"), ("window", "ascending")]
    assert (
        remote.sort_by(key)
        .select(["session_id", "n_steps", "rewards", "returned"])
        .equals(local.sort_by(key).select(["session_id", "n_steps", "rewards", "returned"]))
    )
    import ray.data

    assert ray.data.read_parquet(out).count() == local.num_rows


@pytest.mark.ray
def test_incremental_redis_sessioniser_matches_batch(ray_session, redis_server, tmp_path):
    import ray

    from actors.telemetry import stream_sessioniser_actor

    batches = make_requests(2_000, slate=5, n_users=40, step_s=700)
    sink = RedisStreamSink(redis_server.url, "ev")
    for i in range(0, len(batches), 250):
        sink.write(pa.Table.from_batches(batches[i : i + 250]))
    out = str(tmp_path / "traj")
    actor = stream_sessioniser_actor(url=redis_server.url, stream="ev", out_dir=out, gap_s=1800)
    while ray.get(actor.poll.remote())["entries"]:
        pass
    mid = ray.get(actor.flush_all.remote())
    assert mid["open_users"] == 0
    written = pa.parquet.read_table(out)
    batch = sessionise(pa.Table.from_batches(batches), gap_s=1800)
    key = [("session_id", "ascending"), ("window", "ascending")]
    cols = ["session_id", "n_steps", "rewards", "request_ids"]
    assert written.sort_by(key).select(cols).equals(batch.sort_by(key).select(cols))
    pending = redis_server_pending(redis_server.url, "ev", "sessioniser")
    assert pending == 0, "every entry acknowledged once its sessions were written"


def redis_server_pending(url, stream, group):
    import redis

    return redis.Redis.from_url(url).xpending(stream, group)["pending"]


def test_restarted_consumer_walks_its_pending_entries_once_then_reads_new(redis_server):
    sink = RedisStreamSink(redis_server.url, "ev", entry_rows=10)
    batches = make_requests(3, slate=10)
    sink.write(pa.Table.from_batches(batches))  # 3 entries
    first = RedisStreamReader(redis_server.url, "ev", "g", "c")
    ids, _ = first.read(count=10)
    assert len(ids) == 3  # read but never acked (a crash)
    sink.write(pa.Table.from_batches(make_requests(1, slate=10, seed=5)))
    again = RedisStreamReader(redis_server.url, "ev", "g", "c")  # the restarted consumer
    seen = []
    for _ in range(4):
        ids, table = again.read(count=2, block_ms=50)
        seen += ids
        again.ack(ids)
    assert len(seen) == 4 and len(set(seen)) == 4  # 3 pending once each, then the new one


def test_streaming_sessioniser_backfills_next_day_return_exactly_once(redis_server, tmp_path):
    """Sessions are written when they close, with ``returned`` open; each is decided once, when the user
    comes back or the watermark passes the 24 h window, also across a restart of the sessioniser, and
    read_trajectories then equals the batch job."""
    h = 3600.0
    chunks = [  # (user, uid, hours) in event-time order, written and polled chunk by chunk
        [(1, 1, 0), (1, 2, 0.01), (2, 3, 0), (3, 4, 0), (4, 5, 1)],  # watermark 1 h: t=0 sessions close
        [(1, 6, 10)],  # user 1 back within 24 h: returned; watermark 10 h closes user 4's session
        [(3, 7, 30)],  # user 3 back after 30 h: not returned; watermark 30 h ends users 2's and 4's windows
    ]
    sink, out = RedisStreamSink(redis_server.url, "ev"), str(tmp_path / "traj")

    def sessioniser():  # the same consumer: a restart reads what it had not acknowledged, and its open returns
        return StreamSessioniser(redis_server.url, "ev", out, gap_s=1800, return_window_s=24 * h)

    counts = []
    for chunk in chunks:
        s = sessioniser()
        sink.write(pa.Table.from_batches([request_at(u, uid, t * h) for u, uid, t in chunk]))
        while s.poll()["entries"]:
            pass
        counts.append(s.returns_backfilled)
    final = s.flush_all()
    assert counts == [0, 1, 4] and final["returns_backfilled"] == 4
    for _ in range(2):  # polls with no new data decide nothing twice
        s.poll(block_ms=1)
    assert s.returns_backfilled == 4
    written = read_trajectories(out)
    batch = sessionise(
        pa.Table.from_batches([request_at(u, uid, t * h) for c in chunks for u, uid, t in c]),
        gap_s=1800,
        return_window_s=24 * h,
    )
    got = dict(zip(written["session_id"].to_pylist(), written["returned"].to_pylist()))
    want = dict(zip(batch["session_id"].to_pylist(), batch["returned"].to_pylist()))
    assert got == want and list(want.values()).count(None) == 2  # user 1's and 3's last sessions: still open
    assert sorted(v for v in want.values() if v is not None) == [False, False, False, True]


def test_a_late_event_of_a_closed_session_is_not_a_return(redis_server, tmp_path):
    """Events are logged at feedback time, which may come late: an event inside a closed session's gap
    is not the user's next session."""
    h = 3600.0
    sink, out = RedisStreamSink(redis_server.url, "ev"), str(tmp_path / "traj")
    s = StreamSessioniser(redis_server.url, "ev", out, gap_s=1800, return_window_s=24 * h)
    for chunk in ([(1, 1, 0), (1, 2, 0.1), (2, 3, 2)], [(1, 4, 0.2)], [(2, 5, 30)]):
        sink.write(pa.Table.from_batches([request_at(u, uid, t * h) for u, uid, t in chunk]))
        while s.poll()["entries"]:
            pass
    decided = pa.parquet.read_table(str(tmp_path / "traj" / "_returns")).to_pylist()
    first = [d for d in decided if d["session_id"] == f"1-{T0_US}"]
    assert [d["returned"] for d in first] == [False], decided  # decided by the window, not by the late event
