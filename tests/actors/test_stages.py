"""The three stages: shapes, parameter validation, cascade containment, and in-process == actors."""

import numpy as np
import pytest
import ray

from actors.stage_actors import ActorPipeline
from actors.stages import Pipeline, RequestBatch
from actors.world import PipelineConfig, World, WorldConfig

SMALL = WorldConfig(n_items=3000, n_users=500, seed=3)
PIPE = PipelineConfig(k_matching=200, k_pre_ranking=30, k_slate=8, seed=11)


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(World(SMALL), PIPE)


def request(b=6, request_id=42):
    rng = np.random.default_rng(0)
    hist = np.full((b, 20), -1, np.int64)
    hist[:, -3:] = rng.integers(0, SMALL.n_items, (b, 3))
    return RequestBatch(np.arange(b, dtype=np.int64) * 7, hist, np.zeros(b, np.int32), request_id)


def test_cascade_shapes_and_containment(pipeline):
    rec = pipeline.recommend(request())
    assert rec.matched.shape == (6, 200) and rec.pre_ranked.shape == (6, 30) and rec.slate.shape == (6, 8)
    for b in range(6):
        assert set(rec.slate[b]) <= set(rec.pre_ranked[b]) <= set(rec.matched[b])
        assert len(set(rec.matched[b])) == 200
    assert np.all(np.diff(rec.scores, axis=1) <= 0), "the slate is ordered best first"
    assert set(rec.predictions) == {"p_click", "p_long_view", "p_purchase"}
    assert np.all(rec.predictions["p_long_view"] <= rec.predictions["p_click"] + 1e-7)


def test_utility_weights_change_the_slate(pipeline):
    req = request()
    click_only = pipeline.recommend(req, {"ranking": np.array([1.0, 0.0, 0.0])})
    purchase_only = pipeline.recommend(req, {"ranking": np.array([0.0, 0.0, 1.0])})
    assert not np.array_equal(click_only.slate, purchase_only.slate)
    per_request = np.array([[1.0, 0, 0]] * 3 + [[0, 0, 1.0]] * 3)
    mixed = pipeline.recommend(req, {"ranking": per_request})
    np.testing.assert_array_equal(mixed.slate[:3], click_only.slate[:3])
    np.testing.assert_array_equal(mixed.slate[3:], purchase_only.slate[3:])


@pytest.mark.parametrize("params, msg", [
    ({"ranking": [1.0, 2.0]}, r"ranking params must have shape \(3,\)"),
    ({"matching": [1.0, np.nan, 0, 0]}, "matching params must be finite"),
])
def test_bad_params_are_rejected(pipeline, params, msg):
    with pytest.raises(ValueError, match=msg):
        pipeline.recommend(request(), params)


def test_same_request_id_same_slate_other_id_other_noise(pipeline):
    a, b = pipeline.recommend(request(request_id=1)), pipeline.recommend(request(request_id=1))
    np.testing.assert_array_equal(a.slate, b.slate)
    c = pipeline.recommend(request(request_id=2))
    assert not np.array_equal(a.scores, c.scores)


def test_pipeline_config_checks_sizes():
    with pytest.raises(ValueError, match="k_matching >= k_pre_ranking >= k_slate"):
        PipelineConfig(k_matching=10, k_pre_ranking=50)


@pytest.mark.ray
def test_actor_pipeline_matches_in_process(ray_session, pipeline):
    actors = ActorPipeline(SMALL, PIPE)
    try:
        for rid in (1, 2, 3):
            req = request(request_id=rid)
            local, remote = pipeline.recommend(req), actors.recommend(req)
            np.testing.assert_array_equal(local.slate, remote.slate)
            np.testing.assert_array_equal(local.matched, remote.matched)
            np.testing.assert_allclose(local.scores, remote.scores)
        assert remote.versions == {"matching": 1, "pre_ranking": 1, "ranking": 1}
        new = np.array([0.0, 0.0, 1.0], np.float32)
        assert actors.set_params("ranking", new) == 2
        req = request(request_id=9)
        hot = actors.recommend(req)
        np.testing.assert_array_equal(hot.slate, pipeline.recommend(req, {"ranking": new}).slate)
        assert hot.versions["ranking"] == 2
        with pytest.raises(ray.exceptions.RayTaskError, match="expected_version 1"):
            actors.set_params("ranking", new, expected_version=1)
    finally:
        actors.shutdown()
