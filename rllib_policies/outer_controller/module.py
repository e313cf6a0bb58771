"""The ranking policy as an RLlib (new API stack) RLModule.

Action = the ranking stage's utility weights for one request, a ∈ (0, high) (w_click, w_long_view,
w_purchase). The policy explores in logit space:

    u ~ N(m(s), diag σ²),   a = high·sigmoid(u),   m(s) = MLP(s), learned state-independent log σ

(``SquashedDiagGaussian``, an RLlib ``TorchDiagGaussian`` over u whose samples are squashed into
the box). Inference serves μ(s) = high·sigmoid(m(s)). Ranking by Σ_k w_k·p_k depends on the
weights' ratios, and logit(a/high) ≈ log(a/high) for small weights, so a step of σ in u is a
multiplicative step in a: a weight near 0 can grow by orders of magnitude in a few steps, and no
sample is clipped to 0. (An earlier version explored with σ = 0.15·high in action units: from
click-only weights half of the w_purchase samples were clipped to 0 (σ = 6 around μ ≈ 0.04), the
policy gradient then favoured hedging with w_click, and μ(s) did not follow the samples.)
log π(a|s) = log N(logit(a/high); m, σ²) − Σ_k log|da_k/du_k|; KL and entropy are those of the
Gaussian over u (KL is invariant under the bijection; the entropy is u's).

``model_config["init_action"]`` = a₀ starts the policy at a₀ in every state: the output layer's
bias is logit(a₀/high) (a₀/high clipped to [1e-3, 1 − 1e-3], so a zero weight starts at
high·1e-3) and its weights are scaled by ``init_output_scale`` (0.01), so μ(s) ≈ a₀ everywhere.

The module also owns the gated-attention credit network: it is trained jointly with the policy by
the learner, checkpointed with it, and never used at inference.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchDiagGaussian
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from rllib_policies.building_blocks import mlp
from rllib_policies.credit import GatedAttentionCredit

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
EDGE = 1e-6  # a/high is kept in [EDGE, 1 − EDGE] when mapped back to u


class SquashedDiagGaussian(TorchDiagGaussian):
    """u ~ N(loc, diag scale²) and a = high·sigmoid(u); ``high`` is a class attribute (one subclass
    per module, ``squashed``), since RLlib builds distributions with ``from_logits(inputs)``."""

    high: torch.Tensor = torch.ones(1)

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.high * torch.sigmoid(u)

    def unsquash(self, a: torch.Tensor) -> torch.Tensor:
        return torch.logit((a / self.high).clamp(EDGE, 1 - EDGE))

    def sample(self, *, sample_shape=None):
        return self.squash(super().sample(sample_shape=sample_shape))

    def rsample(self, *, sample_shape=None):
        return self.squash(super().rsample(sample_shape=sample_shape))

    def logp(self, value: torch.Tensor) -> torch.Tensor:
        """log N(u; m, σ²) − Σ_k log(high_k·σ(u_k)(1 − σ(u_k))), u = logit(a/high)."""
        u = self.unsquash(value)
        log_jacobian = torch.log(self.high) + nn.functional.logsigmoid(u) + nn.functional.logsigmoid(-u)
        return super().logp(u) - log_jacobian.sum(-1)

    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=self.squash(self.loc))


def squashed(high: torch.Tensor) -> type[SquashedDiagGaussian]:
    return type("SquashedDiagGaussian", (SquashedDiagGaussian,), {"high": high.detach().clone()})


class RankingPolicyModule(TorchRLModule):
    """model_config: hidden (64, 64), init_std (σ of u = logit(a/high), 2.5), credit_dk (32),
    init_action (None: the default initialisation; a₀ [d_act]: μ(s) ≈ a₀), init_output_scale (0.01)."""

    def setup(self):
        cfg = {
            "hidden": (64, 64),
            "init_std": 2.5,
            "credit_dk": 32,
            "init_action": None,
            "init_output_scale": 0.01,
            **(self.model_config or {}),
        }
        d_obs, d_act = self.observation_space.shape[0], self.action_space.shape[0]
        self.register_buffer("high", torch.as_tensor(np.asarray(self.action_space.high, np.float32)))
        self.pi = mlp(d_obs, tuple(cfg["hidden"]), d_act, nn.Tanh)
        if cfg["init_action"] is not None:
            self.start_at(cfg["init_action"], float(cfg["init_output_scale"]))
        self.log_std = nn.Parameter(torch.full((d_act,), float(np.log(cfg["init_std"]))))
        self.credit = GatedAttentionCredit(d_obs + d_act, int(cfg["credit_dk"]))
        # π(·|s) for exploration, inference and training (get_*_action_dist_cls)
        self.action_dist_cls = squashed(self.high)

    def start_at(self, action, output_scale: float = 0.01) -> None:
        """μ(s) ≈ a₀ for every s: output bias = logit(clip(a₀/high, 1e-3, 1 − 1e-3)), output weights × scale."""
        a0 = torch.as_tensor(np.asarray(action, np.float32))
        if a0.shape != self.high.shape or not torch.isfinite(a0).all() or (a0 < 0).any() or (a0 > self.high).any():
            raise ValueError(
                f"init_action must be {tuple(self.high.shape)} values in [0, high={self.high.tolist()}], got {action}"
            )
        out = self.pi[-1]
        with torch.no_grad():
            out.bias.copy_(torch.logit((a0 / self.high).clamp(1e-3, 1 - 1e-3)))
            out.weight.mul_(output_scale)

    def logits(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(s), log σ): the Gaussian over u = logit(a/high) for a batch of observations."""
        m = self.pi(obs)
        return m, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).expand_as(m)

    def gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ(s) = high·sigmoid(m(s)), log σ): the served action and the exploration scale in u."""
        m, log_std = self.logits(obs)
        return self.high * torch.sigmoid(m), log_std

    def _forward(self, batch, **kwargs):
        m, log_std = self.logits(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: torch.cat([m, log_std], dim=-1)}

    def action_dist(self, obs: torch.Tensor) -> SquashedDiagGaussian:
        """π(·|s): u ~ N(m(s), diag σ²), a = high·sigmoid(u), for a batch of observations."""
        m, log_std = self.logits(obs)
        return self.get_train_action_dist_cls()(loc=m, scale=log_std.exp())

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(a|s) [N], entropy H[π(·|s)] [N])."""
        dist = self.action_dist(obs)
        return dist.logp(actions), dist.entropy()
