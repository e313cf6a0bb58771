"""The simulated world: calibration to shared/WORLD_FACTS.md, determinism, NDCG, policy sanity,
the clickbait trade-off, presets."""

import numpy as np
import pytest

from actors.cascade import Pipeline
from actors.simulate import compare_policies, oracle_policy, random_policy, run_sessions
from actors.stages import matching
from actors.world import World, WorldConfig, dcg, ndcg_at_k, seed_sequence
from actors.world.config import KUAIRAND_RETURN_GAP, ULTRA_PBM_TOP10


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(scope="module")
def pipeline(world):
    return Pipeline(world)


def reference_slates(world, n, seed=1):
    """The calibration's reference policy: 500 random candidates ranked by relevance + noise."""
    rng = seed_sequence(seed, "test-reference")
    users = rng.integers(0, world.users.n, n)
    cands = rng.integers(0, world.catalogue.n, (n, 500))
    rel = world.relevance(users, cands) + 0.1 * rng.standard_normal(cands.shape)
    return users, np.take_along_axis(cands, np.argsort(-rel, axis=1)[:, :10], axis=1), rng


def test_ctr_examination_watch_ratio_and_conversion_match_their_sources(world):
    users, slates, rng = reference_slates(world, 40_000)
    r = world.respond(users, slates, rng)
    assert r.clicked.mean() == pytest.approx(0.04, abs=0.003)  # Ali-CCP feed CTR
    np.testing.assert_allclose(r.examined.mean(axis=0), ULTRA_PBM_TOP10, atol=0.01)  # ULTRA PBM
    ratio = (r.dwell_s / world.catalogue.duration_s[slates])[r.clicked]
    q1, q2, q3 = np.percentile(ratio, [25, 50, 75])  # KuaiRec watch ratio
    assert 0.25 <= q1 <= 0.5 and 0.6 <= q2 <= 0.8 and 1.05 <= q3 <= 1.3
    assert ratio.mean() == pytest.approx(0.85, abs=0.08)
    assert r.purchased.sum() / r.clicked.sum() == pytest.approx(0.005, abs=0.0015)  # Ali-CCP CVR


def test_durations_match_kuairec(world):
    q1, med, q3 = np.percentile(world.catalogue.duration_s, [25, 50, 75])
    assert (
        med == pytest.approx(9.6, abs=0.6) and q1 == pytest.approx(7.4, abs=0.8) and q3 == pytest.approx(12.2, abs=1.3)
    )
    assert world.catalogue.duration_s.max() <= 315


def test_session_length_and_return_gap(world, pipeline):
    s = run_sessions(world, pipeline, lambda w, p, req, rng: p.recommend(req).slate, n_sessions=1500, name="pipe")
    assert 45 <= s.items_per_session <= 75  # KuaiRec items per user-day, mean 52-67
    assert 0.5 <= s.return_rate <= 0.7  # KuaiRand P(1) 0.617, KuaiSim 0.57-0.61


def test_return_gap_distribution_follows_kuairand(world):
    sessions = world.start_sessions(np.arange(20_000) % world.users.n)
    sessions.temper[:] = 0.5  # end every session after one request
    rng = seed_sequence(3, "gap")
    world.step(sessions, rng.integers(0, world.catalogue.n, (sessions.size, 10)), rng)
    gaps = sessions.return_gap_days
    later = np.asarray(KUAIRAND_RETURN_GAP[1:])
    share = np.array([(gaps == g).mean() for g in range(2, 8)]) / (gaps > 1).mean()
    np.testing.assert_allclose(share, later / (later.sum() + 1 - sum(KUAIRAND_RETURN_GAP)), atol=0.02)


def test_determinism_under_a_seed():
    a, b = World(WorldConfig(seed=5, n_items=2000, n_users=500)), World(WorldConfig(seed=5, n_items=2000, n_users=500))
    np.testing.assert_array_equal(a.catalogue.embedding, b.catalogue.embedding)
    assert a.click_bias == b.click_bias
    pa, pb = Pipeline(a), Pipeline(b)
    sa = run_sessions(a, pa, random_policy, 50, seed=9, name="r")
    sb = run_sessions(b, pb, random_policy, 50, seed=9, name="r")
    assert sa == sb
    c = World(WorldConfig(seed=6, n_items=2000, n_users=500))
    assert not np.array_equal(a.catalogue.embedding, c.catalogue.embedding)


def test_ndcg_hand_computed():
    # served grades (3, 2, 0), ideal (3, 3, 2): DCG = 7 + 3/log2(3); IDCG = 7 + 7/log2(3) + 3/2
    served, ideal = np.array([[3, 2, 0]]), np.array([[2, 3, 3]])
    expected = (7 + 3 / np.log2(3)) / (7 + 7 / np.log2(3) + 1.5)
    assert ndcg_at_k(served, ideal, 3)[0] == pytest.approx(expected)
    assert ndcg_at_k(np.array([[1, 0]]), np.array([[1, 0]]), 2)[0] == pytest.approx(1.0)
    assert ndcg_at_k(np.array([[0, 0]]), np.array([[0, 0]]), 2)[0] == 0.0
    assert dcg(np.array([4]), 1) == 15.0


def test_relevance_oracle_beats_random(world, pipeline):
    oracle, rand = (
        run_sessions(world, pipeline, p, 800, seed=2, name=n)
        for n, p in (("oracle", oracle_policy), ("random", random_policy))
    )
    assert oracle.ndcg_at_10 > rand.ndcg_at_10 + 0.3
    assert oracle.ctr > 2 * rand.ctr
    assert oracle.items_per_session > rand.items_per_session


def clickbait_policies(world, pipeline):
    """Same candidates; one ranks by clickbaitiness, one by quality (clickbait last)."""

    def by(key):
        def policy(w, p, req, rng):
            cand = matching(p.ctx, req, None, 200, 0).items
            score = key(w, req, cand)
            return np.take_along_axis(cand, np.argsort(-score, axis=1)[:, :10], axis=1)

        return policy

    bait = by(lambda w, req, c: w.catalogue.clickbait[c] + 0.5 * w.affinity(req.user, c))
    healthy = by(lambda w, req, c: -w.catalogue.clickbait[c] + 0.5 * w.affinity(req.user, c))
    return bait, healthy


def test_clickbait_raises_clicks_but_lowers_satisfaction_and_return(world, pipeline):
    bait, healthy = clickbait_policies(world, pipeline)
    b = run_sessions(world, pipeline, bait, 2000, seed=4, name="bait")
    h = run_sessions(world, pipeline, healthy, 2000, seed=4, name="healthy")
    assert b.ctr > 1.3 * h.ctr
    assert b.satisfaction_end < h.satisfaction_end - 0.05
    assert b.return_rate < h.return_rate


def test_low_sensitivity_preset_removes_the_trade_off():
    """RecSim's default sensitivity (0.01) sits below the crossover: clickbait costs nothing."""
    world = World(WorldConfig.preset("sensitivity_low"))
    pipeline = Pipeline(world)
    bait, healthy = clickbait_policies(world, pipeline)
    b = run_sessions(world, pipeline, bait, 1500, seed=4, name="bait")
    h = run_sessions(world, pipeline, healthy, 1500, seed=4, name="healthy")
    assert abs(b.satisfaction_end - h.satisfaction_end) < 0.02
    assert b.ctr > h.ctr


@pytest.mark.parametrize("preset", ["cascade_0.65", "pbm_eta_2", "ctr_carousel", "ctr_video"])
def test_presets_calibrate_and_run(preset):
    world = World(WorldConfig.preset(preset, n_items=3000, n_users=1000))
    summaries = compare_policies(world, Pipeline(world), n_sessions=100)
    assert {s.policy for s in summaries} == {"random", "popularity", "relevance_oracle", "pipeline_default"}
    users, slates, rng = reference_slates(world, 20_000)
    assert world.respond(users, slates, rng).clicked.mean() == pytest.approx(world.config.target_ctr, rel=0.15)


def test_bad_config_is_rejected_by_name():
    with pytest.raises(ValueError, match="click_model='dbn'"):
        WorldConfig(click_model="dbn")
    with pytest.raises(ValueError, match="unknown world preset 'nope'"):
        WorldConfig.preset("nope")


@pytest.mark.parametrize("preset", ["default", "cascade_0.9"])
def test_expected_response_matches_sampled_means(preset):
    """World.expected_response (exact expectations) against the mean of 4 000 sampled responses."""
    w = World(WorldConfig.preset(preset, n_items=2000, n_users=300))
    rng = seed_sequence(0, "expected-response-test")
    users, slates = rng.integers(0, 300, 8), rng.integers(0, 2000, (8, 10))
    clicks, long_views = w.expected_response(users, slates)
    n = 4000
    reps = w.respond(np.repeat(users, n), np.repeat(slates, n, axis=0), rng)
    sampled_clicks = reps.clicked.reshape(8, n, 10).mean(1)
    sampled_long = (reps.clicked & (reps.dwell_s >= 18)).reshape(8, n, 10).mean(1)
    np.testing.assert_allclose(clicks, sampled_clicks, atol=4 * np.sqrt(0.25 / n))
    np.testing.assert_allclose(long_views, sampled_long, atol=4 * np.sqrt(0.25 / n))
    assert long_views.sum() > 0.01
