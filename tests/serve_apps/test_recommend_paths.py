"""The recommend app's two serving paths over real HTTP: the fused cascade (the ingress replica runs the three
stages) and the composed one (three stage deployments by DeploymentHandles) serve the in-process cascade's
slate for the same request; every response says where its time went; a catalogue update swaps matching's
approximate index under live traffic without a failed request; bad snapshots are refused, naming the field."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from actors.cascade import Pipeline
from actors.matching_index import MatchingIndex
from actors.stages import RequestBatch
from actors.world import PipelineConfig, World, WorldConfig
from serve_apps.recommend import app_builder

pytestmark = [pytest.mark.ray, pytest.mark.serve]
WORLD = {"n_items": 3000, "n_users": 300}
PIPE = {"k_matching": 200, "k_pre_ranking": 30, "k_slate": 8}
IVF_PIPE = {**PIPE, "matching_index": "ivf"}


def deploy(serve_url, name: str, **args):
    from ray import serve

    prefix = f"{name}_{uuid.uuid4().hex[:8]}"
    serve.run(
        app_builder({"world": WORLD, "pipeline": PIPE, "store_prefix": prefix, "telemetry": {"sink": "off"}, **args}),
        name=name,
        route_prefix=f"/{name}",
    )
    return httpx.Client(base_url=f"{serve_url}/{name}", timeout=60)


@pytest.fixture(scope="module")
def apps(serve_url):
    """The fused app scores /feedback in its replica on an inner-reward app's weights (and never calls that app:
    "absent") and micro-batches its stages (``micro_batch``); the composed and IVF apps use the defaults (the
    default fused path is tested in test_recommend_app.py). A deploy costs seconds: one of each."""
    from ray import serve

    from serve_apps import inner_reward

    store = f"paths_inner_{uuid.uuid4().hex[:8]}"
    serve.run(inner_reward.app_builder({"weights_store": store}), name="paths_inner", route_prefix="/paths_ir")
    clients = {
        "inner_reward": httpx.Client(base_url=f"{serve_url}/paths_ir", timeout=60),
        "fused": deploy(
            serve_url, "rec_fused", inner_reward_weights_store=store, inner_reward_app="absent", micro_batch=8
        ),
        "composed": deploy(serve_url, "rec_composed", cascade="composed"),
        "ivf": deploy(serve_url, "rec_ivf", pipeline=IVF_PIPE),
    }
    yield clients
    for client in clients.values():
        client.close()
    for name in ("rec_fused", "rec_composed", "rec_ivf", "paths_inner"):
        serve.delete(name)


def timings(response: httpx.Response) -> dict[str, float]:
    """server-timing's metrics: name → dur (ms), or desc (a count: ``<stage>_batch``)."""
    metrics = [
        m.strip().replace(";desc=", ";dur=").split(";dur=") for m in response.headers["server-timing"].split(",")
    ]
    return {name: float(value) for name, value in metrics}


def in_process(body: dict, response: dict, pipeline: Pipeline) -> np.ndarray:
    """The in-process cascade's slate for the request the app served (its request id keys the randomness)."""
    history = np.full((1, 20), -1, np.int64)
    history[0, 20 - len(body.get("history", [])) :] = body.get("history", [])
    req = RequestBatch(
        np.array([body["user_id"]]),
        history,
        np.array([body.get("step", 0)], np.int32),
        np.array([0], np.int32),
        int(response["request_id"], 16),
    )
    params = {"ranking": np.asarray(body["ranking_weights"], np.float32)} if "ranking_weights" in body else None
    return pipeline.recommend(req, params).slate[0]


@pytest.mark.parametrize("path", ["fused", "composed"])
def test_both_paths_serve_the_in_process_cascade(apps, path):
    pipeline = Pipeline(World(WorldConfig.preset("default", **WORLD)), PipelineConfig(**PIPE))
    bodies = [
        {"user_id": 7, "history": [1, 2, 3], "step": 2},
        {"user_id": 250, "ranking_weights": [0.0, 1.0, 5.0]},
        {"user_id": 0},
    ]
    for body in bodies:
        r = apps[path].post("/recommend", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["slate"], in_process(body, r.json(), pipeline))
        assert r.json()["versions"]["matching_index"] == 1


def test_micro_batched_requests_get_the_slates_they_get_alone(apps):
    """Concurrent requests to the micro-batching fused app: stage calls that were waiting together ran as one
    batch (``<stage>_batch`` in server-timing), yet each request's slate is the in-process cascade's for it."""
    pipeline = Pipeline(World(WorldConfig.preset("default", **WORLD)), PipelineConfig(**PIPE))
    bodies = [
        {"user_id": u, "history": [u, u + 1]} | ({"ranking_weights": [0.0, 1.0, 5.0]} if u % 3 == 0 else {})
        for u in range(48)
    ]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: apps["fused"].post("/recommend", json=b), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:1]
    for body, r in zip(bodies, responses):
        np.testing.assert_array_equal(r.json()["slate"], in_process(body, r.json(), pipeline))
    batches = [timings(r).get("matching_batch", 1.0) for r in responses]
    assert max(batches) > 1, "no two requests ever ran matching together"


@pytest.mark.parametrize("path, hops", [("fused", False), ("composed", True)])
def test_server_timing_names_where_the_time_went(apps, path, hops):
    r = apps[path].post("/recommend", json={"user_id": 3})
    t = timings(r)
    assert {"matching", "pre_ranking", "ranking", "app"} <= set(t)
    assert all(f"{s}_hop" in t for s in ("matching", "pre_ranking", "ranking")) == hops
    assert 0 < t["matching"] + t["pre_ranking"] + t["ranking"] <= t["app"]
    assert apps[path].get("/matching/index").json()["kind"] == "exact"


def test_a_catalogue_update_swaps_the_index_under_live_traffic(apps, tmp_path):
    client = apps["ivf"]
    before = client.get("/matching/index").json()
    assert before["kind"] == "ivf" and before["calibrated_recall"] >= 0.95 and before["source"] is None
    world = World(WorldConfig.preset("default", **WORLD))
    pipeline = Pipeline(world, PipelineConfig(**IVF_PIPE))
    rng = np.random.default_rng(0)
    towers = pipeline.ctx.item_tower[rng.permutation(WORLD["n_items"])]  # a "retrained" tower: other embeddings
    snapshot = str(tmp_path / "catalogue.npz")
    np.savez(snapshot, item_tower=towers, popularity=pipeline.ctx.popularity)

    statuses, stop = [], threading.Event()

    def traffic():
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post("/recommend", json={"user_id": int(rng.integers(300))}).status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        r = client.put("/matching/index", json={"path": snapshot, "expected_version": before["version"]})
    finally:
        stop.set()
        thread.join()
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before["version"] + 1 and r.json()["all_acked"]
    assert len(statuses) > 0 and set(statuses) == {200}
    after = client.get("/matching/index").json()
    assert after["version"] == before["version"] + 1 and after["source"] == snapshot

    body = {"user_id": 11, "history": [5, 6]}
    served = client.post("/recommend", json=body).json()
    assert served["versions"]["matching_index"] == after["version"]
    pipeline.ctx.index = MatchingIndex.for_config(
        pipeline.ctx, pipeline.config, arrays=(towers, pipeline.ctx.popularity)
    )
    np.testing.assert_array_equal(served["slate"], in_process(body, served, pipeline))

    back = client.put("/matching/index", json={"path": None})  # back to the world's own towers
    assert back.status_code == 200 and client.get("/matching/index").json()["source"] is None


@pytest.mark.parametrize(
    "arrays, body, status, msg",
    [
        (None, {"path": "/nonexistent/catalogue.npz"}, 422, "cannot read catalogue snapshot"),
        ({"npy": np.ones((3000, 16))}, None, 422, "not an .npz archive"),
        ({"item_tower": np.ones((10, 16))}, None, 422, "missing array"),
        ({"item_tower": np.ones((3000, 8)), "popularity": np.zeros(3000)}, None, 422, "item_tower must have shape"),
        ({"item_tower": np.full((3000, 16), np.inf), "popularity": np.zeros(3000)}, None, 422, "must be finite"),
        (None, {"path": None, "expected_version": 10**6}, 409, "expected_version"),
        (None, {"path": None, "extra": 1}, 422, "Extra inputs"),
        (None, {}, 422, "Field required"),
    ],
)
def test_bad_catalogue_updates_are_refused_and_change_nothing(apps, tmp_path, arrays, body, status, msg):
    client = apps["ivf"]
    if arrays is not None and "npy" in arrays:
        np.save(tmp_path / "bad.npy", arrays["npy"])
        body = {"path": str(tmp_path / "bad.npy")}
    elif arrays is not None:
        np.savez(tmp_path / "bad.npz", **arrays)
        body = {"path": str(tmp_path / "bad.npz")}
    before = client.get("/matching/index").json()
    r = client.put("/matching/index", json=body)
    assert r.status_code == status, r.text
    assert msg.lower() in r.text.lower()
    assert client.get("/matching/index").json() == before
    assert client.post("/recommend", json={"user_id": 1}).status_code == 200


def test_feedback_is_scored_in_the_replica_on_the_inner_reward_apps_weights(apps):
    """With ``inner_reward_weights_store`` /feedback runs the kernel in the recommend replica, on the weights the
    inner-reward app serves: a PUT /weights there reaches both, acknowledged by both."""
    client, ir = apps["fused"], apps["inner_reward"]
    rec = client.post("/recommend", json={"user_id": 5}).json()
    n = len(rec["slate"])
    feedback = {
        "request_id": rec["request_id"],
        "clicked": [True] + [False] * (n - 1),
        "dwell_s": [30.0] + [0.0] * (n - 1),
        "skipped": [False] * n,
    }
    before = client.post("/feedback", json=feedback)
    assert before.status_code == 200, before.text  # the inner-reward app is never called ("absent")
    weights = ir.get("/weights").json()
    assert before.json()["weights_version"] == weights["version"]
    put = ir.put("/weights", json={**weights["weights"], "click_w": 2.0, "expected_version": weights["version"]})
    assert put.status_code == 200 and put.json()["readers_acked"] == put.json()["readers_live"] == 2
    after = client.post("/feedback", json=feedback).json()
    assert after["weights_version"] == weights["version"] + 1
    assert after["rewards"][0] == pytest.approx(before.json()["rewards"][0] + 1.0, abs=1e-4)
