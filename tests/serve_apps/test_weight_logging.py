"""Gaussian weight logging (serve_apps/weight_logging.py): the sampler draws exactly from the truncated
Gaussian whose density it logs, and the recommend app logs μ and that density with every event."""

import tempfile
import time
import uuid
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest
from scipy import stats

from actors.stages import DEFAULT_PARAMS, RANKING_ACTION_HIGH
from serve_apps.recommend import app_builder
from serve_apps.weight_logging import WeightLogging

STD = np.array([0.3, 0.5, 0.2])


def truncnorm_marginals(wl: WeightLogging, mean: np.ndarray, std: np.ndarray) -> list:
    """scipy's truncated normal per dimension over a = log w, around log μ (μ moved into the box)."""
    mu = np.log(wl.clip_mean(mean).astype(np.float64))
    a, b = (wl.log_low - mu) / std, (wl.log_high - mu) / std
    return [stats.truncnorm(a[j], b[j], loc=mu[j], scale=std[j]) for j in range(len(mu))]


def test_box_is_floor_high_to_high_in_log_space():
    wl = WeightLogging.from_config({"std": 0.3})
    np.testing.assert_allclose(wl.weight_low, 1e-3 * RANKING_ACTION_HIGH, rtol=1e-6)
    np.testing.assert_array_equal(wl.weight_high, RANKING_ACTION_HIGH)
    np.testing.assert_allclose(wl.log_low, np.log(1e-3 * RANKING_ACTION_HIGH), atol=1e-6)
    assert (wl.weight_low.astype(np.float64) >= 1e-3 * RANKING_ACTION_HIGH.astype(np.float64)).all()
    # μ: a zero weight is lifted to floor·high, one above high lowered to it
    np.testing.assert_array_equal(wl.clip_mean([0.0, 1.0, 1e3]), [wl.weight_low[0], 1.0, wl.weight_high[2]])


@pytest.mark.parametrize("config", [{"std": STD.tolist(), "seed": 3}, {"cov": np.diag(STD**2).tolist(), "seed": 3}])
def test_draws_stay_in_the_box_and_log_the_truncnorm_density(config):
    wl = WeightLogging.from_config(config)
    rng = wl.rng("replica-a")
    for mean in ([1.0, 1.0, 10.0], [1.0, 0.0, 40.0], [2.0, 1e-4, 1e6]):
        for _ in range(50):
            weights, mu, log_density = wl.draw(np.asarray(mean), rng)
            assert weights.dtype == np.float32 and mu.dtype == np.float32
            assert ((weights >= wl.weight_low) & (weights <= wl.weight_high)).all()
            log_w = np.log(weights.astype(np.float64))
            expected = sum(d.logpdf(x) for d, x in zip(truncnorm_marginals(wl, mean, STD), log_w))
            assert np.isfinite(log_density) and log_density == pytest.approx(expected, abs=1e-9)
            # recomputed from what telemetry stores (float32 μ and weights): identical
            assert wl.log_density(mu, weights)[0] == log_density


@pytest.mark.parametrize("config", [{"std": STD.tolist(), "seed": 0}, {"cov": np.diag(STD**2).tolist(), "seed": 0}])
def test_sample_distribution_is_the_truncated_gaussian(config):
    """KS per dimension of 20 000 draws against scipy.stats.truncnorm (μ near the box's edges, so the
    truncation matters): the diagonal path (truncnorm) and the full-Σ path (rejection) alike."""
    wl = WeightLogging.from_config(config)
    mean = np.array([1.8, 0.0, 20.0])  # w_click near high, w_long_view at the floor
    a = wl.sample_log(np.tile(mean, (20_000, 1)), wl.rng())
    for j, dist in enumerate(truncnorm_marginals(wl, mean, STD)):
        assert stats.kstest(a[:, j], dist.cdf).pvalue > 1e-3, j
    # the truncation is visible: the lower edge holds about half the w_long_view draws' mass
    assert (a[:, 1] >= wl.log_low[1]).all() and np.mean(a[:, 1] < wl.log_low[1] + STD[1]) > 0.5


def test_correlated_covariance_draws_inside_and_density_normalises():
    """A full Σ: draws inside the box, and the logged density integrates to 1 over the box (Monte Carlo)."""
    cov = np.array([[0.09, 0.05, 0.0], [0.05, 0.25, -0.04], [0.0, -0.04, 0.04]])
    wl = WeightLogging.from_config({"cov": cov.tolist(), "seed": 1})
    mean = np.array([1.8, 0.01, 30.0])
    a = wl.sample_log(np.tile(mean, (2000, 1)), wl.rng())
    assert ((a >= wl.log_low) & (a <= wl.log_high)).all()
    # E_uniform[π(a)] · vol(box) = 1 on a sub-box holding all the mass (±6σ around log μ, within the box)
    mu = np.log(wl.clip_mean(mean).astype(np.float64))
    lo = np.maximum(wl.log_low, mu - 6 * np.sqrt(np.diag(cov)))
    hi = np.minimum(wl.log_high, mu + 6 * np.sqrt(np.diag(cov)))
    u = np.random.default_rng(2).uniform(lo, hi, (400_000, 3))
    density = np.exp(wl.policy(mean).log_density(u))
    assert density.mean() * np.prod(hi - lo) == pytest.approx(1.0, abs=0.02)


def test_full_covariance_without_an_exact_draw_refuses():
    wl = WeightLogging.from_config({"cov": np.diag([1e6] * 3).tolist(), "max_tries": 10, "seed": 0})
    assert wl.draw(np.array([1.0, 1.0, 10.0]), wl.rng()) is None


def test_seeded_streams_repeat_and_differ_per_replica():
    wl = WeightLogging.from_config({"seed": 7})
    mean = np.array([1.0, 1.0, 10.0])
    first = wl.sample_log(np.tile(mean, (5, 1)), wl.rng("a"))
    np.testing.assert_array_equal(first, wl.sample_log(np.tile(mean, (5, 1)), wl.rng("a")))
    assert not np.allclose(first, wl.sample_log(np.tile(mean, (5, 1)), wl.rng("b")))
    assert WeightLogging.from_config(None) is None


@pytest.mark.parametrize(
    "config, match",
    [
        ({"std": -0.1}, r"weight_logging\.std must be finite and > 0"),
        ({"std": [0.3, 0.0, 0.3]}, r"weight_logging\.std must be finite and > 0"),
        ({"std": [0.3, 0.3]}, r"weight_logging\.std has 2 entries; expected one float or 3"),
        ({"floor": 0}, r"weight_logging\.floor must be a number in \(0, 1\)"),
        ({"floor": 1.0}, r"weight_logging\.floor must be a number in \(0, 1\)"),
        ({"floor": -1e-3}, r"weight_logging\.floor must be a number in \(0, 1\)"),
        (
            {"cov": [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]},
            r"weight_logging\.cov must be positive definite",
        ),
        ({"cov": [[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]}, r"weight_logging\.cov must be symmetric"),
        ({"cov": [[1.0, 0.0], [0.0, 1.0]]}, r"weight_logging\.cov has shape \(2, 2\); expected \(3, 3\)"),
        ({"std": 0.3, "cov": np.eye(3).tolist()}, r"give 'std' .* or 'cov' .*, not both"),
        ({"sigma": 0.3}, r"weight_logging: unknown keys \['sigma'\]"),
        ({"seed": -1}, r"weight_logging\.seed must be an integer >= 0"),
        ({"max_tries": 0}, r"weight_logging\.max_tries must be an integer >= 1"),
    ],
)
def test_bad_config_is_refused_naming_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        WeightLogging.from_config(config)


LOG_HIGH = np.log(RANKING_ACTION_HIGH.astype(np.float64))


@pytest.mark.parametrize(
    "std, low, high, match",
    [
        (STD, LOG_HIGH - np.log([1e3, 1e3, 1e2]), LOG_HIGH, r"a log-weight box \[log\(floor·w_max\)"),
        (STD, LOG_HIGH + 1.0, LOG_HIGH, r"one floor in \(0, 1\)"),
        (np.array([0.3, -0.1, 0.3]), LOG_HIGH + np.log(1e-3), LOG_HIGH, "std must be 3 finite values > 0"),
        (np.array([0.3, 0.3]), LOG_HIGH + np.log(1e-3), LOG_HIGH, "std must be 3 finite values > 0"),
    ],
)
def test_a_learned_policys_box_serving_cannot_draw_on_is_refused(std, low, high, match):
    with pytest.raises(ValueError, match=match):
        WeightLogging.on_box(std, low, high)


def test_on_the_serving_box_a_learned_policy_logs_like_weight_logging():
    own = WeightLogging.on_box(STD, LOG_HIGH + np.log(1e-3), LOG_HIGH, seed=0)
    configured = WeightLogging.from_config({"std": STD.tolist(), "seed": 0})
    np.testing.assert_array_equal(own.weight_low, configured.weight_low)
    np.testing.assert_array_equal(own.weight_high, configured.weight_high)
    mean = np.array([1.0, 1.0, 10.0], np.float32)
    assert own.draw(mean, own.rng("r"))[2] == configured.draw(mean, configured.rng("r"))[2]


def test_app_builder_refuses_bad_weight_logging_at_build_time():
    with pytest.raises(ValueError, match=r"weight_logging\.std must be finite and > 0"):
        app_builder({"weight_logging": {"std": [0.3, -1.0, 0.3]}})


# ------------------------------------------------------------------ a real Serve app with weight logging on

ARGS = {"world": {"n_items": 3000, "n_users": 500}, "pipeline": {"k_matching": 200, "k_pre_ranking": 30, "k_slate": 8}}
LOGGING = {"std": STD.tolist(), "seed": 0}


@pytest.fixture(scope="module")
def client(serve_url):
    from ray import serve

    from serve_apps import inner_reward

    prefix = f"wl_test_{uuid.uuid4().hex[:8]}"
    serve.run(
        inner_reward.app_builder({"weights_store": f"{prefix}_inner"}), name="wl_test_inner", route_prefix="/wl_ir"
    )
    events = tempfile.mkdtemp(prefix="morl-events-wl-")
    serve.run(
        app_builder(
            {
                **ARGS,
                "store_prefix": prefix,
                "inner_reward_app": "wl_test_inner",
                "telemetry": {"sink": "parquet", "path": events, "flush_interval_s": 0.01},
                "weight_logging": LOGGING,
            }
        ),
        name="weight_logging_test",
        route_prefix="/wl",
    )
    with httpx.Client(base_url=f"{serve_url}/wl", timeout=60) as c:
        c.events_root = events
        yield c
    serve.delete("weight_logging_test")
    serve.delete("wl_test_inner")


@pytest.mark.ray
@pytest.mark.serve
def test_served_weights_mean_and_density_reach_the_events(client):
    from actors.telemetry import read_parquet_events

    wl = WeightLogging.from_config(LOGGING)
    user, n_slate = 17, 8
    feedback = {"clicked": [True] + [False] * 7, "dwell_s": [5.0] + [0.0] * 7, "skipped": [False] + [True] * 7}
    logged = {}
    for step in range(4):
        rec = client.post("/recommend", json={"user_id": user, "step": step})
        assert rec.status_code == 200, rec.text
        body = rec.json()["weight_logging"]
        # μ = the ranking stage's held weights (no agent, no per-request weights); served ≠ μ
        np.testing.assert_allclose(body["mean"], DEFAULT_PARAMS["ranking"], rtol=1e-6)
        assert not np.allclose(body["weights"], body["mean"])
        assert body["log_density"] == pytest.approx(wl.log_density(body["mean"], body["weights"])[0], abs=1e-9)
        logged[rec.json()["request_id"]] = body
        fb = client.post("/feedback", json={"request_id": rec.json()["request_id"], **feedback})
        assert fb.status_code == 200, fb.text
    # explicit per-request weights are served as given: nothing drawn, nothing logged
    rec = client.post("/recommend", json={"user_id": user, "step": 9, "ranking_weights": [1.0, 0.5, 5.0]})
    assert rec.status_code == 200 and rec.json()["weight_logging"] is None
    explicit_id = rec.json()["request_id"]
    assert client.post("/feedback", json={"request_id": explicit_id, **feedback}).status_code == 200

    emitted = client.get("/telemetry").json()["emitted"]
    deadline = time.time() + 10
    while time.time() < deadline and client.get("/telemetry").json()["flushed"] < emitted:
        time.sleep(0.05)
    events = read_parquet_events(client.events_root)
    mine = events.filter(pa.compute.equal(events["user_id"], user))
    assert mine.num_rows == 5 * n_slate
    rows = mine.to_pylist()
    for request_id, body in logged.items():
        slate = [r for r in rows if r["request_id"] == request_id]
        assert len(slate) == n_slate
        for r in slate:  # every position carries the request's served weights, μ and density
            np.testing.assert_array_equal(np.float32(r["utility_weights"]), np.float32(body["weights"]))
            np.testing.assert_array_equal(np.float32(r["weight_mean"]), np.float32(body["mean"]))
            assert r["weight_log_density"] == body["log_density"]
    # the logged density is recomputable from the logged columns alone
    drawn = mine.filter(pa.compute.is_valid(mine["weight_log_density"]))
    assert drawn.num_rows == 4 * n_slate
    recomputed = wl.log_density(
        np.stack(drawn["weight_mean"].to_numpy(zero_copy_only=False)),
        np.stack(drawn["utility_weights"].to_numpy(zero_copy_only=False)),
    )
    np.testing.assert_array_equal(recomputed, drawn["weight_log_density"].to_numpy())
    explicit = [r for r in rows if r["request_id"] == explicit_id]
    assert all(r["weight_mean"] is None and r["weight_log_density"] is None for r in explicit)
    np.testing.assert_allclose(explicit[0]["utility_weights"], [1.0, 0.5, 5.0])


@pytest.fixture(scope="module")
def explore_client(serve_url, client):
    """The same app with the utility agent in explore mode: μ is the agent's grid point (feedback scored by the
    first app's inner-reward app)."""
    from ray import serve

    prefix = f"wlx_test_{uuid.uuid4().hex[:8]}"
    events = tempfile.mkdtemp(prefix="morl-events-wlx-")
    serve.run(
        app_builder(
            {
                **ARGS,
                "store_prefix": prefix,
                "inner_reward_app": "wl_test_inner",
                "telemetry": {"sink": "parquet", "path": events, "flush_interval_s": 0.01},
                "utility_agent": {"mode": "explore", "timeout_s": 30},
                "weight_logging": {"cov": np.diag(STD**2).tolist(), "seed": 1},
            }
        ),
        name="weight_logging_explore_test",
        route_prefix="/wlx",
    )
    with httpx.Client(base_url=f"{serve_url}/wlx", timeout=60) as c:
        c.events_root = events
        yield c
    serve.delete("weight_logging_explore_test")


@pytest.mark.ray
@pytest.mark.serve
def test_with_an_agent_the_mean_is_its_choice_and_its_propensity_stays(explore_client):
    from actors.telemetry import read_parquet_events

    wl = WeightLogging.from_config({"cov": np.diag(STD**2).tolist()})
    user = 23
    feedback = {"clicked": [False] * 8, "dwell_s": [0.0] * 8, "skipped": [True] * 8}
    for step in range(3):
        rec = explore_client.post("/recommend", json={"user_id": user, "step": step})
        assert rec.status_code == 200, rec.text
        choice, body = rec.json()["utility"], rec.json()["weight_logging"]
        assert choice["mode"] == "explore" and choice["propensity"] == pytest.approx(1 / 49)
        np.testing.assert_array_equal(np.float32(body["mean"]), wl.clip_mean(choice["weights"]))
        assert body["log_density"] == pytest.approx(wl.log_density(body["mean"], body["weights"])[0], abs=1e-9)
        assert explore_client.post("/feedback", json={"request_id": rec.json()["request_id"], **feedback}).is_success
    emitted = explore_client.get("/telemetry").json()["emitted"]
    deadline = time.time() + 10
    while time.time() < deadline and explore_client.get("/telemetry").json()["flushed"] < emitted:
        time.sleep(0.05)
    events = read_parquet_events(explore_client.events_root)
    mine = events.filter(pa.compute.equal(events["user_id"], user))
    assert mine.num_rows == 24
    np.testing.assert_allclose(mine["propensity"].to_numpy(), 1 / 49, rtol=1e-6)  # the grid draw's probability
    recomputed = wl.log_density(
        np.stack(mine["weight_mean"].to_numpy(zero_copy_only=False)),
        np.stack(mine["utility_weights"].to_numpy(zero_copy_only=False)),
    )
    np.testing.assert_array_equal(recomputed, mine["weight_log_density"].to_numpy())


# ------------------------------------------------------------------ the CRM weight policy served


@contextmanager
def recommend_app(serve_url: str, name: str, route: str, **args):
    """A recommend app on ARGS (+ ``args``) under ``route``, scoring feedback on the first app's inner-reward
    deployment, its events in a fresh Parquet folder; yields an HTTP client with ``events_root`` and
    ``store_prefix``."""
    from ray import serve

    prefix = f"{name}_{uuid.uuid4().hex[:8]}"
    events = tempfile.mkdtemp(prefix=f"morl-events-{name}-")
    telemetry = {"sink": "parquet", "path": events, "flush_interval_s": 0.01}
    config = {**ARGS, "store_prefix": prefix, "inner_reward_app": "wl_test_inner", "telemetry": telemetry, **args}
    serve.run(app_builder(config), name=name, route_prefix=route)
    try:
        with httpx.Client(base_url=f"{serve_url}{route}", timeout=60) as c:
            c.events_root, c.store_prefix = events, prefix
            yield c
    finally:
        serve.delete(name)


@pytest.fixture(scope="module")
def crm_client(serve_url, client):
    """An app whose ranking policy is CRM's (no weight_logging arg: the policy's own draws are logged)."""
    with recommend_app(serve_url, "crm_serving_test", "/crm", ranking_policy="crm") as c:
        yield c


@pytest.mark.ray
@pytest.mark.serve
def test_the_certified_crm_policy_serves_hot_logs_its_density_and_rolls_back(crm_client):
    """CRM's certified π_θ (``CRM.publish_to_serve``) reaches the replicas by a versioned hot update: each request
    is ranked with a draw around exp(m(x)) on its own context (the in-process cascade with the drawn weights
    serves the same slate), the response and events name the policy and log the draw's density under it, the
    logs become CRM request rows with exactly those densities (the next round trains on served traffic), and a
    rollback restores the held weights."""
    import ray
    import torch
    from gymnasium import spaces

    from actors.cascade import Pipeline
    from actors.served_policies import CRMPolicy, crm_store
    from actors.stages import RequestBatch
    from actors.telemetry import read_parquet_events
    from actors.world import PipelineConfig, World, WorldConfig
    from rllib_policies.crm import CRMPolicyModule
    from rllib_policies.crm.algorithm import CRM, Decision
    from rllib_policies.crm.logs import LOG_HIGH, LOG_LOW, as_arrays, request_rows
    from rllib_policies.ope import GaussianPolicy

    held = crm_client.post("/recommend", json={"user_id": 3}).json()
    assert held["ranking_policy"]["name"] == "held" and held["weight_logging"] is None
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    d = pipeline.spec.context_dim
    cfg = {"init_mean": [0.0, 0.0, 2.0], "init_sigma": 0.4, "low": LOG_LOW.tolist(), "high": LOG_HIGH.tolist()}
    module = CRMPolicyModule(
        observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
        action_space=spaces.Box(0, 40, (3,)),
        model_config=cfg,
    )
    with torch.no_grad():
        module.weights.weight.normal_(0.0, 1.0)
    algo = CRM.__new__(CRM)  # the trained algorithm's driver-side state, without training it here
    algo.config = SimpleNamespace(align_scale=False, mean_jitter=0.6, wider_jitters=())
    algo.logged_scale, algo.inference_module = None, lambda: module
    ack = algo.publish_to_serve(crm_client.store_prefix, Decision("policy", {}, None, 0.95))
    kept = algo.publish_to_serve(crm_client.store_prefix, Decision("logging", {}, None, 0.95))
    assert ack is not None and kept is None  # q kept: nothing published, the live version stays
    policy = CRMPolicy(ray.get(crm_store(crm_client.store_prefix).get.remote()).params)
    std = module.gaussian(module.obs_mean[None])[1].detach().numpy().astype(np.float64)
    # the publish waits 2 s for the replicas' acks; under load a replica may take longer to adopt the version
    deadline = time.monotonic() + 30
    while crm_client.post("/recommend", json={"user_id": 9}).json()["ranking_policy"]["name"] != "crm":
        assert time.monotonic() < deadline, f"no replica served CRM v{ack['version']} within 30 s (ack {ack})"
        time.sleep(0.1)

    feedback = {"clicked": [True] + [False] * 7, "dwell_s": [30.0] + [0.0] * 7, "skipped": [False] * 8}
    served, means = {}, []
    for user, step, clicks in ((3, 2, 1), (4, 0, 0), (5, 5, 3), (6, 1, 0)):
        body = crm_client.post("/recommend", json={"user_id": user, "step": step, "clicks": clicks}).json()
        assert body["ranking_policy"] == {"name": "crm", "version": ack["version"]}, body["ranking_policy"]
        assert body["versions"]["crm"] == ack["version"]
        req = RequestBatch(
            np.array([user]), np.full((1, 20), -1), np.array([step]), np.array([clicks]), int(body["request_id"], 16)
        )
        context = pipeline.context(req)
        m = policy.mean_log_weights(context)[0]
        logged = body["weight_logging"]
        np.testing.assert_allclose(np.log(logged["mean"]), m, atol=1e-5)
        a = np.log(np.asarray(logged["weights"], np.float32).astype(np.float64))
        expected = GaussianPolicy(m, std, LOG_LOW, LOG_HIGH).log_density(a[None])[0]
        assert logged["log_density"] == pytest.approx(expected, abs=1e-4)
        ranking = np.asarray(logged["weights"], np.float32)
        assert body["slate"] == pipeline.recommend(req, params={"ranking": ranking}).slate[0].tolist()
        served[body["request_id"]] = (logged, context[0])
        means.append(m)
        fb = crm_client.post("/feedback", json={"request_id": body["request_id"], **feedback})
        assert fb.status_code == 200, fb.text
    assert np.ptp(np.stack(means), axis=0).max() > 0.1, "m(x) depends on the request's context"

    emitted = crm_client.get("/telemetry").json()["emitted"]
    deadline = time.time() + 10
    while time.time() < deadline and crm_client.get("/telemetry").json()["flushed"] < emitted:
        time.sleep(0.05)
    events = read_parquet_events(crm_client.events_root)
    assert set(events["ranking_policy"].to_pylist()) == {"crm"}
    rows = as_arrays(request_rows(events))  # the next CRM round's training rows, from served traffic
    assert sorted(rows["request_id"]) == sorted(served)
    for i, request_id in enumerate(rows["request_id"]):
        logged, context = served[request_id]
        assert rows["log_propensity"][i] == logged["log_density"]
        np.testing.assert_allclose(rows["obs"][i], context, rtol=1e-6)
        np.testing.assert_allclose(np.exp(rows["action"][i]), logged["weights"], rtol=1e-6)

    ray.get(crm_store(crm_client.store_prefix).rollback.remote())  # back to no policy: the held weights
    deadline = time.monotonic() + 30
    while crm_client.post("/recommend", json={"user_id": 3}).json()["ranking_policy"]["name"] != "held":
        assert time.monotonic() < deadline, "the rollback never reached the replicas"
        time.sleep(0.2)


CRM_EXPERIMENT = {
    "name": "crm-arms",
    "arms": {"control": {"share": 0.5, "weights": [1, 1, 10]}, "treatment": {"share": 0.5, "policy": "crm"}},
}


@pytest.fixture(scope="module")
def crm_arm_client(serve_url, client):
    """An A/B split with the CRM policy as the treatment arm, and Gaussian weight logging on for the app."""
    with recommend_app(serve_url, "crm_arm_test", "/crm_arm", weight_logging=LOGGING, experiment=CRM_EXPERIMENT) as c:
        yield c


def crm_params_for(context_dim: int, seed: int = 0) -> dict:
    """A CRM policy over ``context_dim`` context features (random weights), as CRM.served_policy_params states it."""
    from rllib_policies.crm.logs import LOG_HIGH, LOG_LOW

    rng = np.random.default_rng(seed)
    return {
        "weight": rng.normal(0, 1.0, (3, context_dim)),
        "bias": np.array([0.0, 0.5, 1.0]),
        "obs_mean": np.zeros(context_dim),
        "obs_std": np.ones(context_dim),
        "low": LOG_LOW,
        "high": LOG_HIGH,
        "std": np.array([0.5, 0.4, 0.6]),
        "scale": None,
        "deployed": "policy",
    }


@pytest.mark.ray
@pytest.mark.serve
def test_a_crm_arm_draws_once_with_its_own_std_beside_a_weight_logged_control_arm(crm_arm_client):
    """With weight logging on, a treatment user's weights are one draw of the CRM policy (its std, not the app's
    0.3 per weight), the control user's one draw of weight logging around the arm's weights; /experiments names
    the CRM version; a policy that does not fit the app's context is not served (fallback named, held weights)."""
    from actors.cascade import Pipeline
    from actors.served_policies import CRMPolicy, publish_crm
    from actors.world import PipelineConfig, World, WorldConfig
    from rllib_policies.ope import GaussianPolicy
    from serve_apps.experiments import ArmSplit

    split = ArmSplit.from_config(CRM_EXPERIMENT)
    arms = split.assign(np.arange(200))
    treated = int(np.flatnonzero(arms == [a.name for a in split.arms].index("treatment"))[0])
    control = int(np.flatnonzero(arms == [a.name for a in split.arms].index("control"))[0])
    pipeline = Pipeline(World(WorldConfig.preset("default", **ARGS["world"])), PipelineConfig(**ARGS["pipeline"]))
    params = crm_params_for(pipeline.spec.context_dim)
    ack = publish_crm(crm_arm_client.store_prefix, params)
    policy = CRMPolicy(params)
    wl = WeightLogging.from_config(LOGGING)

    body = crm_arm_client.post("/recommend", json={"user_id": treated}).json()
    assert body["arm"] == {"name": "treatment", "policy": "crm", "version": ack["version"]}
    assert body["ranking_policy"] == {"name": "crm", "version": ack["version"]}
    logged = body["weight_logging"]
    a = np.log(np.asarray(logged["weights"], np.float32).astype(np.float64))
    crm_density = GaussianPolicy(np.log(np.float32(logged["mean"])), policy.std, policy.low, policy.high)
    assert logged["log_density"] == pytest.approx(crm_density.log_density(a[None])[0], abs=1e-4)
    # and not weight logging's: the CRM's σ is its own (one draw's two densities may still coincide by chance)
    assert not np.allclose(policy.std, STD), (policy.std, STD)

    body = crm_arm_client.post("/recommend", json={"user_id": control}).json()
    assert body["arm"]["name"] == "control" and body["ranking_policy"]["name"] == "arm"
    logged = body["weight_logging"]
    np.testing.assert_allclose(logged["mean"], [1, 1, 10], rtol=1e-6)
    assert logged["log_density"] == pytest.approx(wl.log_density(logged["mean"], logged["weights"])[0], abs=1e-9)
    report = crm_arm_client.get("/experiments").json()
    assert report["arms"]["treatment"]["version"] == ack["version"], report["arms"]

    wider = publish_crm(crm_arm_client.store_prefix, crm_params_for(pipeline.spec.context_dim + 1))
    deadline = time.monotonic() + 30
    while (
        "fallback"
        not in (body := crm_arm_client.post("/recommend", json={"user_id": treated}).json())["ranking_policy"]
    ):
        assert time.monotonic() < deadline, "the new version never reached the replica"
        time.sleep(0.2)
    assert body["ranking_policy"]["name"] == "held" and body["arm"]["version"] is None  # no CRM version served it
    assert f"crm policy v{wider['version']} unusable" in body["ranking_policy"]["fallback"]
    assert "context features" in body["ranking_policy"]["fallback"]
