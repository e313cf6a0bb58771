"""POST /recommend and /feedback over real HTTP against a local Ray Serve (stage deployments
composed by DeploymentHandles, the inner-reward deployment scoring feedback)."""

import tempfile
import time
import uuid

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

import rust_ext
from actors.stages import StageContext, retrieval_relevance
from actors.world import PipelineConfig, World, WorldConfig
from serve_apps.recommend import app_builder

pytestmark = [pytest.mark.ray, pytest.mark.serve]
ARGS = {"world": {"n_items": 3000, "n_users": 500}, "pipeline": {"k_matching": 200, "k_pre_ranking": 30, "k_slate": 8}}


@pytest.fixture(scope="module")
def towers() -> StageContext:
    """The stages' towers (same world and seed as the app): the inner reward's relevance term."""
    return StageContext(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]).seed)


def tower_relevance(towers: StageContext, user: int, slate: list[int]) -> np.ndarray:
    return retrieval_relevance(towers, np.array([user]), np.array([slate]))[0]


@pytest.fixture(scope="module")
def client(serve_url):
    from ray import serve

    from serve_apps import inner_reward

    prefix = f"rec_test_{uuid.uuid4().hex[:8]}"
    serve.run(
        inner_reward.app_builder({"weights_store": f"{prefix}_inner"}), name="rec_test_inner", route_prefix="/rec_ir"
    )
    events = tempfile.mkdtemp(prefix="morl-events-test-")
    serve.run(
        app_builder(
            {
                **ARGS,
                "store_prefix": prefix,
                "inner_reward_app": "rec_test_inner",
                "telemetry": {"sink": "parquet", "path": events, "flush_interval_s": 0.01},
                "ranking_policy": "outer_controller",  # the held ranking weights until a policy is published
            }
        ),
        name="recommend_test",
        route_prefix="/rec",
    )
    with httpx.Client(base_url=f"{serve_url}/rec", timeout=60) as c:
        c.events_root, c.store_prefix = events, prefix
        yield c
    serve.delete("recommend_test")
    serve.delete("rec_test_inner")


def test_recommend_returns_a_slate_with_versions(client):
    r = client.post("/recommend", json={"user_id": 7, "history": [1, 2, 3], "step": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["slate"]) == 8 and len(set(body["slate"])) == 8
    assert all(0 <= i < 3000 for i in body["slate"])
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert set(body["versions"]) == {"matching", "pre_ranking", "ranking", "matching_index"}
    assert len(body["request_id"]) == 16


def test_per_request_weights_and_feedback_scored_by_inner_reward(client, towers):
    """/feedback's relevance term is the towers' similarity of the served items, not the ranker's p_click."""
    rec = client.post("/recommend", json={"user_id": 3, "ranking_weights": [0.0, 0.0, 1.0]}).json()
    clicked = [True] + [False] * 7
    dwell = [12.5] + [0.0] * 7
    skipped = [False] + [True] * 7
    fb = client.post(
        "/feedback", json={"request_id": rec["request_id"], "clicked": clicked, "dwell_s": dwell, "skipped": skipped}
    )
    assert fb.status_code == 200, fb.text
    expected = rust_ext.inner_reward_numpy(clicked, dwell, skipped, tower_relevance(towers, 3, rec["slate"]))
    np.testing.assert_allclose(fb.json()["rewards"], expected, atol=1e-5)
    by_p_click = rust_ext.inner_reward_numpy(clicked, dwell, skipped, rec["predictions"]["p_click"])
    assert not np.allclose(fb.json()["rewards"], by_p_click, atol=1e-3)
    assert fb.json()["total"] == pytest.approx(float(expected.sum()), abs=1e-4)


@pytest.mark.parametrize(
    "body, loc, msg",
    [
        ({"user_id": 500}, "body.user_id", "unknown user_id 500"),
        ({"user_id": -1}, "body.user_id", "greater than or equal to 0"),
        ({"user_id": 1, "history": [5, 99999]}, "body.history.1", "unknown item id 99999"),
        ({"user_id": 1, "ranking_weights": [1, 2]}, "body.ranking_weights", "at least 3"),
        ({"user_id": 1, "ranking_weights": [1, -2, 0]}, "body.ranking_weights.1", "greater than or equal to 0"),
        ({"user": 1}, "body.user", "Extra inputs"),
        ({"user_id": 1, "history": [10**30]}, "body.history.0", "less than or equal"),
        ({"user_id": 1, "step": 2**31}, "body.step", "less than or equal"),
        ({"user_id": 1, "ranking_weights": [1e39, 0, 0]}, "body.ranking_weights.0", "less than or equal"),
    ],
)
def test_bad_recommend_requests_get_422(client, body, loc, msg):
    r = client.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    assert any(loc in ".".join(map(str, d["loc"])) and msg in d["msg"] for d in r.json()["detail"]), r.json()


def test_bad_feedback(client):
    r = client.post("/feedback", json={"request_id": "ffff", "clicked": [], "dwell_s": [], "skipped": []})
    assert r.status_code == 404 and "unknown or expired request_id" in r.text
    rec = client.post("/recommend", json={"user_id": 2}).json()
    r = client.post(
        "/feedback", json={"request_id": rec["request_id"], "clicked": [True], "dwell_s": [1.0], "skipped": [False]}
    )
    assert r.status_code == 422 and "the slate had 8 items but clicked has 1" in r.text
    r = client.post(
        "/feedback",
        json={"request_id": rec["request_id"], "clicked": [False] * 8, "dwell_s": [1e39] * 8, "skipped": [False] * 8},
    )
    assert r.status_code == 422, r.text


def test_stage_params_hot_update(client):
    before = client.get("/stages").json()
    params = {"w_click": 0.0, "w_long_view": 0.0, "w_purchase": 1.0}
    r = client.put("/stages/ranking/params", json={"params": params, "expected_version": before["ranking"]["version"]})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before["ranking"]["version"] + 1
    assert r.json()["readers_acked"] == r.json()["readers_live"]
    rec = client.post("/recommend", json={"user_id": 4}).json()
    assert rec["versions"]["ranking"] == before["ranking"]["version"] + 1
    assert client.put("/stages/ranking/params", json={"params": {"w_click": 1.0}}).status_code == 422
    assert client.put("/stages/reranking/params", json={"params": params}).status_code == 404
    stale = client.put("/stages/ranking/params", json={"params": params, "expected_version": 1})
    assert stale.status_code == 409
    huge = client.put(
        "/stages/matching/params",
        json={"params": {"w_relevance": 1e39, "w_popularity": 0.0, "w_history": 0.0, "exploration": 0.0}},
    )
    assert huge.status_code == 422, huge.text
    assert client.post("/recommend", json={"user_id": 4}).status_code == 200


def test_feedback_emits_served_item_events_that_sessionise(client, towers):
    from actors.telemetry import read_parquet_events, sessionise

    before = client.get("/telemetry").json()["emitted"]
    request_ids, slates, p_clicks = [], [], []
    for step in range(3):
        rec = client.post("/recommend", json={"user_id": 11, "step": step}).json()
        request_ids.append(rec["request_id"])
        slates.append(rec["slate"])
        p_clicks.append(rec["predictions"]["p_click"])
        fb = client.post(
            "/feedback",
            json={
                "request_id": rec["request_id"],
                "clicked": [True] + [False] * 7,
                "dwell_s": [20.0] + [0.0] * 7,
                "skipped": [False] + [True] * 7,
                "purchased": [True] + [False] * 7,
                "revenue": [9.5] + [0.0] * 7,
            },
        )
        assert fb.status_code == 200, fb.text
    stats = client.get("/telemetry").json()
    assert stats["sink"] == "ParquetSink" and stats["emitted"] == before + 24 and stats["dropped"] == 0
    deadline = time.time() + 10
    while time.time() < deadline and client.get("/telemetry").json()["flushed"] < stats["emitted"]:
        time.sleep(0.05)
    events = read_parquet_events(client.events_root)
    mine = events.filter(pa.compute.equal(events["user_id"], 11))
    assert mine.num_rows == 24 and mine["revenue"].to_numpy().sum() == pytest.approx(28.5)
    # relevance = the towers' similarity of the served items; the prediction stays logged as p_click
    mine = mine.sort_by([("ts", "ascending"), ("position", "ascending")])
    assert mine["request_id"].to_pylist() == [r for r in request_ids for _ in range(8)]
    assert mine["item_id"].to_pylist() == [i for s in slates for i in s]
    np.testing.assert_allclose(
        mine["relevance"].to_numpy(), np.concatenate([tower_relevance(towers, 11, s) for s in slates]), atol=1e-6
    )
    np.testing.assert_allclose(mine["p_click"].to_numpy(), np.concatenate(p_clicks), atol=1e-5)
    traj = sessionise(mine)
    assert traj.num_rows == 1 and traj["request_ids"].to_pylist()[0] == request_ids
    assert traj["session_revenue"].to_pylist() == [pytest.approx(28.5)]


def test_the_outer_controller_policy_serves_hot_and_rolls_back(client):
    """A published outer-controller policy reaches the replicas by a versioned hot update: a request without
    weights is ranked with μ(s) on its own context (the in-process cascade with those weights serves the same
    slate), the response and the events name the policy and its version; a rollback restores the held weights."""
    import ray

    from actors.cascade import Pipeline
    from actors.served_policies import RankingPolicy, outer_controller_store, publish_outer_controller
    from actors.stages import RANKING_ACTION_HIGH, RequestBatch

    held = client.post("/recommend", json={"user_id": 3}).json()
    assert held["ranking_policy"] == {"name": "held", "version": held["versions"]["ranking"]}
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    rng = np.random.default_rng(0)
    state = {"0.weight": rng.normal(0, 1.0, (8, pipeline.spec.context_dim)), "0.bias": rng.normal(0, 1.0, 8)}
    state |= {"2.weight": rng.normal(0, 3.0, (2, 8)), "2.bias": np.zeros(2)}
    ack = publish_outer_controller(client.store_prefix, state, RANKING_ACTION_HIGH, max_logit=6.0)
    policy = RankingPolicy(ray.get(outer_controller_store(client.store_prefix).get.remote()).params)
    served = []
    for user, step, clicks in ((3, 2, 1), (4, 0, 0), (5, 5, 3)):
        body = client.post("/recommend", json={"user_id": user, "step": step, "clicks": clicks}).json()
        assert body["ranking_policy"] == {"name": "outer_controller", "version": ack["version"]}
        assert body["versions"]["outer_controller"] == ack["version"]
        req = RequestBatch(
            np.array([user]), np.full((1, 20), -1), np.array([step]), np.array([clicks]), int(body["request_id"], 16)
        )
        weights = policy(pipeline.context(req))[0]
        served.append(weights)
        assert body["slate"] == pipeline.recommend(req, params={"ranking": weights}).slate[0].tolist()
    assert np.ptp(np.stack(served), axis=0).max() > 0.1, "μ(s) depends on the request's context"

    fb = client.post(
        "/feedback",
        json={"request_id": body["request_id"], "clicked": [False] * 8, "dwell_s": [0.0] * 8, "skipped": [True] * 8},
    )
    assert fb.status_code == 200, fb.text
    deadline = time.time() + 10
    while (
        time.time() < deadline
        and client.get("/telemetry").json()["flushed"] < client.get("/telemetry").json()["emitted"]
    ):
        time.sleep(0.05)
    from actors.telemetry import read_parquet_events

    events = read_parquet_events(client.events_root)
    mine = events.filter(pa.compute.equal(events["request_id"], body["request_id"]))
    assert set(mine["ranking_policy"].to_pylist()) == {"outer_controller"}
    assert set(mine["ranking_policy_version"].to_pylist()) == {ack["version"]}

    ray.get(outer_controller_store(client.store_prefix).rollback.remote())  # back to no policy: the held weights
    deadline = time.monotonic() + 30
    while client.post("/recommend", json={"user_id": 3}).json()["ranking_policy"]["name"] != "held":
        assert time.monotonic() < deadline, "the rollback never reached the replicas"
        time.sleep(0.2)


def test_a_ranking_stage_policy_is_named_as_the_weights_source(client):
    """With nothing else choosing the ranking weights, UNEX-RL's ranking-stage policy does, and the response
    says so (``stage_policy`` at its version), not ``held``."""
    from actors.cascade import Pipeline
    from actors.served_policies import publish_stage_policy
    from actors.stages import STAGE_ACTION_HIGH

    assert client.post("/recommend", json={"user_id": 3}).json()["ranking_policy"]["name"] == "held"

    dim = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"])).spec.dim
    rng = np.random.default_rng(1)
    state = {"0.weight": rng.normal(0, 0.3, (8, dim)), "0.bias": np.zeros(8), "2.weight": rng.normal(0, 0.5, (3, 8))}
    state["2.bias"] = np.zeros(3)
    ack = publish_stage_policy(client.store_prefix, "ranking", state, STAGE_ACTION_HIGH["ranking"])
    try:
        body = client.post("/recommend", json={"user_id": 3}).json()
        assert body["versions"]["ranking_policy"] == ack["version"]
        assert body["ranking_policy"] == {"name": "stage_policy", "version": ack["version"]}
    finally:
        publish_stage_policy(client.store_prefix, "ranking", None)
