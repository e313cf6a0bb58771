"""The outer controller's TorchLearner: a KPI-blended, credit-weighted policy gradient with a baseline.

Per row (one request of a session), with the driver's signals (see signals.py):

    w_t  = gated-attention weights over the session (stop-gradient for the policy; uniform 1/T
           without credit attention)                       credit.credit_weights
    A_t  = clip((1 − κ)·Ĝ_t + κ·(T·w_t·R̂ + D̂_t), −c, c)     credit.kpi_blend, kpi_credit, clip_rewards
           (D̂_t: the step KPIs' credit, signals.py)
    L_pg = −Σ_t A_t·log π(a_t|s_t) / N − β_H·H[π]
    L    = L_pg + λ_credit·L_credit         (return decomposition + engagement gate, credit.py)
           + λ_p·mean_s ‖m(s) − m̄‖²         (personalisation_l2: shrink toward one action for all states)

Offline (actions logged by another policy) the weight is exp(A_t/T) instead of A_t:
advantage-weighted regression onto the logged actions.

The credit network is trained jointly on the same batch (its own auxiliary loss, no policy
gradient through it).
"""

from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from torch.func import functional_call, grad, vmap

from rllib_policies.credit import clip_rewards, credit_weights, kpi_blend, kpi_credit

from .sessions import pad_sessions


class OuterControllerLearner(TorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        obs, actions = batch[Columns.OBS], batch[Columns.ACTIONS]
        dist = module.action_dist(obs)
        logp, entropy = dist.logp(actions), dist.entropy()
        mask, sid, rel, (x, step_signal, outer_signal, kpi_step, kappa, engaged) = pad_sessions(
            batch["session"],
            batch["t"],
            torch.cat([obs, actions / module.high], dim=-1),
            batch["step_signal"],
            batch["outer_signal"],
            batch["kpi_step_signal"],
            batch["kappa"],
            batch["engaged"],
        )
        r_outer = outer_signal[:, 0]
        kappa_b = kappa[:, 0]
        weights = credit_weights(module.credit if config.credit_attention else None, x, mask)
        if config.credit_attention:
            # the KPI gate covers the credit network too: no KPI gradient anywhere while κ = 0
            credit_loss = module.credit.aux_loss(x, r_outer, mask, engaged) * (kappa_b.max() > 0).float()
        else:
            credit_loss = torch.zeros((), device=obs.device)
        blended = kpi_blend(step_signal, kpi_credit(weights, mask, r_outer) + kpi_step, kappa_b[:, None])
        clipped = clip_rewards(blended, -config.reward_clip, config.reward_clip)
        advantage = clipped[sid, rel]
        if config.offline_trajectories is not None:  # logged actions: advantage-weighted regression
            advantage = torch.exp((advantage / config.offline_advantage_temperature).clamp(-5.0, 3.0))
        pg_loss = -(advantage.detach() * logp).mean()
        noise = pg_noise_ratio(
            module, x[..., : obs.shape[-1]], actions_padded(actions, sid, rel, mask), clipped.detach(), mask
        )
        m = dist.loc
        personalisation = ((m - m.mean(0)) ** 2).sum(-1).mean()  # spread of m(s) across the batch's states
        loss = (
            pg_loss
            - config.entropy_coeff * entropy.mean()
            + config.credit_loss_coeff * credit_loss
            + config.personalisation_l2 * personalisation
        )
        self.metrics.log_dict(
            {
                "pg_loss": pg_loss.item(),
                "personalisation": personalisation.item(),
                "credit_loss": float(credit_loss.detach()),
                "advantage_mean": advantage.mean().item(),
                "advantage_var": advantage.var().item() if advantage.numel() > 1 else 0.0,
                "clipped_fraction": (blended.abs() >= config.reward_clip).float().mul(mask).sum().item()
                / mask.sum().item(),
                "policy_std_mean": module.logits(obs[:1])[1].exp().mean().item(),
                "pg_noise_ratio": noise,
                "credit_on_engaged_steps": (weights * engaged.float()).sum().item() / mask.shape[0],
            },
            key=module_id,
            window=1,
        )
        return loss


def actions_padded(actions: torch.Tensor, sid: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape + actions.shape[1:], dtype=actions.dtype, device=actions.device)
    out[sid, rel] = actions
    return out


class _LogProb(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, obs, actions):
        return self.m.log_prob(obs, actions)[0]


def pg_noise_ratio(
    module, obs: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor
) -> float:
    """Scale-free variance of the policy-gradient estimate over sessions:
    tr Cov_i[g_i] / (B·‖ḡ‖²), with g_i = ∇_θ Σ_t A_t·log π(a_t|s_t) of session i (policy parameters θ)
    and ḡ their mean: the squared relative error of the batch gradient. Comparable across arms
    whose signals have different scales (the seed's "reward variance")."""
    wrapper = _LogProb(module)
    params = {f"m.{k}": v.detach() for k, v in module.named_parameters() if not k.startswith("credit.")}

    def session_objective(p, o, a, adv, m):
        return (functional_call(wrapper, p, (o, a), strict=False) * adv * m).sum()

    grads = vmap(grad(session_objective), in_dims=(None, 0, 0, 0, 0))(params, obs, actions, advantage, mask)
    g = torch.cat([v.reshape(v.shape[0], -1) for v in grads.values()], dim=1)  # [B, |θ|]
    b = g.shape[0]
    if b < 2:
        return float("nan")
    mean = g.mean(0)
    return float(((g - mean) ** 2).sum(1).mean() / (b * (mean**2).sum().clamp(min=1e-12)))
