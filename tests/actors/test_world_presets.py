"""The heterogeneous-taste preset (docs/world.md "Heterogeneous taste") and the default world it leaves
unchanged: calibration by brentq, the taste's link to observable features, per-user dispersion where the
docs say, KuaiRec's pooled watch ratio kept, and personalisation headroom the default world lacks."""

import numpy as np
import pytest

from actors.cascade import Pipeline
from actors.world import World, WorldConfig, seed_sequence
from actors.world.oracle import Family, action_values, head_means, ranking_grid, sample_states, user_rates

# The default world's biases as the bisection it replaced solved them (HEAD~1), to 1e-6 relative.
BISECTION_BIASES = {
    "default": (-4.042840242385868, -6.789519071578969),
    "cascade_0.9": (-4.565219640731808, -6.779312849044796),
}


@pytest.fixture(scope="module")
def worlds():
    return {name: World(WorldConfig.preset(name)) for name in ("default", "heterogeneous")}


@pytest.fixture(scope="module")
def measured(worlds):
    """Per preset: per-user rates and ranking-weight headroom on the same sizes (300 users × 4 requests)."""
    out = {}
    for name, world in worlds.items():
        pipeline = Pipeline(world)
        states = sample_states(pipeline, 300, 4, seed=0)
        family = Family.ranking(ranking_grid(8, head_means(pipeline, states)))
        out[name] = (user_rates(pipeline, states), action_values(pipeline, states, family))
    return out


@pytest.mark.parametrize("preset", sorted(BISECTION_BIASES))
def test_brentq_calibration_matches_the_bisection(preset, worlds):
    world = worlds.get(preset) or World(WorldConfig.preset(preset))
    assert world.users.taste is None
    np.testing.assert_allclose((world.click_bias, world.purchase_bias), BISECTION_BIASES[preset], rtol=1e-6)


def test_default_preset_is_the_default_world_and_has_no_taste(worlds):
    assert WorldConfig.preset("default") == WorldConfig()
    w = worlds["default"]
    users, items = np.arange(5), np.arange(50).reshape(5, 10)
    for fn in (w.click_logit, w.purchase_logit, w.watch_scale):
        np.testing.assert_array_equal(fn(users, items), fn(users, items, taste=True))


def test_taste_is_hidden_from_the_ranker_but_carried_by_the_user_tower(worlds):
    w = worlds["heterogeneous"]
    tau = w.users.taste.astype(np.float64)
    users, items = np.arange(6), np.arange(60).reshape(6, 10)
    np.testing.assert_allclose(
        w.click_logit(users, items, taste=True) - w.click_logit(users, items), tau[:6, :1] + 0 * items, atol=1e-5
    )
    np.testing.assert_allclose(
        w.watch_scale(users, items, taste=True) / w.watch_scale(users, items),
        np.exp(tau[:6, 1:2]) + 0 * items,
        rtol=1e-5,
    )
    # R² of τ on the observable context's user part (user tower, cohort one-hot): ρ = 0.6 plus the cohort shift.
    x = np.concatenate([w.users.model_embedding, np.eye(3)[w.users.cohort]], axis=1)
    fit = x @ np.linalg.lstsq(x, tau, rcond=None)[0]
    r2 = 1 - ((tau - fit) ** 2).sum(0) / ((tau - tau.mean(0)) ** 2).sum(0)
    assert np.all((r2 > 0.55) & (r2 < 0.75)), r2
    assert tau.std(0) == pytest.approx([0.41, 0.37, 0.54], abs=0.02)


def test_heterogeneous_watch_ratio_still_matches_kuairec(worlds):
    """Same pooled bounds as test_world's default check (KuaiRec quartiles, mean 0.85) and the same CTR/CVR."""
    w = worlds["heterogeneous"]
    rng = seed_sequence(1, "test-reference")
    users, cands = rng.integers(0, w.users.n, 20_000), rng.integers(0, w.catalogue.n, (20_000, 500))
    rel = w.relevance(users, cands) + 0.1 * rng.standard_normal(cands.shape)
    slates = np.take_along_axis(cands, np.argsort(-rel, axis=1)[:, :10], axis=1)
    r = w.respond(users, slates, rng)
    ratio = (r.dwell_s / w.catalogue.duration_s[slates])[r.clicked]
    q1, q2, q3 = np.percentile(ratio, [25, 50, 75])
    assert 0.25 <= q1 <= 0.5 and 0.6 <= q2 <= 0.8 and 1.05 <= q3 <= 1.3
    assert ratio.mean() == pytest.approx(0.85, abs=0.08) and 0.6 <= ratio.std() <= 0.75
    assert r.clicked.mean() == pytest.approx(0.04, abs=0.003)
    assert r.purchased.sum() / r.clicked.sum() == pytest.approx(0.005, abs=0.0015)


def test_per_user_dispersion_sits_where_the_docs_say(measured):
    """docs/world.md, "Heterogeneous taste": coefficient of variation across users of the exact per-user
    rates under the default cascade, and the q90/q10 spread of long views per click."""
    cv = {p: {k: v.std() / v.mean() for k, v in rates.items()} for p, (rates, _) in measured.items()}
    spread = {p: np.divide(*np.percentile(r["long_views_per_click"], [90, 10])) for p, (r, _) in measured.items()}
    assert 0.26 <= cv["default"]["ctr"] <= 0.38 and 0.37 <= cv["heterogeneous"]["ctr"] <= 0.50
    assert 0.40 <= cv["default"]["long_views_per_click"] <= 0.58
    assert 0.62 <= cv["heterogeneous"]["long_views_per_click"] <= 0.85
    assert spread["default"] < 5.5 and spread["heterogeneous"] > 7.0


def test_heterogeneous_preset_has_personalisation_headroom_the_default_lacks(measured):
    lift = {p: {o: v.headroom(o).lift("user") for o in ("long_views", "clicks")} for p, (_, v) in measured.items()}
    assert lift["heterogeneous"]["long_views"] > max(0.6, 3 * lift["default"]["long_views"]), lift
    # clicks: τ_click shifts every item's log-odds alike, so the click ranking (and its headroom) is unchanged
    assert lift["heterogeneous"]["clicks"] == pytest.approx(lift["default"]["clicks"], abs=0.25)
