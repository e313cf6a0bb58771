"""The versioned parameter store: versions, optimistic concurrency, followers, snapshots."""

import json
import time
import uuid

import pytest
import ray

from actors.param_store import (
    NothingToRollBack,
    ParamFollower,
    VersionConflict,
    VersionedParamStore,
    get_or_create_store,
)
from tests.conftest import readers_registered

pytestmark = pytest.mark.ray


def test_put_bumps_version_and_followers_ack(ray_session):
    store = VersionedParamStore.remote({"a": 1})
    followers = [ParamFollower(store, f"r{i}", dict, poll_timeout_s=1.0) for i in range(3)]
    try:
        readers_registered(store, ["r0", "r1", "r2"])
        ack = ray.get(store.put.remote({"a": 2}))
        assert ack == {"version": 2, "readers_acked": 3, "readers_live": 3}
        assert all(f.current == (2, {"a": 2}) for f in followers)
    finally:
        for f in followers:
            f.stop()


def test_expected_version_conflict(ray_session):
    store = VersionedParamStore.remote({"a": 1})
    ray.get(store.put.remote({"a": 2}, expected_version=1))
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(store.put.remote({"a": 3}, expected_version=1))
    assert isinstance(err.value.cause, VersionConflict)
    assert ray.get(store.get.remote()).params == {"a": 2}


def test_snapshot_survives_a_store_restart(ray_session, tmp_path):
    path = str(tmp_path / "serving" / f"params-{uuid.uuid4().hex}.json")  # a folder a fresh volume lacks
    store = VersionedParamStore.remote({"a": 1}, snapshot_path=path)
    ray.get(store.put.remote({"a": 5}))
    ray.kill(store)
    revived = VersionedParamStore.remote({"a": 1}, snapshot_path=path)
    snap = ray.get(revived.get.remote())
    assert (snap.version, snap.params) == (2, {"a": 5})
    back = ray.get(revived.rollback.remote())  # the rollback history survives the restart too
    assert (back["version"], back["restored_version"], back["params"]) == (3, 1, {"a": 1})
    assert not list(tmp_path.glob("serving/*.tmp-*")), "no half-written snapshot left behind"


def test_every_change_is_audited_newest_first_and_the_log_survives_a_restart(ray_session, tmp_path):
    path = str(tmp_path / f"audited-{uuid.uuid4().hex}.json")
    store = VersionedParamStore.remote({"a": 1}, snapshot_path=path)
    ray.get(store.put.remote({"a": 2}, meta={"who": "ana", "version": 99}))  # meta never overrides the entry
    ray.get(store.rollback.remote(meta={"who": "monitor"}))
    ray.kill(store)
    revived = VersionedParamStore.remote({"a": 1}, snapshot_path=path)
    audit = ray.get(revived.audit.remote())
    assert [(e["version"], e["from_version"], e["action"], e["who"]) for e in audit] == [
        (3, 2, "rollback", "monitor"),
        (2, 1, "put", "ana"),
    ]
    assert (audit[1]["from"], audit[1]["to"], audit[0]["to"], audit[0]["restored_version"]) == (
        {"a": 1},
        {"a": 2},
        {"a": 1},
        1,
    )
    assert audit[1]["at"] <= audit[0]["at"] <= time.time()
    assert ray.get(revived.audit.remote(limit=1)) == audit[:1]


def test_a_snapshot_folder_gives_every_new_store_a_snapshot(ray_session, tmp_path, monkeypatch):
    """MORL_STORE_SNAPSHOTS: the stores an app creates without a snapshot_path get one there (and so restart)."""
    from actors.param_store import SNAPSHOT_DIR_ENV

    monkeypatch.setenv(SNAPSHOT_DIR_ENV, str(tmp_path))
    name = f"snapdir-{uuid.uuid4().hex[:8]}"
    store = get_or_create_store(name, {"a": 1})
    try:
        ray.get(store.put.remote({"a": 2}))
        saved = json.loads((tmp_path / f"morl.{name}.json").read_text())
        assert (saved["version"], saved["params"]) == (2, {"a": 2})
    finally:
        ray.kill(store, no_restart=True)


def caught_up(follower: ParamFollower, expected, timeout_s: float = 30.0) -> bool:
    """The follower holds ``expected`` now, or within ``timeout_s``: an ack may time out under load (the
    store then answers without it), and the follower catches up on its next poll. 30 s: with two test
    workers, each with its own Ray, on two cores, a follower's poll once took over 10 s to return."""
    deadline = time.monotonic() + timeout_s
    while follower.current != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    if follower.current != expected:  # what a flake leaves to go on
        since = time.monotonic() - follower.last_contact
        print(f"follower holds {follower.current}, not {expected}; last contact with its store {since:.1f} s ago")
    return follower.current == expected


def test_rollback_restores_earlier_versions_as_new_ones(ray_session):
    store = VersionedParamStore.remote({"a": 1})
    follower = ParamFollower(store, "r", dict, poll_timeout_s=1.0)
    try:
        ray.get(store.put.remote({"a": 2}))  # one after the other: an async actor need not run two calls in order
        ray.get(store.put.remote({"a": 3}))
        ack = ray.get(store.rollback.remote(expected_version=3))
        assert (ack["version"], ack["restored_version"]) == (4, 2) and caught_up(follower, (4, {"a": 2}))
        ack = ray.get(store.rollback.remote())  # one further back
        assert (ack["version"], ack["restored_version"]) == (5, 1) and caught_up(follower, (5, {"a": 1}))
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(store.rollback.remote())
        assert isinstance(err.value.cause, NothingToRollBack)
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(store.rollback.remote(expected_version=4))
        assert isinstance(err.value.cause, VersionConflict)
        assert ray.get(store.get.remote()).params == {"a": 1}
    finally:
        follower.stop()


def test_a_killed_store_restarts_at_its_last_version_while_followers_keep_serving(ray_session, tmp_path):
    """Chaos: the store's process dies. Followers serve their last params through the outage; Ray restarts the
    store behind the same handle, from its snapshot, and a write after the restart reaches the followers."""
    import os

    restarting = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError)

    def retried(call, timeout_s=60.0):
        """A caller's retry: a call that meets the restart fails and is sent again."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(call(), timeout=10)
            except restarting:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    name = f"chaos-{uuid.uuid4().hex[:8]}"
    store = get_or_create_store(name, {"a": 1}, snapshot_path=str(tmp_path / f"{name}.json"))  # as the apps make it
    ray.get(store.put.remote({"a": 5}))
    follower = ParamFollower(store, "r0", dict, poll_timeout_s=0.5)
    pid = ray.get(store.__ray_call__.remote(lambda _: os.getpid()))
    try:
        assert follower.current == (2, {"a": 5})
        ray.kill(store, no_restart=False)  # the process dies; Ray restarts it
        assert follower.current == (2, {"a": 5})  # serving keeps its params through the outage
        deadline = time.monotonic() + 60
        while retried(lambda: store.__ray_call__.remote(lambda _: os.getpid())) == pid:
            assert time.monotonic() < deadline, "the store was not restarted"
            time.sleep(0.2)
        snap = retried(store.get.remote)
        assert (snap.version, snap.params) == (2, {"a": 5}), "back at its last version, from the snapshot"
        retried(lambda: store.put.remote({"a": 7}, expected_version=2, ack_timeout_s=5.0))
        deadline = time.monotonic() + 30
        while follower.current != (3, {"a": 7}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert follower.current == (3, {"a": 7}), "the follower re-polls the restarted store"
    finally:
        follower.stop()
        ray.kill(store, no_restart=True)


def test_a_store_without_a_snapshot_is_not_restarted(ray_session):
    """Restarted at version 1, below what its followers hold, it would take writes they ignore: it stays dead, and
    a write fails loudly instead."""
    store = get_or_create_store(f"nosnap-{uuid.uuid4().hex[:8]}", {"a": 1})
    ray.get(store.put.remote({"a": 2}))
    ray.kill(store, no_restart=False)
    with pytest.raises(ray.exceptions.ActorDiedError):  # died for good, not "unavailable" while restarting
        for _ in range(50):
            try:
                ray.get(store.put.remote({"a": 3}), timeout=10)
            except ray.exceptions.ActorUnavailableError:
                pass
            time.sleep(0.1)
