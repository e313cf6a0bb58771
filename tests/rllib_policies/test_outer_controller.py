"""OuterController on a real local Ray: online and offline training, the safety rails firing,
checkpoint → resume continuity, shadow mode, pushing inner-reward weights to the real service."""

import uuid

import numpy as np
import pytest

from rllib_policies.envs import SessionEnv
from rllib_policies.outer_controller import OuterControllerConfig

pytestmark = pytest.mark.ray

CONFIG = {
    "world": {"n_items": 2000, "n_users": 300},
    "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 6},
    "seed": 1,
}


def tiny(**options) -> OuterControllerConfig:
    return (
        OuterControllerConfig()
        .environment(SessionEnv, env_config=CONFIG)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .debugging(seed=0, log_level="ERROR")
        .outer_controller(**{"sessions_per_iteration": 6, "min_sessions_for_kpi": 6, **options})
    )


def weights(algo) -> dict:
    return {k: np.array(v) for k, v in algo.learner_group.get_weights()["default_policy"].items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(ray_session):
    algo = tiny(kl_rollback_threshold=None).build_algo()
    before = weights(algo)
    results = [algo.train() for _ in range(2)]
    yield algo, before, results
    algo.stop()


def test_online_training_updates_the_policy_and_reports_the_signals(trained):
    algo, before, results = trained
    assert not same(before, weights(algo))
    oc = results[-1]["outer_controller"]
    assert oc["sessions_seen"] >= 12 and oc["kpi_gate_open"] == 1.0 and oc["kappa"] > 0
    learner = results[-1]["learners"]["default_policy"]
    assert np.isfinite(learner["pg_loss"]) and 0 <= learner["clipped_fraction"] <= 1
    # the per-request parts of the decomposable KPIs add up to the session KPIs
    batch = algo.last_batch
    for k in ("revenue", "clicks", "ndcg"):
        total = np.bincount(batch.session, batch.step_kpi(k), batch.n_sessions)
        np.testing.assert_allclose(total, batch.kpis[k], rtol=1e-5)
    # the env runners act with the learners' weights
    runner = algo.get_module().state_dict()
    assert np.allclose(runner["pi.0.weight"].numpy(), weights(algo)["pi.0.weight"])


def test_kl_rollback_restores_the_last_good_state(ray_session, monkeypatch):
    algo = tiny(kl_rollback_threshold=0.3).build_algo()
    try:
        kls = iter([0.0, 1.0, 0.0])  # iteration 1 is good, 2 leaves the trust region, 3 is good again
        monkeypatch.setattr(algo, "kl_from_reference", lambda obs: next(kls))
        start = weights(algo)
        assert algo.train()["outer_controller"]["rolled_back"] == 0.0
        good, good_optim = weights(algo), algo.learner_group.get_state(components="learner/optimizer")
        assert not same(start, good)
        result = algo.train()["outer_controller"]
        assert result["rolled_back"] == 1.0 and result["rollbacks"] == 1
        assert same(good, weights(algo))  # back at iteration 1, not at the start
        restored = algo.learner_group.get_state(components="learner/optimizer")["learner"]["optimizer"]
        expected = good_optim["learner"]["optimizer"]
        assert str(restored) == str(expected)  # the optimizer state too
        assert np.allclose(algo.get_module().state_dict()["log_std"].numpy(), good["log_std"])  # and the runners
        assert algo.train()["outer_controller"]["consecutive_rollbacks"] == 0
    finally:
        algo.stop()


def test_each_iteration_samples_new_sessions(trained):
    algo, _, _ = trained
    first = algo.last_batch.obs.copy()
    algo.train()
    assert not np.array_equal(first[: len(algo.last_batch.obs)], algo.last_batch.obs[: len(first)])


def test_kpi_weights_change_without_retraining(trained):
    algo, _, _ = trained
    algo.set_kpi_weights({"return": 1.0})
    result = algo.train()["outer_controller"]
    assert result["outer_reward_mean"] == pytest.approx(result["kpi_return"])  # R = 1·return now
    with pytest.raises(ValueError, match="unknown KPI"):
        algo.set_kpi_weights({"gmv": 1.0})


def test_config_errors_name_the_field():
    with pytest.raises(TypeError, match="kpi_weight"):
        OuterControllerConfig().outer_controller(kpi_weight={"ndcg": 1})
    with pytest.raises(ValueError, match="arm must be 'layered' or 'monolithic'"):
        OuterControllerConfig().outer_controller(arm="both").validate()


def test_checkpoint_then_resume_continues_where_it_stopped(trained, tmp_path):
    from ray.rllib.algorithms.algorithm import Algorithm

    algo, _, _ = trained
    path = algo.save_to_path(str(tmp_path / "ckpt"))
    restored = Algorithm.from_checkpoint(path)
    try:
        assert same(weights(algo), weights(restored))
        assert restored.iteration == algo.iteration
        assert restored.signals.state() == algo.signals.state()
        assert all(np.array_equal(restored._reference[k], algo._reference[k]) for k in algo._reference)
        result = restored.train()["outer_controller"]
        assert result["sessions_seen"] == algo.signals.sessions_seen + 6  # the KPI gate counter carries on
    finally:
        restored.stop()


def test_warm_start_and_offline_training_from_trajectory_parquet(ray_session, tmp_path):
    from actors.telemetry import sessionise_dataset
    from rllib_policies.outer_controller.logs import simulate_logs

    simulate_logs(CONFIG, str(tmp_path / "events"), days=3, users_per_day=30, noise=0.2)
    sessionise_dataset(str(tmp_path / "events"), str(tmp_path / "trajectories"))
    algo = tiny(kl_rollback_threshold=None).build_algo()
    try:
        import pyarrow.dataset as pads

        from rllib_policies.outer_controller.sessions import from_trajectories

        logged = from_trajectories(pads.dataset(str(tmp_path / "trajectories")).to_table())
        gap = lambda: float(np.abs(algo.policy_mean(logged.obs) - logged.actions).mean())  # noqa: E731
        before = gap()
        info = algo.warm_start(str(tmp_path / "trajectories"), iterations=30)
        assert info["sessions"] == logged.n_sessions > 0
        assert gap() < 0.8 * before  # behaviour cloning moved μ(s) towards the logged actions
        assert same(weights(algo), algo._reference)  # the warm-started policy is the KL reference
        # streamed trajectories: written with 'returned' open, decided later in _returns (read_trajectories)
        import pyarrow as pa
        import pyarrow.parquet as pq

        from actors.telemetry import RETURNS_SCHEMA

        table = pads.dataset(str(tmp_path / "trajectories")).to_table()
        streamed = tmp_path / "streamed"
        (streamed / "_returns").mkdir(parents=True)
        column = table.schema.get_field_index("returned")
        pq.write_table(
            table.set_column(column, "returned", pa.nulls(table.num_rows, pa.bool_())), streamed / "t.parquet"
        )
        decided = [table["session_id"], table["user_id"], table["returned"], table["end_ts"]]
        pq.write_table(pa.Table.from_arrays(decided, schema=RETURNS_SCHEMA), streamed / "_returns" / "r.parquet")
        assert algo.warm_start(str(streamed), iterations=1)["sessions"] == logged.n_sessions
    finally:
        algo.stop()
    offline = tiny(
        offline_trajectories=str(tmp_path / "trajectories"),
        sessions_per_iteration=16,
        kpi_weights={"revenue": 0.5, "return": 1.0},
        kl_rollback_threshold=None,
    ).build_algo()
    try:
        before = weights(offline)
        result = offline.train()["outer_controller"]
        assert result["sessions_in_batch"] > 0 and not same(before, weights(offline))
    finally:
        offline.stop()


def test_shadow_candidate_is_logged_but_never_served(trained):
    from actors.cascade import build_world
    from actors.simulate import run_sessions
    from rllib_policies.outer_controller.rails import ranking_policy, run_shadow

    algo, _, _ = trained
    live = algo.get_module()
    candidate = type(live)(observation_space=live.observation_space, action_space=live.action_space)  # fresh weights
    summary, log = run_shadow(live, candidate, CONFIG, n_sessions=40, seed=3)
    world, pipeline = build_world(CONFIG)
    alone = run_sessions(world, pipeline, ranking_policy(live), 40, 3, "live")
    assert summary.row() == alone.row()  # the served outcome is the live policy's alone
    served = np.concatenate(log.served_slates)
    assert len(served) == sum(len(a) for a in log.candidate_actions) == log.summary()["requests"]
    assert not np.allclose(np.concatenate(log.candidate_actions), np.concatenate(log.live_actions))
    s = log.summary()
    assert set(s) >= {"live_reward_quantiles", "candidate_reward_quantiles", "candidate_action_mean"}


def test_fitted_inner_reward_weights_reach_the_inner_reward_service(trained, serve_url):
    import httpx
    from ray import serve

    from rllib_policies.outer_controller.rails import INNER_REWARD_SIGNS, GateRejected, push_inner_reward_weights
    from serve_apps.inner_reward import app_builder

    algo, _, _ = trained
    fitted = algo.inner_reward_weights(algo.last_batch)
    assert set(fitted) == {"click_w", "dwell_w", "skip_penalty", "rel_w"} and all(np.isfinite(list(fitted.values())))
    signed = {k: abs(v) * INNER_REWARD_SIGNS[k] for k, v in fitted.items()}  # inside the gate's signs
    serve.run(app_builder({"weights_store": f"ir_oc_{uuid.uuid4().hex[:8]}"}), name="ir_oc", route_prefix="/ir_oc")
    try:
        state = push_inner_reward_weights(f"{serve_url}/ir_oc", signed)
        assert state["weights"]["click_w"] == pytest.approx(signed["click_w"], abs=1e-6)
        assert httpx.get(f"{serve_url}/ir_oc/weights").json()["version"] == state["version"]
        with pytest.raises(RuntimeError, match="409"):
            push_inner_reward_weights(f"{serve_url}/ir_oc", signed, expected_version=state["version"] - 1)
        with pytest.raises(GateRejected, match=r"click_w -0.594 must be ≥ 0"):  # the push the issue found
            push_inner_reward_weights(f"{serve_url}/ir_oc", {**signed, "click_w": -0.594})
        assert httpx.get(f"{serve_url}/ir_oc/weights").json()["version"] == state["version"]  # nothing pushed
    finally:
        serve.delete("ir_oc")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"click_w": -0.1, "dwell_w": 0.1, "skip_penalty": -0.3, "rel_w": 0.5}, r"click_w -0.100 must be ≥ 0"),
        ({"click_w": 1.0, "dwell_w": -0.006, "skip_penalty": -0.3, "rel_w": 0.5}, r"dwell_w -0.006 must be ≥ 0"),
        ({"click_w": 1.0, "dwell_w": 0.1, "skip_penalty": 0.111, "rel_w": 0.5}, r"skip_penalty \+0.111 must be ≤ 0"),
        ({"click_w": 1.0, "dwell_w": 0.1, "skip_penalty": -0.3, "rel_w": 11.0}, r"rel_w \+11.000 outside ±10"),
        ({"click_w": float("nan"), "dwell_w": 0.1, "skip_penalty": -0.3, "rel_w": 0.5}, r"click_w \+nan outside"),
    ],
)
def test_the_parameter_gate_refuses_out_of_bounds_inner_reward_weights(weights, match):
    from rllib_policies.outer_controller.rails import GateRejected, InnerRewardBounds, push_inner_reward_weights

    assert InnerRewardBounds().violations({"click_w": 2.0, "dwell_w": 0.3, "skip_penalty": -0.3, "rel_w": 0.0}) == []
    with pytest.raises(GateRejected, match=match):  # refused before any request: no server is needed
        push_inner_reward_weights("http://127.0.0.1:9", weights)


@pytest.mark.slow  # sharded learner updates: test_unex_rl's two-learner test runs the same base
def test_two_learners_train_in_parallel(ray_session):
    algo = tiny(kl_rollback_threshold=None).learners(num_learners=2, num_cpus_per_learner=0.25).build_algo()
    try:
        before = weights(algo)
        result = algo.train()
        assert not same(before, weights(algo))
        assert np.isfinite(result["learners"]["default_policy"]["pg_loss"])
    finally:
        algo.stop()


@pytest.mark.parametrize("max_logit", [None, 3.0])
def test_the_served_numpy_policy_is_the_modules_mean(max_logit):
    """actors.served_policies.RankingPolicy (what the recommend app serves) is RankingPolicyModule's μ(s)."""
    import gymnasium as gym
    import torch

    from actors.served_policies import RankingPolicy
    from actors.stages import RANKING_ACTION_HIGH
    from rllib_policies.outer_controller.module import RankingPolicyModule

    module = RankingPolicyModule(
        observation_space=gym.spaces.Box(-np.inf, np.inf, (12,), np.float32),
        action_space=gym.spaces.Box(np.zeros(3, np.float32), RANKING_ACTION_HIGH),
        model_config={"hidden": (16, 16), "max_logit": max_logit, "init_action": [1.0, 1.0, 10.0]},
    )
    with torch.no_grad():
        for p in module.pi.parameters():
            p.add_(torch.randn_like(p))  # away from the near-constant start
        obs = torch.randn(64, 12)
        expected = module.gaussian(obs)[0].numpy()
    state = {k: v.numpy() for k, v in module.pi.state_dict().items()}
    served = RankingPolicy({"mlp_state": state, "high": module.high.numpy(), "max_logit": max_logit})(obs.numpy())
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(served, axis=0).max() > 0.1


def test_the_trained_policy_is_published_as_the_serving_store_serves_it(trained):
    """publish_to_serve: a new version of the outer controller's store whose NumPy policy is the learners' μ(s);
    a second publication and a rollback move the version as the recommend replicas would follow it."""
    import ray

    from actors.served_policies import RankingPolicy, outer_controller_store

    algo = trained[0]
    prefix = f"oc_pub_{uuid.uuid4().hex[:8]}"
    first = algo.publish_to_serve(prefix)
    store = outer_controller_store(prefix)
    obs = algo.last_batch.obs[:32]
    served = RankingPolicy(ray.get(store.get.remote()).params)(obs)
    np.testing.assert_allclose(served, algo.policy_mean(obs), rtol=1e-5, atol=1e-6)
    second = algo.publish_to_serve(prefix)
    assert second["version"] == first["version"] + 1
    assert ray.get(store.rollback.remote())["restored_version"] == first["version"]
