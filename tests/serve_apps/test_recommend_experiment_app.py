"""The recommend app as the loop runs it, over real HTTP on a local Ray Serve with two RecommendService
replicas: /feedback survives replicas (another replica's slate, and every replica killed between
/recommend and /feedback: the response's signed served record lets any replica score the slate), and the
live A/B split (sticky arms, versioned promotion and rollback of an arm, per-arm KPIs from the logs)."""

import tempfile
import time
import uuid

import httpx
import numpy as np
import pytest

from actors.telemetry.sinks import read_parquet_events
from serve_apps.experiments import ArmSplit
from serve_apps.recommend import app_builder

pytestmark = [pytest.mark.ray, pytest.mark.serve]
APP = "recommend_replicas_test"
ARGS = {"world": {"n_items": 2000, "n_users": 300}, "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 5}}
EXPERIMENT = {
    "name": "weights-test",
    "arms": {"control": {"share": 0.5, "weights": [1, 1, 10]}, "treatment": {"share": 0.5, "weights": [1, 0, 0]}},
}


@pytest.fixture(scope="module")
def client(serve_url):
    from ray import serve

    from serve_apps import inner_reward

    prefix = f"replicas_test_{uuid.uuid4().hex[:8]}"
    events = tempfile.mkdtemp(prefix="morl-events-arms-")
    serve.run(inner_reward.app_builder({"weights_store": f"{prefix}_inner"}), name=f"{APP}_ir", route_prefix="/rr_ir")
    serve.run(
        app_builder(
            {
                **ARGS,
                "store_prefix": prefix,
                "inner_reward_app": f"{APP}_ir",
                "telemetry": {"sink": "parquet", "path": events, "flush_interval_s": 0.01},
                "num_replicas": 2,
                "experiment": EXPERIMENT,
            }
        ),
        name=APP,
        route_prefix="/rr",
    )
    with httpx.Client(base_url=f"{serve_url}/rr", timeout=60) as c:
        c.events_root, c.store_prefix = events, prefix
        yield c
    serve.delete(APP)
    serve.delete(f"{APP}_ir")


def feedback(client, rec: dict, record: str | None) -> httpx.Response:
    n = len(rec["slate"])
    body = {"request_id": rec["request_id"], "clicked": [True] + [False] * (n - 1), "dwell_s": [30.0] + [0.0] * (n - 1)}
    body["skipped"] = [False] * n
    return client.post("/feedback", json=body if record is None else {**body, "served_record": record})


def recommendation_replica_actors() -> list[str]:
    """The live RecommendService replicas' actor names (namespace "serve")."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#RecommendService#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def test_any_replica_scores_a_slate_with_its_served_record(client):
    recs = [client.post("/recommend", json={"user_id": u}).json() for u in range(24)]
    assert len({r["request_id"] for r in recs}) == 24
    plain = [feedback(client, r, None).status_code for r in recs]
    # without the record, a slate reaching the replica that did not serve it is unknown there
    assert set(plain) <= {200, 404} and 404 in plain, plain
    signed = [feedback(client, r, r["served_record"]) for r in recs]
    assert [r.status_code for r in signed] == [200] * 24, [r.text for r in signed if r.status_code != 200]


def test_feedback_after_the_serving_replica_died(client):
    import ray

    recs = [client.post("/recommend", json={"user_id": u}).json() for u in range(6)]
    replicas = recommendation_replica_actors()
    assert len(replicas) == 2
    for name in replicas:  # kill both: whichever served, it is gone
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            fresh = set(recommendation_replica_actors()) - set(replicas)
            if len(fresh) == 2 and client.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert [feedback(client, r, None).status_code for r in recs] == [404] * 6  # the caches died with them
    assert [feedback(client, r, r["served_record"]).status_code for r in recs] == [200] * 6


@pytest.mark.parametrize(
    ("mangle", "status", "match"),
    [
        (lambda rec, other: other["served_record"], 422, "another request"),
        (lambda rec, other: rec["served_record"][:-4] + "AAAA", 403, "does not verify"),
        (lambda rec, other: "garbage", 422, "malformed"),
    ],
)
def test_forged_or_mismatched_records_get_a_4xx(client, mangle, status, match):
    rec, other = (client.post("/recommend", json={"user_id": u}).json() for u in (1, 2))
    r = feedback(client, {**rec, "request_id": "ffffffffffffffff"}, mangle(rec, other))  # in no replica's cache
    assert r.status_code == status, r.text
    assert match in r.text and r.json()["detail"][0]["loc"] == ["body", "served_record"]


def test_users_stay_in_their_salted_arm(client):
    split = ArmSplit.from_config(EXPERIMENT)
    users = list(range(40))
    expected = [split.arms[i].name for i in split.assign(np.array(users))]
    for _ in range(2):  # sticky across requests (and whichever replica answers)
        assert [client.post("/recommend", json={"user_id": u}).json()["arm"]["name"] for u in users] == expected


def test_promote_and_roll_back_an_arm(client):
    split = ArmSplit.from_config(EXPERIMENT)
    treated = int(np.flatnonzero(split.assign(np.arange(300)) == 1)[0])
    before = client.get("/experiments").json()["arms"]["treatment"]
    r = client.put(
        "/experiments/arms/treatment/weights", json={"weights": [0, 0, 1], "expected_version": before["version"]}
    )
    assert r.status_code == 200 and r.json()["version"] == before["version"] + 1, r.text
    served = client.post("/recommend", json={"user_id": treated}).json()
    assert served["arm"] == {"name": "treatment", "policy": "weights", "version": before["version"] + 1}
    stale = client.put("/experiments/arms/treatment/weights", json={"weights": [1, 1, 1], "expected_version": 1})
    assert stale.status_code == 409 and "expected_version" in stale.text
    back = client.post("/experiments/arms/treatment/rollback", json={})
    assert back.status_code == 200, back.text
    assert back.json()["weights"] == before["weights"] and back.json()["restored_version"] == before["version"]
    assert client.post("/recommend", json={"user_id": treated}).json()["arm"]["version"] == before["version"] + 2


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "match"),
    [
        ("put", "/experiments/arms/nope/weights", {"weights": [1, 1, 1]}, 404, "no weights arm 'nope'"),
        ("post", "/experiments/arms/nope/rollback", {}, 404, "no weights arm 'nope'"),
        ("put", "/experiments/arms/control/weights", {"weights": [0, 0, 0]}, 422, "must not all be 0"),
        ("put", "/experiments/arms/control/weights", {"weights": [1, 1]}, 422, "at least 3"),
        ("put", "/experiments/arms/control/weights", {"weights": [1, 1, -1]}, 422, "greater than or equal"),
    ],
)
def test_bad_arm_updates_get_a_4xx(client, method, path, body, status, match):
    r = getattr(client, method)(path, json=body)
    assert r.status_code == status and match in r.text, r.text


def test_experiments_reports_per_arm_kpis_from_the_logs(client):
    recs = [client.post("/recommend", json={"user_id": u}).json() for u in range(60)]
    assert all(feedback(client, r, r["served_record"]).status_code == 200 for r in recs)
    deadline = time.monotonic() + 60
    while read_parquet_events(client.events_root).num_rows < 60 * 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    events = read_parquet_events(client.events_root)
    assert set(events["arm"].to_pylist()) == {"weights-test/control", "weights-test/treatment"}
    report = client.get("/experiments").json()
    for name in ("control", "treatment"):
        arm = report["arms"][name]
        assert arm["requests"] >= 20 and arm["users"] >= 10, arm
        clicks = arm["kpis"]["clicks"]
        assert clicks["low"] <= 1.0 <= clicks["high"] and clicks["mean"] == 1.0  # feedback clicks position 0 only


def test_every_status_code_is_in_the_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    declared = {(p, m): set(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    assert declared[("/feedback", "post")] >= {"200", "403", "404", "410", "422", "503"}
    assert declared[("/experiments", "get")] >= {"200", "404"}
    assert declared[("/experiments/arms/{arm}/weights", "put")] >= {"200", "404", "409", "422"}
    assert declared[("/experiments/arms/{arm}/rollback", "post")] >= {"200", "404", "409", "422"}
    assert declared[("/operating-point", "put")] >= {"200", "202", "404", "409", "422"}
    assert declared[("/experiments/shadow/weights", "put")] >= {"200", "202", "404", "409", "422"}
    assert declared[("/experiments/shadow", "delete")] >= {"200", "202", "404"}


def test_shadow_mode_needs_weight_logging(client):
    """Without Gaussian weight logging there is no density to evaluate a shadow candidate with: 409, naming why."""
    r = client.put("/experiments/shadow/weights", json={"weights": [1, 2, 3]})
    assert r.status_code == 409 and "weight_logging" in r.json()["detail"][0]["msg"]
    shadow = client.get("/experiments").json()["shadow"]
    assert shadow["active"] is False and "weights" not in shadow, shadow


def test_a_published_stage_policy_serves_hot_and_rolls_back(client):
    """A learned matching policy (UNEX-RL's MLP) reaches every stage replica by a versioned hot update; the
    served slate is the in-process cascade's with that policy acting on the same o_k; clearing it restores."""
    import ray

    from actors.cascade import Pipeline
    from actors.served_policies import mlp_act, mlp_layers, publish_stage_policy, stage_policy_store
    from actors.stages import STAGE_ACTION_HIGH, RequestBatch
    from actors.world import PipelineConfig, World, WorldConfig

    rng = np.random.default_rng(0)
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    dim, high = pipeline.spec.dim, STAGE_ACTION_HIGH["matching"]
    state = {"0.weight": rng.normal(0, 0.3, (16, dim)), "0.bias": np.zeros(16), "2.weight": rng.normal(0, 0.5, (4, 16))}
    state["2.bias"] = np.zeros(4)
    ack = publish_stage_policy(client.store_prefix, "matching", state, high)
    split = ArmSplit.from_config(EXPERIMENT)
    for user in (3, 4, 5):
        body = client.post("/recommend", json={"user_id": user, "step": 2, "clicks": 1}).json()
        assert body["versions"]["matching_policy"] == ack["version"], body["versions"]
        arm = split.arms[int(split.assign(np.array([user]))[0])]
        weights = client.get("/experiments").json()["arms"][arm.name]["weights"]
        req = RequestBatch(
            np.array([user]), np.full((1, 20), -1), np.array([2]), np.array([1]), int(body["request_id"], 16)
        )
        policy = lambda o: mlp_act(mlp_layers(state), high, o)  # noqa: E731
        local = pipeline.recommend(
            req, params={"ranking": np.asarray(weights, np.float32)}, policies={"matching": policy}
        )
        assert body["slate"] == local.slate[0].tolist()
    ray.get(stage_policy_store(client.store_prefix, "matching").rollback.remote())  # back to no policy
    deadline = time.monotonic() + 30
    while "matching_policy" in client.post("/recommend", json={"user_id": 3}).json()["versions"]:
        assert time.monotonic() < deadline, "the rollback never reached the stage replicas"
        time.sleep(0.2)
