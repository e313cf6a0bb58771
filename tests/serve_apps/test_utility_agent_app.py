"""The utility-weight agent in the Serve request path, over real HTTP: the agent's choice per
request, the operating-point switch seen by every replica, validation of λ and weights, the
frontier artifact, and exploration logging (uniform actions with propensities) through /feedback."""

import json
import time
import uuid

import httpx
import numpy as np
import pyarrow.compute  # noqa: F401
import pytest
import torch

from actors.cascade import Pipeline
from actors.stages import RequestBatch
from actors.world import PipelineConfig, World, WorldConfig
from serve_apps.recommend import app_builder
from tests.agent_helpers import random_agent

pytestmark = [pytest.mark.ray, pytest.mark.serve]
ARGS = {"world": {"n_items": 3000, "n_users": 500}, "pipeline": {"k_matching": 200, "k_pre_ranking": 30, "k_slate": 8}}


@pytest.fixture(scope="module")
def inner_app(serve_url):
    """One inner-reward app every recommend app here scores its feedback on (a deploy costs seconds)."""
    from ray import serve

    from serve_apps import inner_reward

    serve.run(
        inner_reward.app_builder({"weights_store": f"ua_inner_{uuid.uuid4().hex[:8]}"}),
        name="ua_inner",
        route_prefix="/ua_ir",
    )
    yield "ua_inner"
    serve.delete("ua_inner")


def _deploy(name, route, tmp, agent_cfg, **args):
    from ray import serve

    prefix = f"{name}_{uuid.uuid4().hex[:8]}"
    events = str(tmp / "events")
    serve.run(
        app_builder(
            {
                **ARGS,
                "store_prefix": prefix,
                "inner_reward_app": "ua_inner",
                "utility_agent": agent_cfg,
                "telemetry": {"sink": "parquet", "path": events, "flush_interval_s": 0.01},
                **args,
            }
        ),
        name=name,
        route_prefix=route,
    )
    return events


@pytest.fixture(scope="module")
def agent_app(serve_url, inner_app, tmp_path_factory):
    from ray import serve

    from rllib_policies.utility_agent.pareto import write_frontier

    tmp = tmp_path_factory.mktemp("agent_app")
    path, module = random_agent(str(tmp / "agent.pt"))
    frontier = write_frontier(str(tmp / "frontier.json"), [{"lambda": 0.0}, {"lambda": 1.0}], {"note": "test"})
    _deploy(
        "ua_test",
        "/ua",
        tmp,
        {
            "mode": "agent",
            "path": path,
            "frontier": str(tmp / "frontier.json"),
            "placement": "deployment",
            "num_replicas": 2,
            "timeout_s": 30,  # the agent's choice is under test, not the fallback: 0.5 s can pass on a loaded CI
        },
    )
    with httpx.Client(base_url=f"{serve_url}/ua", timeout=60) as c:
        c.module, c.frontier = module, frontier
        yield c
    serve.delete("ua_test")


@pytest.fixture(scope="module")
def agent_in_replica(serve_url, inner_app, tmp_path_factory):
    """The same agent answering inside the fused recommend replica (placement "replica", the fused default), which
    micro-batches its cascade (the agent's choice is then settled before matching)."""
    from ray import serve

    tmp = tmp_path_factory.mktemp("agent_in_replica")
    path, module = random_agent(str(tmp / "agent.pt"))
    _deploy("ua_local", "/ual", tmp, {"mode": "agent", "path": path}, micro_batch=4)
    with httpx.Client(base_url=f"{serve_url}/ual", timeout=60) as c:
        c.module = module
        yield c
    serve.delete("ua_local")


def test_the_agent_in_the_replica_chooses_as_the_deployment_does(agent_in_replica):
    body = {"user_id": 11, "history": [3, 4, 5], "step": 2, "clicks": 1}
    r = agent_in_replica.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    u = r.json()["utility"]
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    hist = np.full((1, 20), -1)
    hist[0, -3:] = [3, 4, 5]
    obs = pipeline.context(RequestBatch(np.array([11]), hist, np.array([2], np.int32), np.array([1])))
    with torch.no_grad():
        expected = int(agent_in_replica.module.act(torch.as_tensor(obs), 0.5)[0])
    assert u["action"] == expected and u["lambda"] == 0.5 and r.json()["ranking_policy"]["name"] == "utility_agent"
    assert "agent;dur=" in r.headers["server-timing"] and "matching_batch;desc=1" in r.headers["server-timing"]
    req = RequestBatch(np.array([11]), hist, np.array([2], np.int32), np.array([1]), int(r.json()["request_id"], 16))
    served = pipeline.recommend(req, {"ranking": np.asarray(u["weights"], np.float32)}).slate[0]
    np.testing.assert_array_equal(r.json()["slate"], served)  # ranked with the agent's weights
    r = agent_in_replica.put("/operating-point", json={"lambda": 1.0})
    assert r.status_code == 200 and r.json()["readers_acked"] == r.json()["readers_live"] == 1
    assert agent_in_replica.post("/recommend", json=body).json()["utility"]["lambda"] == 1.0


@pytest.mark.parametrize(
    "cfg, msg",
    [
        ({"mode": "explore", "placement": "nearby"}, "placement must be 'replica' or 'deployment'"),
        ({"mode": "explore", "placement": "replica", "num_replicas": 2}, "takes no num_replicas"),
    ],
)
def test_bad_agent_placement_is_refused(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        app_builder({**ARGS, "utility_agent": cfg})
    with pytest.raises(ValueError, match="needs cascade 'fused'"):
        app_builder({**ARGS, "cascade": "composed", "utility_agent": {"mode": "explore", "placement": "replica"}})


def test_requests_without_weights_get_the_agents_choice(agent_app):
    body = {"user_id": 11, "history": [3, 4, 5], "step": 2, "clicks": 1}
    r = agent_app.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    u = r.json()["utility"]
    assert u["mode"] == "agent" and 0 <= u["action"] < 49 and u["propensity"] == 1.0
    # the same features and argmax as the module on this machine
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    hist = np.full((1, 20), -1)
    hist[0, -3:] = [3, 4, 5]
    obs = pipeline.context(RequestBatch(np.array([11]), hist, np.array([2], np.int32), np.array([1])))
    op = agent_app.get("/operating-point").json()
    with torch.no_grad():
        expected = int(agent_app.module.act(torch.as_tensor(obs), op["lambda"])[0])
    assert u["action"] == expected and u["lambda"] == op["lambda"]
    np.testing.assert_allclose(u["weights"], agent_app.module.grid[expected].numpy())
    fixed = agent_app.post("/recommend", json={"user_id": 11, "ranking_weights": [1, 0, 0]}).json()
    assert fixed["utility"] is None


def test_operating_point_switch_is_seen_by_every_replica(agent_app):
    from ray import serve

    before = agent_app.get("/operating-point").json()
    r = agent_app.put("/operating-point", json={"lambda": 0.9})
    assert r.status_code == 200, r.text
    ack = r.json()
    assert ack["version"] == before["version"] + 1 and ack["readers_live"] == 2 and ack["readers_acked"] == 2
    handle = serve.get_deployment_handle("UtilityAgentDeployment", app_name="ua_test")
    seen = {}
    deadline = time.time() + 30
    while len(seen) < 2 and time.time() < deadline:
        state = handle.replica_state.remote().result()
        seen[state["replica"]] = state
    assert len(seen) == 2
    assert all(
        s["operating_point_version"] == ack["version"] and s["operating_point"]["lambda"] == 0.9 for s in seen.values()
    )
    for _ in range(4):
        u = agent_app.post("/recommend", json={"user_id": 5}).json()["utility"]
        assert u["lambda"] == 0.9 and u["operating_point_version"] == ack["version"]
    # a fixed global weight vector as the operating point
    assert agent_app.put("/operating-point", json={"weights": [1.0, 0.5, 10.0]}).status_code == 200
    u = agent_app.post("/recommend", json={"user_id": 5}).json()["utility"]
    assert u["weights"] == [1.0, 0.5, 10.0] and u["action"] == -1 and u["lambda"] is None
    assert agent_app.put("/operating-point", json={"lambda": 0.5}).status_code == 200


def test_the_do_no_harm_fallback_is_served_where_it_engaged(agent_app):
    """agent.pt's guard fell back to global action 7 at λ 0.75: λ near it serves action 7 to every
    user; λ 1 (π_λ kept) serves the agent's own per-request choice."""
    assert agent_app.put("/operating-point", json={"lambda": 0.7}).status_code == 200
    users = range(20, 28)
    fallback = [agent_app.post("/recommend", json={"user_id": u}).json()["utility"] for u in users]
    assert all(u["action"] == 7 and u["lambda"] == 0.7 for u in fallback), fallback
    np.testing.assert_allclose(fallback[0]["weights"], agent_app.module.grid[7].numpy())
    assert agent_app.put("/operating-point", json={"lambda": 1.0}).status_code == 200
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    obs = pipeline.context(
        RequestBatch(np.array(list(users)), np.full((8, 20), -1), np.zeros(8, np.int32), np.zeros(8, np.int32))
    )
    with torch.no_grad():
        expected = agent_app.module.greedy(torch.as_tensor(obs), 1.0).numpy()
    served = [agent_app.post("/recommend", json={"user_id": u}).json()["utility"]["action"] for u in users]
    assert served == expected.tolist()
    assert agent_app.put("/operating-point", json={"lambda": 0.5}).status_code == 200


@pytest.mark.parametrize(
    "body, status, loc",
    [
        ({"lambda": 1.5}, 422, "body.lambda"),
        ({"lambda": -0.01}, 422, "body.lambda"),
        ({"lambda": float("nan")}, 422, "body.lambda"),
        ({"lambda": "high"}, 422, "body.lambda"),
        ({}, 422, "body"),
        ({"lambda": 0.3, "weights": [1, 1, 1]}, 422, "body"),
        ({"weights": [1, -1, 0]}, 422, "body.weights.1"),
        ({"weights": [1, 2]}, 422, "body.weights"),
        ({"weights": [1, 2, 1e9]}, 422, "body.weights.2"),
        ({"lambda": 0.2, "lambada": 1}, 422, "body.lambada"),
        ({"lambda": 0.2, "expected_version": 0}, 409, "body.expected_version"),
    ],
)
def test_bad_operating_points_get_4xx_and_change_nothing(agent_app, body, status, loc):
    before = agent_app.get("/operating-point").json()
    r = agent_app.put("/operating-point", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert any(".".join(map(str, d["loc"])).startswith(loc) for d in r.json()["detail"]), r.json()
    assert agent_app.get("/operating-point").json() == before


def test_frontier_is_served(agent_app):
    r = agent_app.get("/frontier")
    assert r.status_code == 200 and r.json() == agent_app.frontier


def test_explore_mode_logs_uniform_actions_with_propensities(serve_url, inner_app, tmp_path):
    import pyarrow.dataset as pads
    from ray import serve

    from rllib_policies.utility_agent import ActionGrid, request_rows

    events = _deploy("ua_explore", "/uae", tmp_path, {"mode": "explore"})
    try:
        with httpx.Client(base_url=f"{serve_url}/uae", timeout=60) as c:
            assert c.put("/operating-point", json={"lambda": 0.3}).status_code == 409
            assert c.put("/operating-point", json={"weights": [1, 1, 1]}).status_code == 409
            chosen = {}
            for i in range(12):
                rec = c.post("/recommend", json={"user_id": i, "step": 1}).json()
                u = rec["utility"]
                assert u["mode"] == "explore" and u["propensity"] == pytest.approx(1 / 49)
                chosen[rec["request_id"]] = u["action"]
                fb = c.post(
                    "/feedback",
                    json={
                        "request_id": rec["request_id"],
                        "clicked": [True] + [False] * 7,
                        "dwell_s": [20.0] + [0.0] * 7,
                        "skipped": [False] * 8,
                    },
                )
                assert fb.status_code == 200, fb.text
            assert c.get("/frontier").status_code == 404
        deadline, table = time.time() + 20, None
        while time.time() < deadline:
            try:
                table = pads.dataset(events, format="parquet").to_table()
                if table.num_rows >= 12 * 8:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        assert table is not None, f"no events under {events} after 20 s"
        # a greedy (propensity 1) request and a duplicate delivery are in the logs too: neither reaches the rows
        from actors.telemetry import ParquetSink

        ParquetSink(events).write(table.slice(0, 8))
        greedy = table.slice(8, 8).to_pydict()
        greedy["propensity"] = [1.0] * 8
        greedy["event_id"] = [bytes([i]) * 16 for i in range(8)]
        greedy["request_id"] = ["ffffffffffffffff"] * 8
        import pyarrow as pa

        ParquetSink(events).write(pa.Table.from_pydict(greedy, schema=table.schema))
        table = pads.dataset(events, format="parquet").to_table()
        rows = request_rows(table, ActionGrid()).to_pydict()
        assert len(rows["action"]) == 12
        assert dict(zip(rows["request_id"], rows["action"])) == chosen
        assert rows["long_views"] == [1.0] * 12 and all(len(o) == 37 for o in rows["obs"])
        assert rows["propensity"] == pytest.approx([1 / 49] * 12)
    finally:
        serve.delete("ua_explore")
