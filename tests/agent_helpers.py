"""A trained-shape utility agent for serving tests: random weights, the study's observation layout and grid."""

import numpy as np
import torch


def random_agent(path):
    """(path of the saved agent.pt, the module): 49 grid actions, reward scales set, and a do-no-harm guard that
    fell back to global action 7 at λ 0.75."""
    import gymnasium as gym

    from rllib_policies.utility_agent import ActionGrid, UtilityQModule
    from rllib_policies.utility_agent.module import save_agent

    torch.manual_seed(0)
    module = UtilityQModule(
        observation_space=gym.spaces.Box(-np.inf, np.inf, (37,), np.float32),
        action_space=gym.spaces.Discrete(49),
        model_config={"grid": ActionGrid().weights.tolist(), "hidden": 16},
    )
    module.set_reward_scale(np.array([0.4, 0.05]), np.array([0.7, 0.2]))
    module.set_guard([0.0, 0.25, 0.5, 0.75, 1.0], [-1, -1, -1, 7, -1])
    return save_agent(module, path), module
