"""The ranking policy as an RLlib (new API stack) RLModule.

Action = the ranking stage's utility weights for one request, a ∈ [0, high] (w_click, w_long_view,
w_purchase). π(a|s) = N(μ(s), diag σ²) with μ(s) = high·sigmoid(MLP(s)) and a learned,
state-independent log σ — RLlib's ``TorchDiagGaussian`` over the action-distribution inputs
[μ, log σ], for sampling on the env runners and for log π, entropy and KL in training; the env
clips samples into the box. Inference serves μ(s).

The module also owns the gated-attention credit network: it is trained jointly with the policy by
the learner, checkpointed with it, and never used at inference.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from rllib_policies.building_blocks import mlp
from rllib_policies.credit import GatedAttentionCredit

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class RankingPolicyModule(TorchRLModule):
    """model_config: hidden (64, 64), init_std_frac (0.15 of each action's range), credit_dk (32)."""

    def setup(self):
        cfg = {"hidden": (64, 64), "init_std_frac": 0.15, "credit_dk": 32, **(self.model_config or {})}
        d_obs, d_act = self.observation_space.shape[0], self.action_space.shape[0]
        self.register_buffer("high", torch.as_tensor(np.asarray(self.action_space.high, np.float32)))
        self.pi = mlp(d_obs, tuple(cfg["hidden"]), d_act, nn.Tanh)
        self.log_std = nn.Parameter(torch.log(self.high * cfg["init_std_frac"]))
        self.credit = GatedAttentionCredit(d_obs + d_act, int(cfg["credit_dk"]))
        # π(·|s) for exploration, inference and training (get_*_action_dist_cls)
        self.action_dist_cls = TorchDiagGaussian

    def gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ(s), log σ) for a batch of observations."""
        mean = self.high * torch.sigmoid(self.pi(obs))
        return mean, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).expand_as(mean)

    def _forward(self, batch, **kwargs):
        mean, log_std = self.gaussian(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std], dim=-1)}

    def action_dist(self, obs: torch.Tensor) -> TorchDiagGaussian:
        """π(·|s) = N(μ(s), diag σ²) for a batch of observations."""
        mean, log_std = self.gaussian(obs)
        return self.get_train_action_dist_cls()(loc=mean, scale=log_std.exp())

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(a|s) [N], entropy H[π(·|s)] [N])."""
        dist = self.action_dist(obs)
        return dist.logp(actions), dist.entropy()
