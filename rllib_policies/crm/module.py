"""The CRM weight policy as an RLlib (new API stack) RLModule: a context-dependent Gaussian over
log-weights a = log w ∈ ℝ³, truncated to the logging box [low, high]³ (Jeunen et al., arXiv 2405.02141),

    π_θ(a | x) = N(a; m_θ(x), diag σ_θ²) · 1{low ≤ a ≤ high} / Z_θ(x),
    m_θ(x) = low + (high − low)·sigmoid(b + W·(x − x̄)/s_x)      (inside the box; b = m₀'s logit, W = 0 at
                                                                 init: π_θ starts as the logging policy)
    Z_θ(x) = Π_k [Φ((high_k − m_k)/σ_k) − Φ((low_k − m_k)/σ_k)],

with RLlib's ``TorchDiagGaussian`` for the normal part. ``_forward_inference`` returns the mean weights
exp(m_θ(x)) (for inspection: do no harm certifies and serves stochastic policies, algorithm.py);
``_forward_exploration`` an exact draw of π_θ (``sample_truncated``: per-dimension inverse CDF of the truncated
normal, the density that is logged as the next round's q).
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn


def log_box_mass(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log(Φ(β) − Φ(α)) for α < β, stable on both tails (the upper tail by Φ(−α) − Φ(−β))."""
    flip = (alpha + beta) > 0
    a, b = torch.where(flip, -beta, alpha), torch.where(flip, -alpha, beta)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log1p(-torch.exp((la - lb).clamp_max(-1e-12)))


def sample_truncated(mean: torch.Tensor, sigma: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """One exact draw per entry of N(mean, σ²) truncated to [low, high] (diagonal σ: per dimension), by the
    inverse CDF u ~ U(Φ(α), Φ(β)), a = m + σ·Φ⁻¹(u), α = (low − m)/σ, β = (high − m)/σ. On the upper tail
    (α + β > 0) it draws −a from the mirrored box so Φ stays away from 1; the final clamp only removes
    float round-off. Computed in float64 (Φ⁻¹ resolves |x| up to ≈ 8 there, not ≈ 5 as in float32)."""
    dtype = mean.dtype
    mean, sigma, low, high = (t.to(torch.float64) for t in (mean, sigma.expand_as(mean), low, high))
    alpha, beta = (low - mean) / sigma, (high - mean) / sigma
    flip = (alpha + beta) > 0
    a, b = torch.where(flip, -beta, alpha), torch.where(flip, -alpha, beta)
    pa, pb = torch.special.ndtr(a), torch.special.ndtr(b)
    u = pa + (pb - pa) * torch.rand_like(mean)
    x = torch.special.ndtri(u.clamp(torch.finfo(mean.dtype).tiny, 1.0)).clamp(a, b)
    return (mean + sigma * torch.where(flip, -x, x)).clamp(low, high).to(dtype)


class CRMPolicyModule(TorchRLModule):
    """model_config: init_mean [3] (log-weights m₀), init_sigma [3] (σ at init), low [3], high [3] (the box),
    min_sigma (σ_θ's floor), learn_sigma (bool)."""

    def setup(self):
        cfg = dict(self.model_config or {})
        for key in ("init_mean", "init_sigma", "low", "high"):
            if key not in cfg:
                raise ValueError(f"CRMPolicyModule needs model_config[{key!r}] (a [3] log-weight vector)")
        d = self.observation_space.shape[0]
        vec = lambda k: torch.as_tensor(np.broadcast_to(np.asarray(cfg[k], np.float32), (3,)).copy())  # noqa: E731
        self.register_buffer("low", vec("low"))
        self.register_buffer("high", vec("high"))
        self.register_buffer("obs_mean", torch.zeros(d))
        self.register_buffer("obs_std", torch.ones(d))
        self.min_sigma = float(cfg.get("min_sigma", 0.05))
        self.weights = nn.Linear(d, 3)
        nn.init.zeros_(self.weights.weight)
        share = ((vec("init_mean") - self.low) / (self.high - self.low)).clamp(0.01, 0.99)
        with torch.no_grad():
            self.weights.bias.copy_(torch.log(share / (1 - share)))
        sigma = vec("init_sigma").clamp_min(self.min_sigma + 1e-6)
        self.log_sigma_excess = nn.Parameter(
            torch.log(sigma - self.min_sigma), requires_grad=bool(cfg.get("learn_sigma", True))
        )

    def set_obs_scale(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.obs_mean.copy_(torch.as_tensor(np.asarray(mean, np.float32)))
        self.obs_std.copy_(torch.as_tensor(np.maximum(np.asarray(std, np.float32), 1e-6)))

    def gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_θ(x) [B, 3], σ_θ [3])."""
        mean = self.low + (self.high - self.low) * torch.sigmoid(self.weights((obs - self.obs_mean) / self.obs_std))
        return mean, self.min_sigma + torch.exp(self.log_sigma_excess)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log π_θ(a_i | x_i) [B] of the truncated Gaussian (actions inside the box)."""
        mean, sigma = self.gaussian(obs)
        sigma = sigma.expand_as(mean)
        normal = TorchDiagGaussian(loc=mean, scale=sigma).logp(actions.to(mean.dtype))
        return normal - log_box_mass((self.low - mean) / sigma, (self.high - mean) / sigma).sum(-1)

    def mean_weights(self, obs: torch.Tensor) -> torch.Tensor:
        """exp(m_θ(x)): the deployed weights [B, 3]."""
        mean, _ = self.gaussian(obs)
        return torch.exp(mean)

    def _forward(self, batch, **kwargs):
        mean, sigma = self.gaussian(batch[Columns.OBS])
        return {"mean": mean, "sigma": sigma}

    def _forward_inference(self, batch, **kwargs):
        return {Columns.ACTIONS: self.mean_weights(batch[Columns.OBS])}

    def _forward_exploration(self, batch, **kwargs):  # one exact draw of π_θ per row
        mean, sigma = self.gaussian(batch[Columns.OBS])
        return {Columns.ACTIONS: torch.exp(sample_truncated(mean, sigma, self.low, self.high))}
