"""Returns and credit assignment for the outer controller: each piece one function (or one small
module), batched over sessions [B, T] with a validity mask, its equation in the docstring.

    discounted_returns   G_t = r_t + γ·G_{t+1}
    KappaSchedule        κ(i): 0.2 → κ_max, annealed over the iterations
    GatedAttentionCredit w_t = g_t·α_t / Σ_j g_j·α_j,  α = softmax(Q(s_t,a_t)·K(S_T)ᵀ/√d_k)
    credit_weights       w_t: the gated attention, or uniform 1/T
    kpi_credit           T·w_t·R: the session's outer reward R spread over its steps
    kpi_blend            A_t = (1 − κ)·G_t + κ·T·w_t·R
    RollingBaseline      EMA mean / variance of the reward signal, α ∈ [0.005, 0.02]
    clip_rewards         clip to [−5, 5]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def discounted_returns(rewards: np.ndarray, gamma: float, mask: np.ndarray | None = None) -> np.ndarray:
    """G_t = r_t + γ·G_{t+1} along the last axis (G = 0 past the last valid step).

    rewards, mask: [B, T] (mask 1 = a real step; steps after a session's end are 0).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    r = np.asarray(rewards, np.float64)
    m = np.ones_like(r) if mask is None else np.asarray(mask, np.float64)
    out = np.zeros_like(r)
    running = np.zeros(r.shape[:-1])
    for t in range(r.shape[-1] - 1, -1, -1):  # a loop over time, vectorised over sessions
        running = (r[..., t] + gamma * running) * m[..., t]
        out[..., t] = running
    return out


@dataclass(frozen=True)
class KappaSchedule:
    """κ(i) = start + (end − start)·min(1, i / anneal_iters) (linear), or the cosine ramp
    start + (end − start)·(1 − cos(π·min(1, i/anneal_iters)))/2. Starts at 0.2 and only rises."""

    start: float = 0.2
    end: float = 0.6
    anneal_iters: int = 100
    kind: str = "linear"

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.kind not in ("linear", "cosine") or self.anneal_iters < 1:
            raise ValueError(
                f"kind must be 'linear' or 'cosine' and anneal_iters >= 1, got {self.kind!r}, {self.anneal_iters}"
            )

    def __call__(self, iteration: int) -> float:
        x = min(1.0, max(0, iteration) / self.anneal_iters)
        ramp = x if self.kind == "linear" else (1 - math.cos(math.pi * x)) / 2
        return self.start + (self.end - self.start) * ramp


def clip_rewards(rewards, low: float = -5.0, high: float = 5.0):
    """clip(r, low, high) for NumPy arrays or torch tensors."""
    if isinstance(rewards, torch.Tensor):
        return rewards.clamp(low, high)
    return np.clip(rewards, low, high)


class RollingBaseline:
    """EMA of the reward signal: μ ← (1−α)μ + α·r̄, σ² ← (1−α)σ² + α·mean((r − μ)²), per batch;
    ``advantage(r) = (r − μ)/√(σ² + eps)`` uses the statistics *before* this batch updates them,
    except the very first batch, which initialises them (so it is standardised, not raw)."""

    def __init__(self, alpha: float = 0.01, eps: float = 1e-6):
        if not 0.005 <= alpha <= 0.02:
            raise ValueError(f"alpha must be in [0.005, 0.02] (the seed's range), got {alpha}")
        self.alpha, self.eps = alpha, eps
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def judge(self, values: np.ndarray) -> tuple[float, float]:
        """(μ, √(σ² + eps)) that this batch's ``values`` are judged by, then update with them: the
        statistics before the batch, except for the very first batch, which initialises them."""
        if self.count == 0:
            self.update(values)
            return self.mean, math.sqrt(self.var + self.eps)
        mean, sd = self.mean, math.sqrt(self.var + self.eps)
        self.update(values)
        return mean, sd

    def advantage(self, rewards: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        r = np.asarray(rewards, np.float64)
        valid = np.ones_like(r, bool) if mask is None else np.asarray(mask) > 0
        mean, sd = self.judge(r[valid])
        return np.where(valid, (r - mean) / sd, 0.0)

    def centred(self, rewards: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """r − μ with the same rule as ``advantage`` (no scaling)."""
        r = np.asarray(rewards, np.float64)
        valid = np.ones_like(r, bool) if mask is None else np.asarray(mask) > 0
        mean, _ = self.judge(r[valid])
        return np.where(valid, r - mean, 0.0)

    def scale(self, rewards: np.ndarray) -> float:
        """√(σ² + eps) with the same rule as ``advantage``."""
        return self.judge(np.asarray(rewards, np.float64).ravel())[1]

    def update(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        if self.count == 0:  # initialise from the first batch rather than from (0, 1)
            self.mean, self.var = float(values.mean()), float(values.var() + self.eps)
        else:
            a = self.alpha
            self.mean = (1 - a) * self.mean + a * float(values.mean())
            self.var = (1 - a) * self.var + a * float(((values - self.mean) ** 2).mean())
        self.count += values.size

    def state(self) -> dict:
        return {"alpha": self.alpha, "mean": self.mean, "var": self.var, "count": self.count}


class GatedAttentionCredit(nn.Module):
    """Spread a session's outer reward over its steps.

    α_t = softmax_t(Q(x_t)·K(x_T)ᵀ/√d_k)   (x_t = step features ⊕ action; x_T = the last valid step)
    g_t = σ(w_g·x_t + b_g)                  (the gate; trained to tell engaged steps from impression-only ones)
    w_t = g_t·α_t / Σ_j g_j·α_j             (``weights``; the credit c_t = R_outer·w_t sums to R_outer)

    Trained jointly with the policy through two auxiliary losses (``aux_loss``): R̂ = Σ_t w_t·v(x_t)
    regressed on R_outer (return decomposition), and a binary cross-entropy that makes g_t predict
    whether step t had any engagement.
    """

    def __init__(self, d_in: int, d_k: int = 32):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d_in, d_k), nn.Linear(d_in, d_k), nn.Linear(d_in, 1)
        self.gate = nn.Linear(d_in, 1)
        self.d_k = d_k

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised gated attention w [B, T], gate logits [B, T])."""
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)
        x_last = x[torch.arange(x.shape[0]), last]  # S_T
        scores = (self.q(x) * self.k(x_last)[:, None, :]).sum(-1) / math.sqrt(self.d_k)
        scores = scores.masked_fill(mask <= 0, float("-inf"))
        gate_logits = self.gate(x).squeeze(-1)
        logw = torch.log_softmax(scores, dim=1) + nn.functional.logsigmoid(gate_logits)
        logw = logw.masked_fill(mask <= 0, float("-inf"))
        w = torch.softmax(logw, dim=1)  # = g·α / Σ g·α
        return torch.nan_to_num(w, nan=0.0), gate_logits

    def aux_loss(
        self, x: torch.Tensor, r_outer: torch.Tensor, mask: torch.Tensor, engaged: torch.Tensor
    ) -> torch.Tensor:
        w, gate_logits = self.weights(x, mask)
        r_hat = (w * self.v(x).squeeze(-1)).sum(dim=1)
        decomposition = ((r_hat - r_outer) ** 2).mean()
        bce = nn.functional.binary_cross_entropy_with_logits(gate_logits, engaged.float(), reduction="none")
        gate = (bce * mask).sum() / mask.sum().clamp(min=1)
        return decomposition + gate


def credit_weights(credit: GatedAttentionCredit | None, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w_t [B, T]: the credit network's gated attention (no gradient: the policy gradient does not
    train it), or uniform credit 1/T over each session's valid steps when ``credit`` is None."""
    if credit is None:
        return mask / mask.sum(dim=1, keepdim=True)
    with torch.no_grad():
        weights, _ = credit.weights(x, mask)
    return weights


def kpi_credit(weights: torch.Tensor, mask: torch.Tensor, r_outer: torch.Tensor) -> torch.Tensor:
    """T·w_t·R [B, T]: the session's outer reward R [B] spread over its T valid steps by the credit
    weights (Σ_t w_t = 1), in per-step units (uniform credit gives R at every step)."""
    return mask.sum(dim=1, keepdim=True) * weights * r_outer[:, None]


def kpi_blend(step_signal, credit, kappa):
    """A_t = (1 − κ)·Ĝ_t + κ·T·w_t·R̂: the per-step signal blended with the KPI credit (both [B, T],
    NumPy or torch); κ a number in [0, 1] or one per session [B, 1]."""
    if np.ndim(kappa) == 0 and not 0.0 <= float(kappa) <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    return (1 - kappa) * step_signal + kappa * credit
