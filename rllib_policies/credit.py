"""Returns and credit assignment for the outer controller: each piece one function (or one small
module), batched over sessions [B, T] with a validity mask, its equation in the docstring.

    discounted_returns   G_t = r_t + γ·G_{t+1}                 (optionally normalised)
    kappa_schedule       κ(i): 0.2 → κ_max, annealed over the iterations
    kpi_blend            (1 − κ)·G_t + κ·KPI
    GatedAttentionCredit c_t = R_outer · g_t·α_t / Σ_j g_j·α_j,  α = softmax(Q(s_t,a_t)·K(S_T)ᵀ/√d_k)
    RollingBaseline      EMA mean / variance of the reward signal, α ∈ [0.005, 0.02]
    clip_rewards         clip to [−5, 5]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from actors.telemetry.sessionise import window_starts


def discounted_returns(rewards: np.ndarray, gamma: float, mask: np.ndarray | None = None,
                       normalise: bool = False, eps: float = 1e-8) -> np.ndarray:
    """G_t = r_t + γ·G_{t+1} along the last axis (G = 0 past the last valid step).

    rewards, mask: [B, T] (mask 1 = a real step; steps after a session's end are 0). With
    ``normalise``, G ← (G − mean)/(std + eps) over the valid steps of the whole batch.
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
    if normalise:
        valid = m > 0
        mu, sd = out[valid].mean(), out[valid].std()
        out = np.where(valid, (out - mu) / (sd + eps), 0.0)
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
            raise ValueError(f"kind must be 'linear' or 'cosine' and anneal_iters >= 1, got {self.kind!r}, {self.anneal_iters}")

    def __call__(self, iteration: int) -> float:
        x = min(1.0, max(0, iteration) / self.anneal_iters)
        ramp = x if self.kind == "linear" else (1 - math.cos(math.pi * x)) / 2
        return self.start + (self.end - self.start) * ramp


def kpi_blend(returns: np.ndarray, kpi: np.ndarray, kappa: float, mask: np.ndarray | None = None) -> np.ndarray:
    """(1 − κ)·G_t + κ·KPI, with the session-level KPI [B] broadcast over its steps [B, T]."""
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    blended = (1 - kappa) * np.asarray(returns, np.float64) + kappa * np.asarray(kpi, np.float64)[..., None]
    return blended if mask is None else blended * np.asarray(mask, np.float64)


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

    def advantage(self, rewards: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        r = np.asarray(rewards, np.float64)
        valid = np.ones_like(r, bool) if mask is None else np.asarray(mask) > 0
        if self.count == 0:
            self.update(r[valid])
            return np.where(valid, (r - self.mean) / math.sqrt(self.var + self.eps), 0.0)
        adv = np.where(valid, (r - self.mean) / math.sqrt(self.var + self.eps), 0.0)
        self.update(r[valid])
        return adv

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
    c_t = R_outer · g_t·α_t / Σ_j g_j·α_j   (credit: sums to R_outer over the valid steps)

    Trained jointly with the policy through two auxiliary losses (``aux_loss``): R̂ = Σ_t w_t·v(x_t)
    regressed on R_outer, where w_t = g_t·α_t / Σ g·α (return decomposition), and a binary
    cross-entropy that makes g_t predict whether step t had any engagement.
    """

    def __init__(self, d_in: int, d_k: int = 32):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d_in, d_k), nn.Linear(d_in, d_k), nn.Linear(d_in, 1)
        self.gate = nn.Linear(d_in, 1)
        self.d_k = d_k

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised gated attention w [B, T], gate logits [B, T])."""
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)
        x_last = x[torch.arange(x.shape[0]), last]                       # S_T
        scores = (self.q(x) * self.k(x_last)[:, None, :]).sum(-1) / math.sqrt(self.d_k)
        scores = scores.masked_fill(mask <= 0, float("-inf"))
        gate_logits = self.gate(x).squeeze(-1)
        logw = torch.log_softmax(scores, dim=1) + nn.functional.logsigmoid(gate_logits)
        logw = logw.masked_fill(mask <= 0, float("-inf"))
        w = torch.softmax(logw, dim=1)                                     # = g·α / Σ g·α
        return torch.nan_to_num(w, nan=0.0), gate_logits

    def forward(self, x: torch.Tensor, r_outer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c_t = R_outer · w_t, [B, T]."""
        w, _ = self.weights(x, mask)
        return w * r_outer[:, None]

    def aux_loss(self, x: torch.Tensor, r_outer: torch.Tensor, mask: torch.Tensor, engaged: torch.Tensor) -> torch.Tensor:
        w, gate_logits = self.weights(x, mask)
        r_hat = (w * self.v(x).squeeze(-1)).sum(dim=1)
        decomposition = ((r_hat - r_outer) ** 2).mean()
        bce = nn.functional.binary_cross_entropy_with_logits(gate_logits, engaged.float(), reduction="none")
        gate = (bce * mask).sum() / mask.sum().clamp(min=1)
        return decomposition + gate


def credit_windows(n_steps: int, max_steps: int = 512, overlap: int = 64) -> list[tuple[int, int, int]]:
    """(start, end, first_owned) per window: the 512-step cap with 64-step overlapping chunks. The
    first ``overlap`` steps of every window after the first are context only; each step's credit
    comes from exactly one window (the one that owns it)."""
    starts = window_starts(n_steps, max_steps, overlap)
    return [(s, min(s + max_steps, n_steps), s if i == 0 else s + overlap) for i, s in enumerate(starts)]


def chunked_credit(module: GatedAttentionCredit, x: torch.Tensor, r_outer: float, max_steps: int = 512,
                   overlap: int = 64) -> torch.Tensor:
    """Credit for one long session x [T, D]: per window, c = module(window) with R_outer shared in
    proportion to the steps the window owns; owned steps take their credit from their window."""
    t = x.shape[0]
    credit = torch.zeros(t)
    for start, end, owned in credit_windows(t, max_steps, overlap):
        share = r_outer * (end - owned) / t
        part = x[start:end][None]
        mask = torch.ones(1, end - start)
        c = module(part, torch.tensor([1.0]), mask)[0]                    # weights within the window
        owned_w = c[owned - start:]
        credit[owned:end] = share * owned_w / owned_w.sum().clamp(min=1e-12)
    return credit
