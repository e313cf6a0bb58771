"""CRM's learner: gradient ascent on a pessimistic off-policy objective (counterfactual risk
minimisation, Swaminathan & Joachims 2015; for weight vectors, Jeunen et al., arXiv 2405.02141).

On the batch's logged rows (x_i, a_i, log q(a_i|x_i), r_i):

    w_i   = exp(log π_θ(a_i|x_i) − log q(a_i|x_i))
    V̂     = Σ_i w_i r_i / Σ_i w_i                                   (self-normalised IPS)
    SE    = max(√(Σ_i w_i² (r_i − V̂)²) / Σ_i w_i,  √(Σ_i w̄_i (r_i − V̂)² / ESS))   (delta / Kish, as EssCorrected)
    ESS   = (Σ w_i)² / Σ w_i²,   u = (ESS/n − τ)/(1 − τ)
    J(θ)  = V̂ − z·SE − κ·barrier(u) − ℓ₂·‖W‖²   where u > 10⁻³,    barrier(u) = −log u,
    J(θ)  = u/10⁻³ − κ·barrier(u)                  elsewhere (only the way back into the support counts)

with z = Φ⁻¹(level) one-sided (scipy), τ = ``min_ess_fraction``. The loss is −J. The barrier keeps
the learnt policy where the logs have support (ESS/n ≥ τ); pessimism keeps it from chasing noise.
"""

from __future__ import annotations

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

BARRIER_KNEE = 1e-3


def barrier(u: torch.Tensor) -> torch.Tensor:
    """−log u for u ≥ knee, continued linearly (same slope) below it: finite everywhere."""
    knee = torch.as_tensor(BARRIER_KNEE, dtype=u.dtype)
    return torch.where(u >= knee, -torch.log(u.clamp_min(BARRIER_KNEE)), -torch.log(knee) - (u - knee) / knee)


def pessimistic_objective(
    logp: torch.Tensor,
    logq: torch.Tensor,
    reward: torch.Tensor,
    *,
    z: float,
    min_ess_fraction: float,
    barrier_weight: float,
) -> dict[str, torch.Tensor]:
    """J(θ) and its parts (module docstring) for log π_θ [n], log q [n], r [n]."""
    log_w = logp - logq
    w = torch.exp(log_w - log_w.max().detach())  # scale-free: V̂, SE and ESS do not depend on it
    total = w.sum()
    value = (w * reward).sum() / total
    resid = reward - value
    ess = total**2 / (w**2).sum()
    se_delta = torch.sqrt((w**2 * resid**2).sum()) / total
    se_kish = torch.sqrt((w * resid**2).sum() / total / ess)
    se = torch.maximum(se_delta, se_kish)
    fraction = ess / len(w)
    u = (fraction - min_ess_fraction) / (1.0 - min_ess_fraction)
    penalised = value - z * se - barrier_weight * barrier(u)
    # outside the feasible set (ESS/n < τ) only the way back counts: J = −barrier_weight·barrier(u) − 1/knee·|u|
    objective = torch.where(u > BARRIER_KNEE, penalised, -barrier_weight * barrier(u) + u / BARRIER_KNEE)
    return {"objective": objective, "value": value, "se": se, "ess": ess, "ess_fraction": fraction}


class CRMLearner(TorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        logp = module.log_prob(batch["obs"], batch["actions"])
        parts = pessimistic_objective(
            logp,
            batch["log_propensity"],
            batch["rewards"],
            z=config.z,
            min_ess_fraction=config.min_ess_fraction,
            barrier_weight=config.barrier_weight,
        )
        l2 = config.l2 * (module.weights.weight**2).sum()
        self.metrics.log_dict(
            {k: float(v.detach()) for k, v in parts.items()} | {"sigma_mean": float(fwd_out["sigma"].mean().detach())},
            key=module_id,
            window=1,
        )
        return -(parts["objective"] - l2)
