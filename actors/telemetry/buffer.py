"""A bounded ring buffer of event batches with a background flusher, off the critical path.

Why Python and not a lock-free Rust queue: Debian's crate registry has no crossbeam-queue, and
every producer here already holds the GIL, so a lock-free queue would still serialise on it. The
structure instead guarantees that ``emit`` never waits on I/O:

- ``emit`` takes a ``threading.Lock`` only for O(1) work: an append, plus pops when it has to drop.
- The flusher holds the same lock only to *swap* the whole deque out, which is also O(1).
- The sink write, retries and backoff all happen outside the lock.

So ``emit``'s worst case is one uncontended lock hand-off, and it does not depend on whether the
sink is slow or down. When the buffer is full, events are dropped by policy, oldest or newest, and
counted. A failed write puts its batch back at the front, within the bound, and the flusher retries
with exponential backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from .schema import EVENT_SCHEMA

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, table: pa.Table) -> None: ...


@dataclass(frozen=True)
class BufferConfig:
    capacity_events: int = 1_000_000
    drop_policy: str = "oldest"  # "oldest" | "newest"
    flush_interval_s: float = 0.010
    max_batch_events: int = 65_536
    backoff_initial_s: float = 0.01
    backoff_max_s: float = 1.0

    def __post_init__(self) -> None:
        if self.drop_policy not in ("oldest", "newest"):
            raise ValueError(f"drop_policy must be 'oldest' or 'newest', got {self.drop_policy!r}")
        if self.capacity_events < 1 or self.max_batch_events < 1 or self.flush_interval_s <= 0:
            raise ValueError("capacity_events, max_batch_events and flush_interval_s must be positive")


class TelemetryBuffer:
    """emit(batch) → bounded deque → flusher thread → sink.write(table) every flush_interval_s."""

    def __init__(self, sink: Sink, config: BufferConfig | None = None, start: bool = True):
        self.sink, self.config = sink, config or BufferConfig()
        self._lock = threading.Lock()
        self._chunks: deque[pa.RecordBatch] = deque()
        self._rows = 0
        self.emitted = self.dropped = self.flushed = self.sink_errors = 0
        self.in_flight = 0  # taken by the flusher, being written (at most capacity_events more in memory)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-flusher", daemon=True)
        if start:
            self._thread.start()

    # ---------------------------------------------------------------- producer side
    def emit(self, batch: pa.RecordBatch) -> bool:
        """Buffer a batch of events; never waits on the sink. False if the batch was dropped."""
        n = batch.num_rows
        cap = self.config.capacity_events
        with self._lock:
            if self._rows + n > cap:
                if self.config.drop_policy == "newest" or n > cap:
                    self.dropped += n
                    return False
                while self._chunks and self._rows + n > cap:
                    old = self._chunks.popleft()
                    self._rows -= old.num_rows
                    self.dropped += old.num_rows
            self._chunks.append(batch)
            self._rows += n
            self.emitted += n
        return True

    @property
    def buffered(self) -> int:
        return self._rows

    def stats(self) -> dict[str, int]:
        return {
            "emitted": self.emitted,
            "dropped": self.dropped,
            "flushed": self.flushed,
            "buffered": self._rows,
            "in_flight": self.in_flight,
            "sink_errors": self.sink_errors,
        }

    # ---------------------------------------------------------------- flusher side
    def _take_all(self) -> list[pa.RecordBatch]:
        with self._lock:
            chunks, self._chunks, self._rows = self._chunks, deque(), 0
        return list(chunks)

    def _put_back(self, chunks: list[pa.RecordBatch]) -> None:
        """Return unwritten batches to the front (they are the oldest), then re-apply the bound.

        They are first coalesced, outside the lock, into a few batches of max_batch_events, so the
        critical section stays short. Drops after a failure are therefore counted per coalesced
        batch.
        """
        table = pa.Table.from_batches(chunks, schema=EVENT_SCHEMA).combine_chunks()
        merged = table.to_batches(max_chunksize=self.config.max_batch_events)
        rows = table.num_rows
        with self._lock:
            self._chunks.extendleft(reversed(merged))
            self._rows += rows
            while self._rows > self.config.capacity_events and self._chunks:
                old = self._chunks.popleft() if self.config.drop_policy == "oldest" else self._chunks.pop()
                self._rows -= old.num_rows
                self.dropped += old.num_rows

    def flush_once(self) -> int:
        """Write everything buffered now, in batches of at most max_batch_events. Returns rows written."""
        chunks = self._take_all()
        self.in_flight = sum(c.num_rows for c in chunks)
        written, i = 0, 0
        while i < len(chunks):
            j, rows = i, 0
            while j < len(chunks) and (rows == 0 or rows + chunks[j].num_rows <= self.config.max_batch_events):
                rows += chunks[j].num_rows
                j += 1
            try:
                self.sink.write(pa.Table.from_batches(chunks[i:j], schema=EVENT_SCHEMA))
            except Exception:
                self.sink_errors += 1
                self.in_flight = 0
                self._put_back(chunks[i:])
                raise
            written += rows
            self.flushed += rows
            self.in_flight -= rows
            i = j
        return written

    def _run(self) -> None:
        backoff = self.config.backoff_initial_s
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            try:
                self.flush_once()
                backoff = self.config.backoff_initial_s
            except Exception as e:
                log.warning(
                    "telemetry sink write failed (%s); %d events kept, retrying in %.2fs", e, self._rows, backoff
                )
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.config.backoff_max_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the flusher after a final flush (retried until timeout_s)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._rows and time.monotonic() < deadline:
            try:
                self.flush_once()
            except Exception:
                time.sleep(self.config.backoff_initial_s)
