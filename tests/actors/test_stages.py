"""The three stages and the cascade: shapes, parameter validation, containment, policies vs params,
the observation layout, the stage actors' policies, and in-process == actors."""

import itertools

import numpy as np
import pytest
import ray
import torch

import rust_ext
from actors.cascade import Pipeline, run_cascade
from actors.observation import CLICKS_SCALE, ObservationSpec
from actors.simulate import inner_rewards
from actors.stage_actors import ActorPipeline, StageRunner
from actors.stages import (
    PARAM_NAMES,
    STAGE_ACTION_HIGH,
    STAGES,
    RequestBatch,
    StageContext,
    _top_k_prefiltered,
    gumbel,
    history_embedding,
    ranking_predictions,
    retrieval_relevance,
    run_stage,
    stage_params,
    top_k,
    tower_t64,
    user_query,
)
from actors.world import COHORTS, PipelineConfig, World, WorldConfig
from actors.world.world import sigmoid

SMALL = WorldConfig(n_items=3000, n_users=500, seed=3)
PIPE = PipelineConfig(k_matching=200, k_pre_ranking=30, k_slate=8, seed=11)


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(World(SMALL), PIPE)


def request(b=6, request_id=42, clicks=None):
    rng = np.random.default_rng(0)
    hist = np.full((b, 20), -1, np.int64)
    hist[:, -3:] = rng.integers(0, SMALL.n_items, (b, 3))
    return RequestBatch(np.arange(b, dtype=np.int64) * 7, hist, np.zeros(b, np.int32), clicks, request_id)


def squashed(stage, cols):
    """A deterministic per-request stage policy: a = a_max · sigmoid(o[:, cols])."""
    return lambda obs: STAGE_ACTION_HIGH[stage] * sigmoid(obs[:, cols])


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


def test_cascade_is_the_stages_in_order(pipeline):
    req, ctx = request(), pipeline.ctx
    rec = pipeline.recommend(req)
    candidates = None
    for stage in STAGES:
        out = run_stage(ctx, PIPE, stage, req, candidates)
        candidates = out.items
    np.testing.assert_array_equal(rec.slate, candidates)
    np.testing.assert_array_equal(rec.scores, out.scores)
    upto = pipeline.recommend(req, upto="pre_ranking")
    assert upto.slate is None and upto.received("ranking") is not None
    np.testing.assert_array_equal(upto.pre_ranked, rec.pre_ranked)
    reused = pipeline.recommend(req, matched=rec.matched)
    np.testing.assert_array_equal(reused.slate, rec.slate)


@pytest.mark.parametrize(
    "policy_stages",
    [("ranking",), ("pre_ranking",), ("matching", "pre_ranking", "ranking")],
    ids=lambda s: "+".join(s),
)
def test_policy_equals_its_actions_as_params(pipeline, policy_stages):
    req = request(clicks=np.arange(6))
    where = pipeline.spec.slices  # each acts on a part of o_k that varies by request
    cols = {
        "matching": slice(where["user_tower"].start, where["user_tower"].start + 4),
        "pre_ranking": slice(where["history"].start, where["history"].start + 3),
        "ranking": slice(where["candidates"].start, where["candidates"].start + 3),
    }
    policies = {s: squashed(s, cols[s]) for s in policy_stages}
    by_policy = pipeline.recommend(req, policies=policies)
    by_params = pipeline.recommend(req, {s: by_policy.actions[s] for s in policy_stages}, observe=True)
    for s in policy_stages:
        assert by_policy.actions[s].shape == (6, len(PARAM_NAMES[s]))
        np.testing.assert_array_equal(by_policy.observations[s], by_params.observations[s])
        np.testing.assert_allclose(by_policy.actions[s], policies[s](by_params.observations[s]), rtol=1e-6)
    for name in ("matched", "pre_ranked", "slate", "scores"):
        np.testing.assert_array_equal(getattr(by_policy, name), getattr(by_params, name))
    # a policy takes precedence over params for the same stage
    both = pipeline.recommend(req, {s: np.zeros(len(PARAM_NAMES[s])) for s in policy_stages}, policies)
    np.testing.assert_array_equal(both.slate, by_policy.slate)


def test_observations_are_the_spec_of_what_each_stage_received(pipeline):
    req = request(clicks=np.array([0, 1, 2, 3, 4, 5]))
    params = {"matching": [1.5, 0.2, 0.4, 0.1], "pre_ranking": [1.0, 0.5, 1.5]}
    rec = pipeline.recommend(req, params, observe=True)
    spec, context = pipeline.spec, pipeline.context(req)
    for stage in STAGES:
        expected = spec.stage_observation(pipeline.ctx, context, stage, rec.received(stage), rec.actions)
        np.testing.assert_array_equal(rec.observations[stage], expected)
    a1 = spec.field(rec.observations["ranking"], "upstream")[:, :4] * STAGE_ACTION_HIGH["matching"]
    np.testing.assert_allclose(a1, np.broadcast_to(params["matching"], (6, 4)), rtol=1e-6)
    np.testing.assert_array_equal(spec.field(rec.observations["matching"], "candidates"), 0.0)


BAD_CASCADE = [
    ("unknown stage in params", {"params": {"reranking": [1.0]}}, r"unknown stage\(s\) \['reranking'\]"),
    ("unknown stage in policies", {"policies": {"slate": np.ones}}, r"unknown stage\(s\) \['slate'\]"),
    ("bad upto", {"upto": "slate"}, "upto must be one of"),
    ("short vector", {"params": {"ranking": [1.0, 2.0]}}, r"ranking params must have shape \(3,\) or \(6, 3\)"),
    ("wrong batch", {"params": {"matching": np.ones((2, 4))}}, r"matching params must have shape \(4,\) or \(6, 4\)"),
    ("NaN", {"params": {"matching": [1.0, np.nan, 0, 0]}}, "matching params must be finite"),
    ("inf", {"params": {"pre_ranking": [1.0, np.inf, 0]}}, "pre_ranking params must be finite"),
    (
        "policy of the wrong width",
        {"policies": {"ranking": lambda o: np.ones((len(o), 2))}},
        r"ranking params must have shape",
    ),
    ("policy without ctx", {"ctx": None, "policies": {"ranking": np.ones_like}}, "needs the StageContext"),
    ("observe without ctx", {"ctx": None, "observe": True}, "needs the StageContext"),
]


@pytest.mark.parametrize("kwargs, msg", [c[1:] for c in BAD_CASCADE], ids=[c[0] for c in BAD_CASCADE])
def test_bad_cascade_inputs_are_rejected(pipeline, kwargs, msg):
    kwargs = dict(kwargs)
    ctx = kwargs.pop("ctx", pipeline.ctx)
    with pytest.raises(ValueError, match=msg):
        run_cascade(ctx, PIPE, request(), **kwargs)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda ctx: stage_params([1.0, 2.0], "ranking", 4), r"ranking params must have shape \(3,\) or \(4, 3\)"),
        (lambda ctx: stage_params(np.ones((4, 3)), "matching", 4), r"matching params must have shape \(4,\)"),
        (lambda ctx: stage_params([1.0, -np.inf, 0.0], "pre_ranking", 2), "pre_ranking params must be finite"),
        (lambda ctx: run_stage(ctx, PIPE, "reranking", request(), np.zeros((6, 5), np.int64)), "stage must be one of"),
        (lambda ctx: run_stage(ctx, PIPE, "ranking", request()), "ranking needs the upstream candidates"),
    ],
    ids=["stage_params short", "stage_params batch", "stage_params inf", "run_stage unknown", "run_stage no input"],
)
def test_bad_stage_inputs_are_rejected(pipeline, call, msg):
    with pytest.raises(ValueError, match=msg):
        call(pipeline.ctx)


def test_observation_spec_layout_and_context():
    world = World(WorldConfig(n_items=60, n_users=12, embed_dim=4, max_requests=5, seed=1))
    pipe = Pipeline(world, PipelineConfig(k_matching=20, k_pre_ranking=10, k_slate=5))
    spec, ctx, d = pipe.spec, pipe.ctx, 4
    assert spec == ObservationSpec(embed_dim=d, max_requests=5)
    # named slices are contiguous, in order, and cover [0, dim)
    ordered = sorted(spec.slices.values(), key=lambda s: s.start)
    assert ordered[0].start == 0 and ordered[-1].stop == spec.dim
    assert all(a.stop == b.start for a, b in zip(ordered, ordered[1:]))
    assert spec.context_dim == 2 * d + len(COHORTS) + 2
    assert spec.dim == spec.context_dim + (d + 2) + sum(len(PARAM_NAMES[s]) for s in ("matching", "pre_ranking"))

    hist = np.array([[-1, -1, 3], [-1, -1, -1], [7, 8, 9]], np.int64)
    req = RequestBatch(np.array([0, 5, 11]), hist, np.array([0, 2, 9], np.int32), np.array([0, 3, 1000]), 7)
    context = pipe.context(req)
    assert context.shape == (3, spec.context_dim) and context.dtype == np.float32
    # decode the cohort one-hot
    cohort = spec.field(context, "cohort")
    np.testing.assert_array_equal(cohort.sum(axis=1), 1.0)
    np.testing.assert_array_equal(cohort.argmax(axis=1), world.users.cohort[req.user])
    # the layout by hand: [user tower | mean clicked-item tower | cohort | step / max | clicks / 10], clipped
    hand = np.zeros((3, spec.context_dim), np.float32)
    hand[:, :d] = ctx.user_tower[req.user]
    hand[0, d : 2 * d] = ctx.item_tower[3]
    hand[2, d : 2 * d] = ctx.item_tower[[7, 8, 9]].mean(axis=0)
    hand[np.arange(3), 2 * d + world.users.cohort[req.user]] = 1.0
    hand[:, -2] = [0.0, 2 / 5, 1.0]  # step 9 > max_requests is clipped to 1
    hand[:, -1] = [0.0, 3 / CLICKS_SCALE, 5.0]  # clicks clipped to CLICKS_SCALE · max_requests
    np.testing.assert_allclose(context, hand, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(spec.field(context, "history"), history_embedding(ctx, hist), rtol=1e-6)
    # the same field of a stage observation (the context is its prefix)
    obs = spec.stage_observation(
        ctx,
        context,
        "ranking",
        np.array([[1, 2]] * 3),
        {
            "matching": STAGE_ACTION_HIGH["matching"][None].repeat(3, 0),
            "pre_ranking": np.zeros((3, 3), np.float32),
        },
    )
    assert obs.shape == (3, spec.dim)
    np.testing.assert_array_equal(spec.field(obs, "cohort"), cohort)
    np.testing.assert_array_equal(obs[:, spec.upstream_offsets("ranking")["matching"]], 1.0)
    np.testing.assert_array_equal(spec.field(obs, "upstream")[:, 4:], 0.0)


def test_pipeline_config_checks_sizes():
    with pytest.raises(ValueError, match="k_matching >= k_pre_ranking >= k_slate"):
        PipelineConfig(k_matching=10, k_pre_ranking=50)


def test_stage_runner_runs_its_stage_and_serves_a_policy(pipeline):
    runner = StageRunner("ranking", SMALL, PIPE)
    req = request()
    out, version = runner.run(req, pipeline.recommend(req).pre_ranked)
    np.testing.assert_array_equal(out.items, pipeline.recommend(req).slate)
    assert version == 1 and runner.set_params([0.0, 0.0, 1.0]) == 2
    with pytest.raises(ValueError, match="no policy set"):
        runner.act(np.zeros((1, pipeline.spec.dim), np.float32))
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(pipeline.spec.dim, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    state = {k: v.numpy() for k, v in mlp.state_dict().items()}
    assert runner.set_policy(state, STAGE_ACTION_HIGH["ranking"].tolist(), 5) == 5
    obs = pipeline.recommend(req, observe=True).observations["ranking"]
    actions, policy_version = runner.act(obs)
    with torch.no_grad():
        expected = STAGE_ACTION_HIGH["ranking"] * torch.sigmoid(mlp(torch.as_tensor(obs))).numpy()
    assert policy_version == 5 and actions.shape == (6, 3) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)
    # the served policy through the cascade == its actions as ranking params
    served = pipeline.recommend(req, policies={"ranking": lambda o: runner.act(o)[0]})
    np.testing.assert_array_equal(served.slate, pipeline.recommend(req, {"ranking": actions}).slate)


def test_same_request_id_same_slate_other_id_other_noise(pipeline):
    a, b = pipeline.recommend(request(request_id=1)), pipeline.recommend(request(request_id=1))
    np.testing.assert_array_equal(a.slate, b.slate)
    c = pipeline.recommend(request(request_id=2))
    assert not np.array_equal(a.scores, c.scores)


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
        assert hot.versions["ranking"] == 2 and hot.actions == {}
        given = actors.recommend(req, {"ranking": [1.0, 0.0, 0.0]})
        np.testing.assert_array_equal(given.slate, pipeline.recommend(req, {"ranking": [1.0, 0.0, 0.0]}).slate)
        assert set(given.actions) == {"ranking"}
        with pytest.raises(ray.exceptions.RayTaskError, match="expected_version 1"):
            actors.set_params("ranking", new, expected_version=1)
    finally:
        actors.shutdown()


@pytest.mark.ray
def test_served_stages_run_many_gives_each_call_what_it_gets_alone(ray_session, pipeline):
    """Micro-batching: one pass of each served stage over four requests gives each request its own result —
    its rows, its random streams, its own ranking weights where it brings them, else the published ranking
    policy's (whose version it then names) — and says how many requests ran together."""
    import time
    import uuid

    from actors.served_policies import publish_stage_policy
    from actors.stage_actors import ServedStage, run_served_cascade

    prefix = f"many_{uuid.uuid4().hex[:8]}"
    stages = {s: ServedStage(s, SMALL, PIPE, prefix, "r1") for s in STAGES}
    try:
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(pipeline.spec.dim, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        publish_stage_policy(prefix, "ranking", mlp.state_dict(), STAGE_ACTION_HIGH["ranking"])
        deadline = time.monotonic() + 30
        while stages["ranking"].policy.current[1] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        reqs = [request(b=4, request_id=rid).take(np.array([i])) for i, rid in enumerate((5, 6, 7, 8))]
        own = [None, np.array([0.0, 1.0, 5.0], np.float32), None, np.array([1.0, 0.0, 0.0], np.float32)]
        alone = [{} for _ in reqs]
        for i, r in enumerate(reqs):  # one request at a time, as a replica without micro-batching runs them
            cand, actions = None, {}
            for s in STAGES:
                alone[i][s] = stages[s].run(r, cand, own[i] if s == "ranking" else None, dict(actions))
                cand, actions[s] = alone[i][s].out.items, alone[i][s].action
        together = run_served_cascade(stages, [(r, {"ranking": w} if w is not None else {}) for r, w in zip(reqs, own)])
        for i, s in itertools.product(range(4), STAGES):
            batched, one = together[i][s], alone[i][s]
            np.testing.assert_array_equal(batched.out.items, one.out.items)
            np.testing.assert_allclose(batched.out.scores, one.out.scores, rtol=1e-6)
            np.testing.assert_allclose(batched.action, one.action, rtol=1e-6)
            assert batched.batch == 4 and one.batch == 1 and batched.policy_version == one.policy_version
        assert [alone[i]["ranking"].policy_version is None for i in range(4)] == [False, True, False, True]
        served = together[0]["ranking"]
        np.testing.assert_array_equal(served.out.items, pipeline.recommend(reqs[0], {"ranking": served.action}).slate)
    finally:
        for stage in stages.values():
            stage.stop()


# ------------------------------------------------------------------ the inner reward's relevance term
def test_retrieval_relevance_is_the_two_tower_similarity(pipeline):
    ctx, req = pipeline.ctx, request()
    slate = pipeline.recommend(req).slate
    u = ctx.user_tower[req.user].astype(np.float64)
    v = ctx.item_tower[slate].astype(np.float64)
    cos = np.einsum("bd,bkd->bk", u, v) / (np.linalg.norm(u, axis=1)[:, None] * np.linalg.norm(v, axis=2))
    rel = retrieval_relevance(ctx, req.user, slate)
    assert rel.shape == slate.shape and rel.dtype == np.float32
    np.testing.assert_allclose(rel, (1 + cos) / 2, atol=1e-6)
    # bounded on the whole catalogue, its extremes included
    users = np.arange(20)
    everything = retrieval_relevance(ctx, users, np.broadcast_to(np.arange(SMALL.n_items), (20, SMALL.n_items)))
    assert 0.0 <= everything.min() < 0.2 and 0.8 < everything.max() <= 1.0


@pytest.mark.parametrize(
    "user, items, msg",
    [
        (np.arange(3), np.zeros(3, np.int64), r"user must be \[B\] and items \[B, K\]"),
        (np.arange(3), np.zeros((2, 4), np.int64), r"user must be \[B\] and items \[B, K\]"),
        (np.array(1), np.zeros((1, 4), np.int64), r"user must be \[B\] and items \[B, K\]"),
    ],
    ids=["items-1d", "batch-mismatch", "scalar-user"],
)
def test_retrieval_relevance_rejects_bad_shapes(pipeline, user, items, msg):
    with pytest.raises(ValueError, match=msg):
        retrieval_relevance(pipeline.ctx, user, items)


def test_inner_reward_does_not_move_with_the_rankers_predictions(pipeline):
    """Same slate, same response, different ranker (prediction noise, ranking weights) → identical
    inner rewards, equal to the kernel fed the towers' similarity (and not the ranker's p_click)."""
    ctx, world, req = pipeline.ctx, pipeline.world, request()
    slate = pipeline.recommend(req).slate
    resp = world.respond(req.user, slate, np.random.default_rng(5))
    p_click = {
        noise: ranking_predictions(ctx, req, slate, noise, np.random.default_rng(int(noise * 10)))["p_click"]
        for noise in (0.0, 1.5)
    }
    assert not np.allclose(p_click[0.0], p_click[1.5])  # the rankers disagree
    rewards, totals = inner_rewards(ctx, req.user, slate, resp)
    again, _ = inner_rewards(ctx, req.user, slate.copy(), resp)
    np.testing.assert_array_equal(rewards, again)
    kernel = lambda rel: rust_ext.inner_reward_numpy(  # noqa: E731
        resp.clicked.ravel(), resp.dwell_s.ravel(), resp.skipped.ravel(), np.asarray(rel, np.float32).ravel()
    ).reshape(slate.shape)
    np.testing.assert_allclose(rewards, kernel(retrieval_relevance(ctx, req.user, slate)), atol=1e-5)
    np.testing.assert_allclose(totals, rewards.sum(axis=1), rtol=1e-5, atol=1e-5)
    for p in p_click.values():
        assert not np.allclose(rewards, kernel(p), atol=1e-3)


def test_inner_rewards_rejects_a_slate_that_is_not_the_responses(pipeline):
    req = request(2)
    slate = np.arange(16).reshape(2, 8)
    resp = pipeline.world.respond(req.user, slate, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"slate \(2, 4\) and response \(2, 8\)"):
        inner_rewards(pipeline.ctx, req.user, slate[:, :4], resp)


def test_build_world_caches_configs_with_list_values():
    """YAML gives tuples as lists: the cache key must still work, and equal configs share one world."""
    from actors.cascade import build_world

    cfg = {"world": {"n_items": 2000, "n_users": 300, "cohort_shares": [0.3, 0.5, 0.2]}}
    world, pipeline = build_world(cfg)
    again, _ = build_world({"world": dict(reversed(list(cfg["world"].items())))})
    assert again is world and pipeline.world is world


@pytest.mark.parametrize(
    ("b", "n", "k"),
    [(1, 20_000, 500), (8, 20_000, 500), (3, 9_000, 500), (2, 500, 50), (4, 1_000, 500)],
)
def test_top_k_selects_what_a_full_partition_selects(b, n, k):
    """top_k (prefiltered where a row holds ≥ 16·k scores) keeps each row's k highest scores, ordered on request,
    in column order otherwise, and a row gets the same columns alone as in its batch; one row of ties."""
    scores = np.random.default_rng(n + b).standard_normal((b, n)).astype(np.float32)
    scores[-1] = 1.0 if b > 1 else scores[-1]  # a row of ties: every score passes the threshold
    if n >= 16 * k:
        assert _top_k_prefiltered(scores, k) is not None  # the prefilter itself answered, not the fallback
    idx = top_k(scores, k, ordered=False)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    assert idx.shape == (b, k) and all(len(set(row)) == k for row in idx)
    assert (np.take_along_axis(scores, idx, axis=1) >= kth).all() and (np.diff(idx, axis=1) > 0).all()
    for i in range(b):
        np.testing.assert_array_equal(top_k(scores[i : i + 1], k, ordered=False)[0], idx[i])
    ordered = np.take_along_axis(scores, top_k(scores, k, ordered=True), axis=1)
    assert (np.diff(ordered, axis=1) <= 0).all()


@pytest.mark.parametrize(("seed", "size"), [(0, (1, 20_000)), (1, (8, 20_000)), (2, (3, 7)), (3, (0, 5)), (4, 100_000)])
def test_gumbel_draws_what_generator_gumbel_draws(seed, size):
    """Matching's exploration noise: the same float32 values as ``Generator.gumbel`` cast, from the same uniform
    stream, which stays in step afterwards (the world's random numbers do not change)."""
    fast, reference = np.random.default_rng(seed), np.random.default_rng(seed)
    drawn = gumbel(fast, size)
    assert drawn.dtype == np.float32 and drawn.shape == np.empty(size).shape
    np.testing.assert_array_equal(drawn, reference.gumbel(size=size).astype(np.float32))
    assert fast.random() == reference.random()


@pytest.mark.parametrize("b", [1, 3, 64])
def test_the_float64_tower_scores_what_the_float32_one_did(b):
    """Matching scores ⟨q, item⟩ with a float64 query: against the float64 copy of the tower made once
    (``tower_t64``), bit for bit what NumPy computed when it converted the float32 tower on every request."""
    ctx = StageContext(World(WorldConfig(n_items=3000, n_users=20)), 0)
    req = RequestBatch(np.arange(b) % 20, np.tile([-1, 4, 7], (b, 1)), np.zeros(b, np.int32))
    q = user_query(ctx, req, np.full(b, 0.5, np.float32))
    assert q.dtype == np.float64 and ctx.item_tower.dtype == np.float32
    np.testing.assert_array_equal(q @ tower_t64(ctx), q @ ctx.item_tower.T)
    assert tower_t64(ctx) is tower_t64(ctx)  # made once


def test_gumbel_keeps_u_zero_finite():
    """U = 0 (which ``Generator.gumbel`` redraws) gives the cap's finite value, not +inf."""

    class Zeros:
        def random(self, size):
            return np.zeros(size)

    assert np.isfinite(gumbel(Zeros(), 3)).all() and gumbel(Zeros(), 1)[0] == pytest.approx(36.7, abs=0.05)


def test_top_k_falls_back_where_the_threshold_starves_a_row():
    """A row whose sampled scores (every 16th) are its only high ones lets fewer than k through: the prefilter
    declines and the full partition answers, for that row and the rest of its batch."""
    scores = np.random.default_rng(0).standard_normal((2, 20_000)).astype(np.float32)
    scores[1] = -10.0
    scores[1, ::16] = np.arange(1250)
    assert _top_k_prefiltered(scores, 500) is None
    full = np.sort(np.argpartition(-scores, 499, axis=1)[:, :500], axis=1)
    np.testing.assert_array_equal(top_k(scores, 500, ordered=False), full)
