"""The gymnasium/RLlib views: env checkers pass and a random policy runs through RLlib's
new-stack env runners."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

import actors.stages
import rust_ext
from actors.cascade import build_world
from actors.stages import STAGES, RequestBatch, retrieval_relevance, utility_weight_grid
from rllib_policies.envs import MultiStageEnv, SessionEnv, UtilityWeightEnv

CONFIG = {
    "world": {"n_items": 2000, "n_users": 300},
    "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 6},
    "seed": 1,
}


@pytest.mark.parametrize("env_cls", [SessionEnv, UtilityWeightEnv])
def test_single_agent_envs_pass_gymnasium_checker(env_cls):
    gym_check_env(env_cls(CONFIG), skip_render_check=True)


def test_session_env_reports_delayed_kpis_at_the_end():
    env = SessionEnv(CONFIG)
    obs, _ = env.reset(seed=3)
    done, steps, total = False, 0, 0.0
    while not done:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
        total += reward
        steps += 1
    assert info["session_requests"] == steps
    for key in ("session_revenue", "returned_next_day", "return_gap_days", "mean_ndcg_at_10"):
        assert key in info
    assert env.observation_space.contains(obs)


def test_utility_env_is_one_step_with_vector_reward():
    env = UtilityWeightEnv(CONFIG)
    assert env.action_space.n == 49
    np.testing.assert_allclose(utility_weight_grid(7)[-1], [1.0, 2.0, 40.0])
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(48)
    assert terminated and info["reward_vector"].shape == (3,) and reward == info["reward_vector"][0]


def test_multi_stage_env_turns_and_rllib_checker():
    env = MultiStageEnv(CONFIG)
    check_multiagent_environments(env)
    obs, _ = env.reset(seed=0)
    assert list(obs) == ["matching"]
    order = []
    for _ in range(6):
        agent = next(iter(obs))
        order.append(agent)
        obs, rewards, terms, _, _ = env.step({agent: env.action_spaces[agent].sample()})
        if terms["__all__"]:
            break
    assert order[:3] == ["matching", "pre_ranking", "ranking"]


def test_observations_follow_the_observation_spec():
    """Single-agent envs observe the request context; stage k observes o_k exactly as the cascade
    rebuilds it from the request and the upstream actions (the CIC replay)."""
    _, pipeline = build_world(CONFIG)
    session = SessionEnv(CONFIG)
    obs, _ = session.reset(seed=4)
    assert session.observation_space.shape == (pipeline.spec.context_dim,)
    np.testing.assert_array_equal(obs, pipeline.context(session._req)[0])

    env = MultiStageEnv(CONFIG)
    assert all(space.shape == (pipeline.spec.dim,) for space in env.observation_spaces.values())
    obs, info = env.reset(seed=2)
    rng = np.random.default_rng(2)
    for _ in range(3):  # three requests
        r = info["matching"]["request"]
        req = RequestBatch(
            np.array([r["user"]]), r["history"][None], np.array([r["step"]]), np.array([r["clicks"]]), r["request_id"]
        )
        seen, actions = {}, {}
        for stage in STAGES:
            seen[stage] = obs[stage]
            actions[stage] = (rng.random(env.action_spaces[stage].shape) * env.action_spaces[stage].high)[None]
            obs, _, terms, _, info = env.step({stage: actions[stage][0]})
        replay = pipeline.recommend(req, actions, observe=True)
        for stage in STAGES:
            np.testing.assert_array_equal(seen[stage], replay.observations[stage][0])
        if terms["__all__"]:
            break


@pytest.mark.ray
def test_random_policy_through_rllib_env_runners(ray_session):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    single = PPOConfig().environment(SessionEnv, env_config=CONFIG).env_runners(num_env_runners=0)
    episodes = SingleAgentEnvRunner(config=single).sample(num_episodes=2, random_actions=True)
    assert len([e for e in episodes if e.is_done]) >= 2

    multi = (
        PPOConfig()
        .environment(MultiStageEnv, env_config=CONFIG)
        .env_runners(num_env_runners=0)
        .multi_agent(policies={"matching", "pre_ranking", "ranking"}, policy_mapping_fn=lambda aid, *a, **k: aid)
    )
    episodes = MultiAgentEnvRunner(config=multi).sample(num_episodes=1, random_actions=True)
    assert episodes and episodes[0].is_done
    assert set(episodes[0].agent_ids) == {"matching", "pre_ranking", "ranking"}


def _first_slate(env_cls, seed: int) -> tuple[float, dict]:
    """Reward and info of the first served slate (fixed actions)."""
    env = env_cls(CONFIG)
    obs, _ = env.reset(seed=seed)
    if env_cls is SessionEnv:
        _, reward, _, _, info = env.step(np.array([1.0, 1.0, 10.0], np.float32))
        return reward, info
    for stage in STAGES:
        obs, rewards, _, _, infos = env.step({stage: env.action_spaces[stage].high / 2})
    return rewards["ranking"], infos["ranking"]


@pytest.mark.parametrize("env_cls", [SessionEnv, MultiStageEnv])
def test_inner_reward_is_the_towers_relevance_not_the_rankers_prediction(env_cls, monkeypatch):
    """Same slate and response, the ranker's predictions all halved (its ranking unchanged) →
    identical reward and inner features; the reward is the kernel fed the two-tower similarity."""
    world, pipeline = build_world(CONFIG)
    served = []
    step = world.step

    def recording_step(sessions, slate, rng):
        resp = step(sessions, slate, rng)
        served.append((sessions.user.copy(), slate.copy(), resp))
        return resp

    monkeypatch.setattr(world, "step", recording_step)
    reward, info = _first_slate(env_cls, seed=5)
    user, slate, resp = served[-1]
    relevance = retrieval_relevance(pipeline.ctx, user, slate)
    expected = rust_ext.inner_reward_numpy(resp.clicked[0], resp.dwell_s[0], resp.skipped[0], relevance[0])
    assert reward == pytest.approx(float(expected.sum()), abs=1e-4)
    assert info["inner_features"][3] == pytest.approx(float(relevance.sum()), rel=1e-5)

    predict = actors.stages.ranking_predictions
    halved = lambda *args: {k: 0.5 * v for k, v in predict(*args).items()}  # noqa: E731
    monkeypatch.setattr(actors.stages, "ranking_predictions", halved)
    reward_halved, info_halved = _first_slate(env_cls, seed=5)
    np.testing.assert_array_equal(served[-1][1], slate)  # the same slate was served ...
    np.testing.assert_array_equal(served[-1][2].clicked, resp.clicked)  # ... and answered alike
    assert reward_halved == reward
    np.testing.assert_array_equal(info_halved["inner_features"], info["inner_features"])
