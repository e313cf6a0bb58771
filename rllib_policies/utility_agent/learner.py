"""The one-step learner of the utility-weight agent.

Each logged request is a complete episode (PRL-PUTS is one-step): no bootstrapping, each head
regresses on its own observed request-level reward,

    L = Σ_k mean_i ( Q̃_k(s_i, a_i) − (r_ik − μ_k)/σ_k )²

with Q̃ the standardised head (module.scores). Under uniform logging the regression is unbiased
for every action; rows are weighted by 1/(|A|·p) (the batch's "propensity" column), which corrects
other stochastic loggers with full support (deterministic logs are dropped upstream).
"""

from __future__ import annotations

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from .module import N_HEADS


class UtilityQLearner(TorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        pred = fwd_out["q_scores"]  # [B, 2]
        target = (batch["rewards"] - module.reward_mean) / module.reward_std
        weight = 1.0 / (len(module.grid) * batch["propensity"]).clamp_min(1e-6)
        weight = weight / weight.mean()
        per_head = (weight[:, None] * (pred - target) ** 2).mean(dim=0)  # [2]
        with torch.no_grad():
            explained = 1 - ((pred - target) ** 2).mean(0) / target.var(0).clamp_min(1e-8)
        self.metrics.log_dict(
            {
                **{f"mse_head{k}": per_head[k].item() for k in range(N_HEADS)},
                **{f"r2_head{k}": explained[k].item() for k in range(N_HEADS)},
            },
            key=module_id,
            window=1,
        )
        return per_head.sum()
