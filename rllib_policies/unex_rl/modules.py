"""UNEX-RL's modules: one deterministic actor per stage and the global critic (RLlib new stack).

StageActorModule    μ_k(o_k) = a_max · sigmoid(MLP(o_k)); exploration samples N(μ, (σ·a_max)²)
                    (RLlib's diagonal Gaussian from ACTION_DIST_INPUTS = [μ, log σ]); a slowly
                    tracking target copy for TD targets.
GlobalCriticModule  Q_g(o_1, a_1, a_2, a_3) on the joint action of all stages, learner-only, with
                    its target copy; ``n_critics = 3`` gives the independent-learners arm one
                    critic per stage, Q_k(o_k, a_k).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from rllib_policies.building_blocks import mlp
from rllib_policies.envs import STAGE_ACTION_HIGH

JOINT_ACTION_DIM = sum(len(v) for v in STAGE_ACTION_HIGH.values())   # 4 + 3 + 3
MAX_ACTION_DIM = max(len(v) for v in STAGE_ACTION_HIGH.values())


def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    """θ' ← (1 − τ)·θ' + τ·θ."""
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.mul_(1 - tau).add_(o, alpha=tau)


class StageActorModule(TorchRLModule):
    """model_config: hidden (64, 64), explore_std (0.1 of each action's range), init (default action)."""

    def setup(self):
        cfg = {"hidden": (64, 64), "explore_std": 0.1, **(self.model_config or {})}
        high = torch.as_tensor(np.asarray(self.action_space.high, np.float32))
        self.register_buffer("high", high)
        self.pi = mlp(self.observation_space.shape[0], tuple(cfg["hidden"]), len(high))
        if cfg.get("init") is not None:   # start at a given action: bias = logit(init / high)
            p = np.clip(np.asarray(cfg["init"], np.float32) / high.numpy(), 1e-3, 1 - 1e-3)
            with torch.no_grad():
                self.pi[-1].weight.mul_(0.1)   # near the default action, but still a function of o_k
                self.pi[-1].bias.copy_(torch.as_tensor(np.log(p / (1 - p))))
        self.target_pi = copy.deepcopy(self.pi).requires_grad_(False)
        self.log_std = math.log(float(cfg["explore_std"]))

    def act(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        return self.high * torch.sigmoid((self.target_pi if target else self.pi)(obs))

    def _forward(self, batch, **kwargs):
        mean = self.act(batch[Columns.OBS])
        log_std = torch.log(self.high).expand_as(mean) + self.log_std
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std], dim=-1)}

    def _forward_inference(self, batch, **kwargs):
        return {Columns.ACTIONS: self.act(batch[Columns.OBS])}


class GlobalCriticModule(TorchRLModule):
    """model_config: obs_dim (o_1's width), n_critics (1 global or 3 per-stage), hidden (128, 128)."""

    def setup(self):
        cfg = {"hidden": (128, 128), "n_critics": 1, **(self.model_config or {})}
        d_obs, self.n_critics = int(cfg["obs_dim"]), int(cfg["n_critics"])
        d_act = JOINT_ACTION_DIM if self.n_critics == 1 else MAX_ACTION_DIM
        self.q = nn.ModuleList([mlp(d_obs + d_act, tuple(cfg["hidden"]), 1) for _ in range(self.n_critics)])
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)

    def value(self, obs: torch.Tensor, actions: torch.Tensor, index: int = 0, target: bool = False) -> torch.Tensor:
        """Q(o, a) [B]; actions already scaled to [0, 1] (joint for the global critic)."""
        net = (self.target_q if target else self.q)[index]
        return net(torch.cat([obs, actions], dim=-1)).squeeze(-1)

    def _forward(self, batch, **kwargs):
        return {}
