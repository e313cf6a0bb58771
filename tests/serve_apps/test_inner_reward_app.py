"""The inner-reward Serve app over real HTTP against a real local Ray Serve (2 replicas)."""

import io
import math
import uuid

import httpx
import numpy as np
import pyarrow as pa
import pytest

import rust_ext
from serve_apps.inner_reward import ARROW_STREAM, app_builder

pytestmark = [pytest.mark.ray, pytest.mark.serve]

SLATE = {
    "clicked": [True, False, False],
    "dwell_s": [12.0, 0.0, 3.5],
    "skipped": [False, True, False],
    "relevance": [0.9, 0.1, 0.4],
}


def expected(slate, weights=None):
    return rust_ext.inner_reward_numpy(
        slate["clicked"], slate["dwell_s"], slate["skipped"], slate["relevance"], weights
    )


@pytest.fixture(scope="module")
def client(serve_url):
    from ray import serve

    store = f"inner_reward_test_{uuid.uuid4().hex[:8]}"
    serve.run(
        app_builder({"num_replicas": 2, "max_slate_size": 8, "max_slates_per_request": 4, "weights_store": store}),
        name="inner_reward_test",
        route_prefix="/ir",
    )
    with httpx.Client(base_url=f"{serve_url}/ir", timeout=30) as c:
        yield c
    serve.delete("inner_reward_test")


def assert_4xx_names(resp, status, loc_part, msg_part=""):
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert any(loc_part in ".".join(map(str, d["loc"])) and msg_part in d["msg"] for d in detail), detail


def test_one_slate_matches_reference(client):
    r = client.post("/reward", json={"slate": SLATE})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["rewards"][0], expected(SLATE), atol=1e-5)
    assert body["totals"][0] == pytest.approx(float(expected(SLATE).sum()), abs=1e-4)
    assert body["weights_version"] >= 1


def test_batch_of_slates_including_empty(client):
    other = {k: v[:1] for k, v in SLATE.items()}
    empty = {k: [] for k in SLATE}
    r = client.post("/reward", json={"slates": [SLATE, empty, other]})
    assert r.status_code == 200, r.text
    rewards = r.json()["rewards"]
    assert [len(x) for x in rewards] == [3, 0, 1]
    np.testing.assert_allclose(rewards[2], expected(other), atol=1e-5)
    assert r.json()["totals"][1] == 0


@pytest.mark.parametrize(
    "patch, loc, msg",
    [
        ({"dwell_s": [1.0, -2.0, 0.0]}, "slate.dwell_s.1", "greater than or equal to 0"),
        ({"relevance": [0.1, 0.2]}, "slate", "length mismatch: clicked has 3 items but relevance has 2"),
        ({"clicked": ["yes please", False, True]}, "slate.clicked.0", "boolean"),
        ({"surprise": 1}, "slate.surprise", "Extra inputs"),
        ({k: v * 3 for k, v in SLATE.items()}, "slates.0.clicked", "max_slate_size is 8"),
    ],
)
def test_bad_slates_get_422_naming_the_field(client, patch, loc, msg):
    assert_4xx_names(client.post("/reward", json={"slate": {**SLATE, **patch}}), 422, loc, msg)


def test_nan_and_inf_are_rejected_not_500(client):
    # JSON has no NaN, but Python clients send the literal; it must be a 422, never a 500.
    body = '{"slate": {"clicked": [true], "dwell_s": [NaN], "skipped": [false], "relevance": [Infinity]}}'
    r = client.post("/reward", content=body, headers={"content-type": "application/json"})
    assert_4xx_names(r, 422, "slate.dwell_s.0")
    assert_4xx_names(r, 422, "slate.relevance.0")


def test_request_shape_errors(client):
    assert_4xx_names(client.post("/reward", json={}), 422, "body", "exactly one of 'slate' or 'slates'")
    assert_4xx_names(client.post("/reward", json={"slates": [SLATE] * 5}), 422, "body.slates", "at most 4 slates")
    assert client.post("/reward", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_replicas_survive_bad_input(client):
    seen = {client.get("/healthz").json()["replica"] for _ in range(20)}
    for _ in range(10):
        client.post("/reward", content=b'{"slate": {"dwell_s": [NaN]}}', headers={"content-type": "application/json"})
    after = {client.get("/healthz").json()["replica"] for _ in range(20)}
    assert after <= seen and len(seen) == 2


def arrow_body(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def test_arrow_ipc_round_trip(client):
    table = pa.table(
        {
            "slate": pa.array([0, 0, 0, 1], pa.int32()),
            "clicked": [True, False, False, True],
            "dwell_s": pa.array([12, 0, 3.5, 1], pa.float32()),
            "skipped": [False, True, False, False],
            "relevance": pa.array([0.9, 0.1, 0.4, 0.3], pa.float32()),
        }
    )
    r = client.post("/reward/arrow", content=arrow_body(table), headers={"content-type": ARROW_STREAM})
    assert r.status_code == 200, r.text
    got = pa.ipc.open_stream(r.content).read_all()
    np.testing.assert_allclose(
        got["reward"].to_numpy(),
        rust_ext.inner_reward_numpy(table["clicked"], table["dwell_s"], table["skipped"], table["relevance"]),
        atol=1e-6,
    )
    assert int(r.headers["x-weights-version"]) >= 1


def test_arrow_repeated_column_is_a_422(client):
    t = pa.Table.from_arrays(
        [
            pa.array([True]),
            pa.array([True]),
            pa.array([1.0], pa.float32()),
            pa.array([False]),
            pa.array([0.1], pa.float32()),
        ],
        names=["clicked", "clicked", "dwell_s", "skipped", "relevance"],
    )
    assert_4xx_names(client.post("/reward/arrow", content=arrow_body(t)), 422, "body.clicked", "more than once")


def test_arrow_bad_input(client):
    r = client.post("/reward/arrow", content=b"garbage", headers={"content-type": ARROW_STREAM})
    assert_4xx_names(r, 400, "body", "not an Arrow IPC stream")
    no_dwell = pa.table({"clicked": [True], "skipped": [False], "relevance": pa.array([0.1], pa.float32())})
    assert_4xx_names(client.post("/reward/arrow", content=arrow_body(no_dwell)), 422, "body.dwell_s", "missing")
    bad = pa.table(
        {
            "clicked": [True, True],
            "dwell_s": pa.array([1, math.nan], pa.float32()),
            "skipped": [False, False],
            "relevance": pa.array([0.1, 0.1], pa.float32()),
        }
    )
    assert_4xx_names(client.post("/reward/arrow", content=arrow_body(bad)), 422, "body.slates.0.dwell_s.1", "finite")


def test_weights_put_reaches_every_replica(client):
    before = client.get("/weights").json()
    new = {**before["weights"], "click_w": before["weights"]["click_w"] + 1.0}
    r = client.put("/weights", json={**new, "expected_version": before["version"]})
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["version"] == before["version"] + 1
    assert state["readers_acked"] == state["readers_live"] == 2
    # Whichever replica answers, it already serves the new version and weights.
    for _ in range(20):
        got = client.post("/reward", json={"slate": SLATE}).json()
        assert got["weights_version"] == state["version"]
        np.testing.assert_allclose(got["rewards"][0], expected(SLATE, rust_ext.RewardWeights(**new)), atol=1e-5)


@pytest.mark.parametrize(
    "body, status, loc, msg",
    [
        ({"click_w": "NaN"}, 422, "body.click_w", "finite"),
        ({"clip_lo": 3, "clip_hi": 1}, 422, "body", "clip_lo (3.0) must not exceed clip_hi (1.0)"),
        ({"click_w": 1e7}, 422, "body", "click_w must be finite with |click_w| <= 1e6"),
        ({"click_w": 1e39}, 422, "body.click_w", "less than or equal"),
        ({"click_weight": 1}, 422, "body.click_weight", "Extra inputs"),
        ({"expected_version": 0}, 409, "body.expected_version", "current version is"),
    ],
)
def test_bad_weights_are_rejected_and_nothing_changes(client, body, status, loc, msg):
    before = client.get("/weights").json()
    assert_4xx_names(client.put("/weights", json=body), status, loc, msg)
    assert client.get("/weights").json() == before
