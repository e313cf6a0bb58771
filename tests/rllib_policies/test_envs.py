"""The gymnasium/RLlib views: env checkers pass and a random policy runs through RLlib's
new-stack env runners."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

from actors.cascade import build_world
from actors.stages import STAGES, RequestBatch, utility_weight_grid
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
