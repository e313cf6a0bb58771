"""The world's oracle (actors/world/oracle.py): hand-checked levels, their order, exactness against the
cascade, scale invariance of the ranking weights, the session objective, and bad input by name."""

import numpy as np
import pytest

from actors.cascade import Pipeline
from actors.stages import DEFAULT_PARAMS, RequestBatch
from actors.world import PipelineConfig, World, WorldConfig, ndcg_at_k
from actors.world.oracle import (
    KPIS,
    Family,
    RequestStates,
    Scalarised,
    SessionObjective,
    action_values,
    headroom,
    objective_values,
    oracle,
    ranking_grid,
    sample_states,
    session_headroom,
    simplex,
    simulate_sessions,
    states_from_requests,
)

OBJECTIVES = [*KPIS, Scalarised(0.0), Scalarised(0.5), Scalarised(1.0)]


@pytest.fixture(scope="module")
def pipeline():
    world = World(WorldConfig(n_items=400, n_users=60, n_categories=8))
    return Pipeline(world, PipelineConfig(k_matching=80, k_pre_ranking=20, k_slate=5))


@pytest.fixture(scope="module")
def states(pipeline):
    return sample_states(pipeline, n_users=30, requests_per_user=3, seed=1)


@pytest.fixture(scope="module")
def values(pipeline, states):
    family, ref = Family.ranking(ranking_grid(5)).with_action(DEFAULT_PARAMS["ranking"])
    return action_values(pipeline, states, family), ref


def fake_states(users, cohorts) -> RequestStates:
    """States that only carry who and which cohort (enough for ``headroom``)."""
    users = np.asarray(users)
    req = RequestBatch(users, np.full((len(users), 1), -1), np.zeros(len(users), np.int32), None, np.arange(len(users)))
    return RequestStates(
        req, np.asarray(cohorts), np.zeros((len(users), 1), np.int64), np.zeros((len(users), 1), np.int64)
    )


def test_levels_by_hand():
    """Users 0, 0, 1, 2 (cohorts 0, 0, 0, 1), two actions: every level computed by hand."""
    v = np.array([[1.0, 0.0], [0.0, 3.0], [2.0, 1.0], [0.0, 1.0]])
    h = headroom(v, fake_states([0, 0, 1, 2], [0, 0, 0, 1]), Family.ranking(np.eye(3)[:2]), "clicks", reference=0)
    assert (h.reference, h.static, h.cohort, h.user, h.request) == pytest.approx((0.75, 1.25, 1.25, 1.5, 1.75))
    assert h.static_action == 1 and h.cohort_actions == {"new": 1, "casual": 1}
    assert h.lift("user") == pytest.approx(20.0) and h.lift("request") == pytest.approx(40.0)
    assert h.lift("reference") == pytest.approx(-40.0) and h.n_users == 3


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: getattr(o, "name", o))
def test_levels_are_ordered(values, objective):
    """per request ≥ per user ≥ per cohort ≥ static ≥ any fixed setting (here every action of the grid)."""
    av, ref = values
    h = av.headroom(objective, ref)
    eps = 1e-9 * abs(h.static)
    assert h.request >= h.user - eps >= h.cohort - 2 * eps >= h.static - 3 * eps
    assert np.all(objective_values(av.kpis, objective).mean(axis=0) <= h.static + eps)
    assert h.reference <= h.static + eps and h.n_actions == av.family.size == 22


def test_equalities_where_they_must_hold(pipeline):
    """One user: per user = per cohort = static. One state per user: per request = per user."""
    family = Family.ranking(ranking_grid(4))
    one_user = sample_states(pipeline, n_users=1, requests_per_user=4, seed=2)
    h = action_values(pipeline, one_user, family).headroom("clicks")
    assert h.user == pytest.approx(h.cohort) == pytest.approx(h.static)
    one_each = sample_states(pipeline, n_users=20, requests_per_user=1, seed=3)
    h = action_values(pipeline, one_each, family).headroom("long_views")
    assert h.request == pytest.approx(h.user) and h.n_states == h.n_users == 20


def test_values_are_the_cascades_exact_expectations(pipeline, states, values):
    """The oracle's column for (1, 1, 10) is World.expected_kpis / NDCG of the slate the cascade serves."""
    av, ref = values
    rec = pipeline.recommend(states.req, {"ranking": DEFAULT_PARAMS["ranking"]})
    exact = pipeline.world.expected_kpis(states.req.user, rec.slate)
    for k in ("clicks", "long_views", "purchases", "revenue"):
        np.testing.assert_allclose(av.kpis[k][:, ref], exact[k].sum(axis=1), rtol=1e-6)
    graded = pipeline.world.graded_relevance(states.req.user, rec.slate)
    ideal = pipeline.world.ideal_relevance(states.req.user, 5)
    np.testing.assert_allclose(av.kpis["ndcg"][:, ref], ndcg_at_k(graded, ideal, 5), rtol=1e-9)


def test_ranking_weights_are_scale_invariant(pipeline, states):
    """w and c·w rank identically: the family stores w/Σw, and its value is the cascade's with 7·w."""
    w = np.array([[2.0, 1.0, 30.0], [0.5, 3.0, 0.0]])
    np.testing.assert_allclose(simplex(w), simplex(7 * w))
    av = action_values(pipeline, states, Family.ranking(w))
    for a in range(2):
        slate = pipeline.recommend(states.req, {"ranking": 7 * w[a]}).slate
        clicks = pipeline.world.expected_kpis(states.req.user, slate)["clicks"].sum(axis=1)
        np.testing.assert_allclose(av.kpis["clicks"][:, a], clicks, rtol=1e-6)


def test_stage_family_product_grid_and_reference(pipeline, states):
    matching = np.array([[1.0, 0.05, 0.0, 0.05], [1.0, 0.05, 1.0, 0.05]])
    pre_ranking = np.array([[1.0, 0.1, 0.5], [1.0, 0.0, 1.0], [1.0, 0.3, 0.0]])
    family = Family.stages(matching=matching, pre_ranking=pre_ranking)
    assert family.size == 6 and family.stage_grid("ranking").shape == (6, 3)
    (h,) = oracle(pipeline, states, family, ["clicks"], reference={})  # the defaults
    rec = pipeline.recommend(states.req)
    exact = pipeline.world.expected_kpis(states.req.user, rec.slate)["clicks"].sum(axis=1).mean()
    assert h.reference == pytest.approx(exact, rel=1e-6) and h.n_actions == 7
    assert h.request >= h.user >= h.cohort - 1e-12 >= h.static - 2e-12 >= h.reference - 3e-12


def test_scalarised_objective_uses_sigma_over_states_and_actions(values):
    av, _ = values
    c, lv = av.kpis["clicks"], av.kpis["long_views"]
    np.testing.assert_allclose(objective_values(av.kpis, Scalarised(0.3)), 0.3 * c / c.std() + 0.7 * lv / lv.std())
    np.testing.assert_allclose(objective_values(av.kpis, Scalarised(1.0, scale=(2.0, 1.0))), c / 2.0)


def test_simulated_sessions_share_random_numbers_and_report_cis(pipeline):
    family = Family.ranking(np.array([[1.0, 1.0, 10.0], [1.0, 0.0, 0.0]]))
    users = np.arange(40)
    a = simulate_sessions(pipeline, family, np.zeros(40, int), users, seed=5)
    b = simulate_sessions(pipeline, family, np.zeros(40, int), users, seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert set(a) == {"ndcg", "return", "revenue", "clicks", "usage", "requests", "inner_return"} and np.all(
        (a["return"] > 0) & (a["return"] < 1)
    )
    h = session_headroom(pipeline, family, n_sessions=40, seed=1, reference=[1.0, 1.0, 10.0])
    assert h.n_actions == 3 and np.isfinite([*h.static, *h.cohort, *h.reference]).all()
    assert h.static[1] > 0 and h.cohort_minus_static[0] == pytest.approx(h.cohort[0] - h.static[0])


def _grid_with_unsearched_stage():
    return Family.ranking(np.eye(3)).with_action({"matching": [1.0, 0.0, 0.0, 0.0]})


BAD_INPUT = [
    (lambda: objective_values({}, "dwell_time"), "unknown objective 'dwell_time'"),
    (lambda: Scalarised(1.5), "λ must be in"),
    (lambda: Scalarised(0.5, ("clicks", "likes")), "unknown objective KPI"),
    (lambda: Family.ranking(np.zeros((0, 3))), "empty grid"),
    (lambda: Family.stages(), "empty grid"),
    (lambda: Family.stages(pre_ranking=np.zeros((0, 3))), "empty grid"),
    (lambda: Family("x", {}), "empty grid"),
    (lambda: Family("x", {"reranking": np.ones((2, 3))}), "unknown stage"),
    (lambda: Family.ranking(np.ones((2, 2))), r"weights must be \[A, 3\]"),
    (lambda: Family.ranking([[1.0, -1.0, 2.0]]), "non-negative"),
    (lambda: Family.ranking([[0.0, 0.0, 0.0]]), "not all zero"),
    (lambda: Family("x", {"pre_ranking": np.ones((2, 2))}), r"pre_ranking grid must be a non-empty \[A, 3\]"),
    (lambda: ranking_grid(0), "resolution must be"),
    (lambda: SessionObjective({"dwell": 1.0}), "unknown session KPI"),
    (_grid_with_unsearched_stage, "does not search matching"),
    (lambda: headroom(np.zeros((0, 2)), fake_states([], []), Family.ranking(np.eye(3)), "clicks"), "non-empty"),
]


@pytest.mark.parametrize("call, match", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_rejected_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_level_and_state_requests_by_name(pipeline, values):
    av, ref = values
    with pytest.raises(ValueError, match="unknown level 'galaxy'"):
        av.headroom("clicks", ref).lift("galaxy")
    with pytest.raises(ValueError, match="n_users must be in"):
        sample_states(pipeline, n_users=0)


def test_logged_requests_become_states(pipeline, states):
    """The sampled states, passed back as logged requests, give the same candidates; a scalar request id is refused."""
    again = states_from_requests(pipeline, states.req)
    np.testing.assert_array_equal(again.pre_ranked, states.pre_ranked)
    np.testing.assert_array_equal(again.cohort, states.cohort)
    with pytest.raises(ValueError, match="one request id per request"):
        states_from_requests(pipeline, RequestBatch(states.req.user, states.req.history, states.req.step, None, 0))
