"""The versioned parameter store: versions, optimistic concurrency, followers, snapshots."""

import time
import uuid

import pytest
import ray

from actors.param_store import ParamFollower, VersionConflict, VersionedParamStore

pytestmark = pytest.mark.ray


def test_put_bumps_version_and_followers_ack(ray_session):
    store = VersionedParamStore.remote({"a": 1})
    followers = [ParamFollower(store, f"r{i}", dict, poll_timeout_s=1.0) for i in range(3)]
    try:
        time.sleep(0.3)  # followers register with their first poll
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
    path = str(tmp_path / f"params-{uuid.uuid4().hex}.json")
    store = VersionedParamStore.remote({"a": 1}, snapshot_path=path)
    ray.get(store.put.remote({"a": 5}))
    ray.kill(store)
    revived = VersionedParamStore.remote({"a": 1}, snapshot_path=path)
    snap = ray.get(revived.get.remote())
    assert (snap.version, snap.params) == (2, {"a": 5})
    assert not list(tmp_path.glob("*.tmp-*")), "no half-written snapshot left behind"
