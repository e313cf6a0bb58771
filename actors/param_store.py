"""Versioned, hot-updatable parameters shared by every replica of a deployment.

One named Ray actor holds ``(version, params)``. Readers (Serve replicas, stage actors) keep a
local copy and long-poll the store from a daemon thread, so the request path never waits on
it. A writer's ``put`` bumps the version, wakes every poller, and returns once each live reader
has reported the new version (or a timeout passes), so "PUT returned 200" means "every replica
now serves it". Optional JSON snapshot on disk (atomic rename) survives a store restart.

Every change is also an audit entry (``audit()``): the new version, the one it replaced, when, the params
before and after, and what the writer said of it (``meta``: who, why), so an operator's page can show who
moved what from where to where.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

log = logging.getLogger(__name__)


class VersionConflict(Exception):
    """A put named an expected version that is no longer current."""


class NothingToRollBack(LookupError):
    """A rollback asked of a store that holds no earlier version."""


HISTORY = 16  # earlier versions a store keeps for rollback
AUDIT = 500  # changes a store keeps in its audit log
SNAPSHOT_DIR_ENV = "MORL_STORE_SNAPSHOTS"  # the folder of every store's snapshot (get_or_create_store)


@dataclass(frozen=True)
class Snapshot:
    version: int
    params: dict[str, Any]


HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


@ray.remote(num_cpus=0, max_concurrency=1000)
class VersionedParamStore:
    """The single source of truth for one parameter set (async actor)."""

    def __init__(self, initial: dict[str, Any], snapshot_path: str | None = None, reader_ttl_s: float = 15.0):
        self._snapshot_path = snapshot_path
        self._reader_ttl_s = reader_ttl_s
        self._version, self._params = 1, dict(initial)
        if snapshot_path and os.path.exists(snapshot_path):
            with open(snapshot_path) as f:
                saved = json.load(f)
            self._version, self._params = int(saved["version"]), dict(saved["params"])
        self._changed = asyncio.Condition()
        self._readers: dict[str, tuple[int, float]] = {}  # reader id -> (version held, last seen)
        self._history: list[Snapshot] = []  # the versions before the current one, oldest first
        self._audit: list[dict[str, Any]] = []  # every change, oldest first (``audit``)
        if snapshot_path and os.path.exists(snapshot_path):
            self._history = [Snapshot(int(v), dict(p)) for v, p in saved.get("history", [])]
            self._audit = list(saved.get("audit", []))

    def get(self) -> Snapshot:
        return Snapshot(self._version, dict(self._params))

    async def put(
        self,
        params: dict[str, Any],
        expected_version: int | None = None,
        ack_timeout_s: float = 2.0,
        meta: dict[str, Any] | None = None,
    ) -> dict:
        """Replace the params; wait until live readers hold the new version.

        Returns {"version", "readers_acked", "readers_live"}. Raises VersionConflict when
        ``expected_version`` is given and is not the current version (optimistic concurrency).
        ``meta`` (JSON: who, why) goes into the change's audit entry.
        """
        async with self._changed:  # check and bump under one lock: two writers cannot both pass the check
            self._check(expected_version)
            self._history = [*self._history, self.get()][-HISTORY:]
            self._bump(params, "put", meta)
            version = self._version
        return await self._acks(version, ack_timeout_s)

    async def rollback(
        self, expected_version: int | None = None, ack_timeout_s: float = 2.0, meta: dict[str, Any] | None = None
    ) -> dict:
        """Serve the previous version's params again, as a new version (versions only grow, so every
        reader follows); a second rollback goes one further back. Returns put's dict plus
        ``restored_version`` and the restored ``params``. Raises NothingToRollBack when no earlier version
        is held."""
        async with self._changed:
            self._check(expected_version)
            if not self._history:
                raise NothingToRollBack(f"no version before {self._version} to roll back to")
            previous = self._history.pop()
            self._bump(previous.params, "rollback", {**(meta or {}), "restored_version": previous.version})
            version = self._version
        acks = await self._acks(version, ack_timeout_s)
        return {**acks, "restored_version": previous.version, "params": dict(previous.params)}

    def history(self) -> list[Snapshot]:
        return list(self._history)

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` changes, newest first: {version, from_version, action ("put" | "rollback"), at
        (Unix s), from, to (params), and the writer's meta}."""
        return self._audit[::-1][:limit]

    def _check(self, expected_version: int | None) -> None:
        if expected_version is not None and expected_version != self._version:
            raise VersionConflict(f"expected_version {expected_version} but current version is {self._version}")

    def _bump(self, params: dict[str, Any], action: str, meta: dict[str, Any] | None) -> None:
        entry = {"version": self._version + 1, "from_version": self._version, "action": action, "at": time.time()}
        change = {**(meta or {}), **entry, "from": self._params, "to": dict(params)}  # meta never overrides
        self._audit = [*self._audit, change][-AUDIT:]
        self._version += 1
        self._params = dict(params)
        self._write_snapshot()
        self._changed.notify_all()

    async def _acks(self, version: int, ack_timeout_s: float) -> dict:
        deadline = time.monotonic() + ack_timeout_s
        async with self._changed:
            while time.monotonic() < deadline:
                live = self._live_readers()
                if all(v >= version for v, _ in live.values()):
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
        live = self._live_readers()
        acked = sum(v >= version for v, _ in live.values())
        return {"version": version, "readers_acked": acked, "readers_live": len(live)}

    async def poll(self, reader_id: str, have_version: int, timeout_s: float = 5.0) -> Snapshot | None:
        """Long-poll: report the version a reader holds; return a newer snapshot or None on timeout."""
        async with self._changed:
            self._readers[reader_id] = (have_version, time.monotonic())
            self._changed.notify_all()  # a put may be waiting for this ack
            if self._version <= have_version:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self._version > have_version), timeout_s)
                except TimeoutError:
                    return None
        return self.get()

    def readers(self) -> dict[str, int]:
        return {rid: v for rid, (v, _) in self._live_readers().items()}

    def _live_readers(self) -> dict[str, tuple[int, float]]:
        now = time.monotonic()
        return {rid: vs for rid, vs in self._readers.items() if now - vs[1] < self._reader_ttl_s}

    def _write_snapshot(self) -> None:
        if not self._snapshot_path:
            return
        tmp = f"{self._snapshot_path}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(self._snapshot_path)), exist_ok=True)  # a fresh volume
        with open(tmp, "w") as f:
            history = [[h.version, h.params] for h in self._history]
            saved = {"version": self._version, "params": self._params, "history": history, "audit": self._audit}
            json.dump(saved, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._snapshot_path)


def get_or_create_store(name: str, initial: dict[str, Any], namespace: str = "morl", **kwargs):
    """The named store actor (detached, so it outlives app redeploys); created on first use. A store with a
    ``snapshot_path`` is restarted by Ray if its process dies, behind the same handle and name, at its last version
    and history; followers serve their last params meanwhile and re-poll. One without a snapshot is not restarted:
    it would come back at version 1, below what its followers hold, and they would ignore every later write.

    ``MORL_STORE_SNAPSHOTS`` (a folder every node can write: a shared volume on a cluster) gives each store created
    without a ``snapshot_path`` the snapshot ``<folder>/<namespace>.<name>.json``, so every store an app makes
    survives its process."""
    folder = os.environ.get(SNAPSHOT_DIR_ENV)
    if folder and not kwargs.get("snapshot_path"):
        kwargs["snapshot_path"] = os.path.join(folder, f"{namespace}.{name}.json")
    return VersionedParamStore.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        # on the head, beside Serve's controller: a worker node holding it would never count as idle, so the
        # autoscaler could not remove it (benchmarks/results/multinode.md)
        resources={HEAD_RESOURCE: 0.001},
        max_restarts=-1 if kwargs.get("snapshot_path") else 0,
    ).remote(initial, **kwargs)


def find_store(name: str, namespace: str = "morl", timeout_s: float = 60.0):
    """A store another application owns (it set the initial params and the snapshot path): waits up to
    ``timeout_s`` for its owner to create it, and never creates it (a LookupError names it otherwise)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            if time.monotonic() > deadline:
                why = f"no param store {name!r} after {timeout_s:g} s: is the application that owns it deployed?"
                raise LookupError(why) from None
            time.sleep(0.2)


class ParamFollower:
    """A reader's local copy of a store's params, refreshed by a long-polling daemon thread.

    ``current`` is a plain attribute read (no lock, no RPC) for the request path; ``on_update``
    turns the raw params into whatever the reader serves (e.g. a RewardWeights) once per version.
    """

    def __init__(self, store, reader_id: str, on_update: Callable[[dict], Any], poll_timeout_s: float = 5.0):
        self._store, self._reader_id, self._on_update = store, reader_id, on_update
        self._poll_timeout_s = poll_timeout_s
        snap = ray.get(store.get.remote())
        self._apply_lock = threading.Lock()  # apply() runs on the request thread and on the follower thread
        self.current: tuple[int, Any] = (snap.version, on_update(snap.params))
        self.last_contact = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"param-follower-{reader_id}", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        return self.current[0]

    @property
    def store(self):
        """The store this follower reads (for writers that also follow, e.g. a PUT endpoint)."""
        return self._store

    def apply(self, snap: Snapshot) -> None:
        """Adopt a snapshot now (e.g. the one this replica just wrote) if it is newer."""
        with self._apply_lock:
            if snap.version > self.current[0]:
                self.current = (snap.version, self._on_update(snap.params))

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                snap = ray.get(self._store.poll.remote(self._reader_id, self.current[0], self._poll_timeout_s))
                self.last_contact = time.monotonic()
                backoff = 0.1
                if snap is not None:
                    self.apply(snap)
            except Exception as e:  # store restarting or gone: keep serving the last params
                log.warning("param store unreachable or update not applied (%s); retrying in %.1fs", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def stop(self) -> None:
        self._stop.set()
