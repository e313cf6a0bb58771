"""Telemetry benchmark: a synchronous per-event logger vs the ring buffer, side by side, in one run.

    python benchmarks/telemetry.py            # ~1 minute on 2 cores

(a) Added latency per request (one 10-item slate = 10 events): the time the request path spends
    logging, P50 / P99 over 20 000 requests.
(b) Events per second per core: producers emit as fast as they can while the flusher writes to
    the sink; events per CPU-second of the whole process (producer + flusher threads).
(c) Broker failover: a fixed request rate for 6 s; the Redis server is SIGKILLed at 2 s and
    restarted at 4 s. Loss = events accepted but never delivered (after event-id dedupe).
Writes benchmarks/results/telemetry.md; the seed's claims are printed beside the measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.telemetry import (  # noqa: E402
    BufferConfig,
    ParquetSink,
    RedisStreamReader,
    RedisStreamSink,
    TelemetryBuffer,
    dedupe,
    slate_events,
)
from benchmarks.common import RedisServer, machine, write_results  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "telemetry.md")
SEED = {
    "sync": "+4.2 ms P50 / +18 ms P99",
    "ring": "+0.08 ms P50 / +0.6 ms P99",
    "rate": "380 000 events/s/core",
    "loss": "< 0.01 % on broker failover",
}


def slate(rng, uid: int, user: int):
    clicked = rng.random(10) < 0.1
    return dict(
        request_uid=uid,
        ts_us=time.time_ns() // 1000,
        user_id=user,
        items=rng.integers(0, 20000, 10),
        clicked=clicked,
        dwell_s=np.where(clicked, 12.0, 0.0),
        skipped=~clicked,
        inner_reward=rng.random(10),
        predictions={"p_click": rng.random(10), "p_long_view": rng.random(10), "p_purchase": rng.random(10)},
        utility_weights=np.array([1.0, 1.0, 10.0]),
    )


class SyncRedisLogger:
    """The baseline: one blocking XADD per event, on the request path."""

    def __init__(self, url: str, stream: str):
        self.client, self.stream = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1), stream
        self.failed = 0

    def log(self, fields: dict) -> None:
        batch = slate_events(**fields)
        for row in batch.to_pylist():
            try:
                self.client.xadd(
                    self.stream,
                    {k: json.dumps(v) if not isinstance(v, bytes) else v for k, v in row.items() if k != "ts"}
                    | {"ts": str(row["ts"])},
                )
            except Exception:
                self.failed += 1


class SyncParquetLogger:
    """The baseline for files: write each request's events to its own Parquet file, synchronously."""

    def __init__(self, root: str):
        self.sink = ParquetSink(root, n_buckets=4)

    def log(self, fields: dict) -> None:
        self.sink.write(pa.Table.from_batches([slate_events(**fields)]))


class RingLogger:
    def __init__(self, sink, config: BufferConfig | None = None):
        self.buffer = TelemetryBuffer(sink, config or BufferConfig())

    def log(self, fields: dict) -> None:
        self.buffer.emit(slate_events(**fields))


def added_latency(logger, n: int = 20_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    inputs = [slate(rng, i + 1, i % 500) for i in range(n)]
    times = np.empty(n)
    for i, fields in enumerate(inputs):
        t = time.perf_counter()
        logger.log(fields)
        times[i] = time.perf_counter() - t
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def events_per_core(sink_factory, n_events: int = 2_000_000) -> dict:
    """Emit n_events (pre-built 10-event batches) as fast as possible into a buffer that holds them
    all, flush to the sink, and divide by the CPU time of the whole process (producer + flusher)."""
    rng = np.random.default_rng(1)
    batches = [slate_events(**slate(rng, i + 1, i % 500)) for i in range(2000)]
    buf = TelemetryBuffer(sink_factory(), BufferConfig(capacity_events=n_events))
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(n_events // 10):
        buf.emit(batches[i % len(batches)])
    emit_s = time.perf_counter() - t0
    buf.close(timeout_s=120)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "events": buf.flushed,
        "dropped": buf.dropped,
        "wall_s": wall,
        "cpu_s": cpu,
        "events_per_cpu_s": buf.flushed / cpu,
        "emit_events_per_s": n_events / emit_s,
    }


def failover(
    logger_kind: str, server: RedisServer, rate: int = 2000, seconds: float = 6.0, capacity: int = 1_000_000
) -> dict:
    rng = np.random.default_rng(2)
    stream = f"failover-{logger_kind}-{capacity}"
    if logger_kind == "sync":
        logger = SyncRedisLogger(server.url, stream)
    else:
        logger = RingLogger(
            RedisStreamSink(server.url, stream, timeout_s=0.5),
            BufferConfig(capacity_events=capacity, flush_interval_s=0.01, backoff_max_s=0.25),
        )
    n = int(rate * seconds)
    lat = np.empty(n)
    t0, killed, restarted = time.perf_counter(), False, False
    for i in range(n):
        due = t0 + i / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        if not killed and now - t0 > seconds / 3:
            server.stop(kill=True)
            killed = True
        if killed and not restarted and now - t0 > 2 * seconds / 3:
            server.start()
            restarted = True
        t = time.perf_counter()
        logger.log(slate(rng, i + 1, i % 500))
        lat[i] = time.perf_counter() - t
    emitted = n * 10
    if logger_kind == "sync":
        dropped, accepted = 0, emitted - logger.failed
    else:
        logger.buffer.close(timeout_s=60)
        dropped, accepted = logger.buffer.dropped, emitted - logger.buffer.dropped
    if logger_kind == "sync":
        delivered = server_len(server, stream)
    else:
        reader = RedisStreamReader(server.url, stream, "bench", "b0")
        tables = []
        while True:
            ids, t = reader.read(count=512, block_ms=50)
            if not ids:
                break
            tables.append(t)
            reader.ack(ids)
        delivered = dedupe(pa.concat_tables(tables)).num_rows if tables else 0
    return {
        "logger": logger_kind,
        "capacity": capacity,
        "emitted": emitted,
        "dropped": dropped,
        "lost": emitted - dropped - delivered if logger_kind != "sync" else emitted - delivered,
        "delivered": delivered,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "max_ms": float(lat.max() * 1e3),
        "accepted": accepted,
    }


def server_len(server: RedisServer, stream: str) -> int:
    return redis.Redis.from_url(server.url).xlen(stream)


def main() -> None:
    server = RedisServer().start()
    tmp = tempfile.mkdtemp(prefix="morl-telemetry-bench-")
    try:
        print("(a) added latency per request (10 events), 20 000 requests", flush=True)
        rows_a = []
        for name, factory in [
            ("sync: XADD per event (Redis)", lambda: SyncRedisLogger(server.url, "sync")),
            ("sync: Parquet file per request", lambda: SyncParquetLogger(os.path.join(tmp, "sync"))),
            ("ring buffer → Redis Streams", lambda: RingLogger(RedisStreamSink(server.url, "ring"))),
            ("ring buffer → Parquet", lambda: RingLogger(ParquetSink(os.path.join(tmp, "ring")))),
        ]:
            logger = factory()
            n = 5_000 if name.startswith("sync: Parquet") else 20_000
            p50, p99 = added_latency(logger, n)
            if isinstance(logger, RingLogger):
                logger.buffer.close()
            rows_a.append((name, n, p50, p99))
            print(f"  {name:34s} P50 {p50:.3f} ms  P99 {p99:.3f} ms", flush=True)

        print("(b) events per CPU-second (producer + flusher)", flush=True)
        rows_b = []
        for name, factory in [
            ("ring buffer → Redis Streams", lambda: RedisStreamSink(server.url, "rate")),
            ("ring buffer → Parquet", lambda: ParquetSink(os.path.join(tmp, "rate"))),
        ]:
            r = events_per_core(factory)
            rows_b.append((name, r))
            print(
                f"  {name:34s} {r['events_per_cpu_s']:,.0f} events/CPU-s, emit {r['emit_events_per_s']:,.0f} events/s, "
                f"dropped {r['dropped']}",
                flush=True,
            )

        print("(c) Redis SIGKILLed at 2 s, restarted at 4 s, 2 000 requests/s for 6 s", flush=True)
        rows_c = [failover("sync", server), failover("ring", server), failover("ring", server, capacity=20_000)]
        for r in rows_c:
            print(
                f"  {r['logger']} cap {r['capacity']}: emitted {r['emitted']}, dropped {r['dropped']}, "
                f"lost {r['lost']}, P99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms",
                flush=True,
            )
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    a = ["| logger | requests | added P50 ms | added P99 ms | seed's claim |", "|---|---:|---:|---:|---|"]
    a += [
        f"| {n} | {k:,} | {p50:.3f} | {p99:.3f} | {SEED['sync'] if n.startswith('sync') else SEED['ring']} |"
        for n, k, p50, p99 in rows_a
    ]
    b = [
        "| path | events flushed | CPU s | events per CPU-s | emit() alone, events/s | dropped | seed's claim |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    b += [
        f"| {n} | {r['events']:,} | {r['cpu_s']:.2f} | {r['events_per_cpu_s']:,.0f} | {r['emit_events_per_s']:,.0f} | "
        f"{r['dropped']} | {SEED['rate']} |"
        for n, r in rows_b
    ]
    c = [
        "| logger | buffer capacity | events | dropped (counted) | lost (uncounted) | loss % "
        "| request P50 / P99 / max ms |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    c += [
        f"| {'synchronous XADD per event' if r['logger'] == 'sync' else 'ring buffer → Redis'} | "
        f"{'—' if r['logger'] == 'sync' else format(r['capacity'], ',')} | {r['emitted']:,} | {r['dropped']:,} | "
        f"{r['lost']:,} | {100 * (r['lost'] + r['dropped']) / r['emitted']:.3f} | "
        f"{r['p50_ms']:.3f} / {r['p99_ms']:.2f} / {r['max_ms']:.1f} |"
        for r in rows_c
    ]
    page = [
        f"# Telemetry benchmark\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; "
        "Redis 7 (Debian) on loopback with appendfsync always. Command: `python benchmarks/telemetry.py` (one run).\n",
        "## (a) Added latency per request (10 events)\n\n" + "\n".join(a) + "\n",
        "## (b) Throughput per core\n\n2 000 000 events emitted as fast as the producer can into a buffer that "
        "holds them; CPU time of the whole process (producer + flusher + sink client) until all are written.\n\n"
        + "\n".join(b)
        + "\n",
        "## (c) Broker failover (SIGKILL, 2 s down)\n\nLoss % counts every event not delivered, dropped ones "
        "included; *lost (uncounted)* is what the logger did not know it lost.\n\n" + "\n".join(c) + "\n",
    ]
    print("\n\n".join(page))
    write_results(RESULTS, page, partial=False)


if __name__ == "__main__":
    main()
