"""Telemetry off the critical path: event schema, ring buffer + flusher, sinks, sessioniser."""

from .buffer import BufferConfig, TelemetryBuffer
from .schema import EVENT_SCHEMA, dedupe, event_ids, slate_events, slates_events
from .sessionise import (
    RETURNS_SCHEMA,
    TRAJECTORY_SCHEMA,
    StreamSessioniser,
    apply_returns,
    read_returns,
    read_trajectories,
    sessionise,
    sessionise_dataset,
    stream_sessioniser_actor,
    window_starts,
)
from .sinks import ParquetSink, RedisStreamReader, RedisStreamSink, read_parquet_events, user_bucket

__all__ = [
    "BufferConfig",
    "TelemetryBuffer",
    "EVENT_SCHEMA",
    "dedupe",
    "event_ids",
    "slate_events",
    "slates_events",
    "TRAJECTORY_SCHEMA",
    "RETURNS_SCHEMA",
    "read_trajectories",
    "read_returns",
    "apply_returns",
    "StreamSessioniser",
    "stream_sessioniser_actor",
    "sessionise",
    "sessionise_dataset",
    "window_starts",
    "ParquetSink",
    "RedisStreamReader",
    "RedisStreamSink",
    "read_parquet_events",
    "user_bucket",
]
