"""The ranking policy as an RLlib (new API stack) RLModule.

Action = the ranking stage's utility weights for one request, a ∈ [0, high] (w_click, w_long_view,
w_purchase). π(a|s) = N(μ(s), diag σ²) with μ(s) = high·sigmoid(MLP(s)) and a learned,
state-independent log σ; the env clips samples into the box. Inference serves μ(s).

The module also owns the gated-attention credit network: it is trained jointly with the policy by
the learner, checkpointed with it, and never used at inference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ray.rllib.core.columns import Columns
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

    def gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ(s), log σ) for a batch of observations."""
        mean = self.high * torch.sigmoid(self.pi(obs))
        return mean, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).expand_as(mean)

    def _forward(self, batch, **kwargs):
        mean, log_std = self.gaussian(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std], dim=-1)}

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(a|s) [N], entropy [N]) of the diagonal Gaussian."""
        mean, log_std = self.gaussian(obs)
        var = torch.exp(2 * log_std)
        logp = -0.5 * (((actions - mean) ** 2) / var + 2 * log_std + math.log(2 * math.pi)).sum(-1)
        entropy = (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
        return logp, entropy


def gaussian_kl(mean_p: np.ndarray, log_std_p: np.ndarray, mean_q: np.ndarray, log_std_q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) of diagonal Gaussians per row:
    Σ_i log σq/σp + (σp² + (μp − μq)²)/(2σq²) − ½."""
    var_p, var_q = np.exp(2 * log_std_p), np.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)
