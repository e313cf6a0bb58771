"""The PRL-PUTS utility-weight agent as an RLlib (new API stack) RLModule.

Q(s, a) ∈ R² for a request context s and a utility-weight vector a from the action grid:

    h_s = MLP_s(s)                          state encoder over the request context: user tower, pooled
                                            recent history, cohort, request index, clicks so far
                                            (actors.observation.ObservationSpec.context)
    h_a = MLP_a(a / a_max)                  the action is an input, not one output per action
    Q_k(s, a) = μ_k + σ_k · head_k(MLP([h_s, h_a, h_s ⊙ h_a]))      k ∈ {engagement, long dwell}

μ_k, σ_k are the reward groups' mean and standard deviation on the training logs (buffers), so each
head learns a standardised target and ``scores(s)`` = (Q − μ)/σ puts both heads on a common scale.
Inference: π_λ(s) = argmax_a λ·Q̃₁(s, a) + (1 − λ)·Q̃₂(s, a), λ from ``model_config["lambda"]`` or
the batch's "lambda" column. What is deployed at λ (``act``) also honours the do-no-harm guard
(guard.py): where held-out logs did not show π_λ beating the best global vector g_λ, g_λ is served.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from rllib_policies.building_blocks import mlp

N_HEADS = 2


class UtilityQModule(TorchRLModule):
    """model_config: grid (the action weight vectors [A, 3], required), hidden (64), lambda (0.5)."""

    def setup(self):
        cfg = {"hidden": 64, "lambda": 0.5, **(self.model_config or {})}
        if "grid" not in cfg:
            raise ValueError("UtilityQModule needs model_config['grid']: the action set's weight vectors [A, 3]")
        grid = torch.as_tensor(np.asarray(cfg["grid"], np.float32))
        if self.action_space is not None and hasattr(self.action_space, "n") and self.action_space.n != len(grid):
            raise ValueError(f"action space has {self.action_space.n} actions but the grid has {len(grid)}")
        h, d_obs = int(cfg["hidden"]), self.observation_space.shape[0]
        self.register_buffer("grid", grid)
        self.register_buffer("grid_scale", grid.abs().amax(dim=0).clamp_min(1e-6))
        self.register_buffer("reward_mean", torch.zeros(N_HEADS))
        self.register_buffer("reward_std", torch.ones(N_HEADS))
        self.lam = float(cfg["lambda"])
        self.state_encoder = mlp(d_obs, (h,), h)
        self.action_encoder = mlp(grid.shape[1], (h,), h)
        self.trunk = nn.Sequential(nn.Linear(3 * h, h), nn.ReLU())
        self.heads = nn.Linear(h, N_HEADS)
        self.guard: tuple[np.ndarray, np.ndarray] | None = None  # (swept λ [L], fallback action [L], −1 = π_λ)

    def scores(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised Q̃ = (Q − μ)/σ: [B, 2] for given action indices [B], else [B, A, 2] for all."""
        h_s = torch.relu(self.state_encoder(obs))
        h_a = torch.relu(self.action_encoder(self.grid / self.grid_scale))  # [A, h]
        if actions is not None:
            h_a = h_a[actions.long()]  # [B, h]
        else:
            h_s, h_a = h_s[:, None, :].expand(-1, len(self.grid), -1), h_a[None].expand(len(obs), -1, -1)
        return self.heads(self.trunk(torch.cat([h_s, h_a, h_s * h_a], dim=-1)))

    def q_values(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """Q in reward units (same shapes as ``scores``)."""
        return self.reward_mean + self.reward_std * self.scores(obs, actions)

    def set_reward_scale(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.reward_mean.copy_(torch.as_tensor(np.asarray(mean, np.float32)))
        self.reward_std.copy_(torch.as_tensor(np.maximum(np.asarray(std, np.float32), 1e-6)))

    def greedy(self, obs: torch.Tensor, lam) -> torch.Tensor:
        """π_λ(s) = argmax_a λ·Q̃₁ + (1 − λ)·Q̃₂ (λ a float or [B])."""
        s = self.scores(obs)
        lam = torch.as_tensor(lam, dtype=s.dtype).reshape(-1, 1)
        return (lam * s[..., 0] + (1 - lam) * s[..., 1]).argmax(dim=-1)

    def set_guard(self, lambdas: np.ndarray, fallback_actions: np.ndarray) -> None:
        """The do-no-harm decisions: at swept λ_l serve grid action fallback_actions[l] to everyone,
        or π_λ where it is −1."""
        lam, fb = np.asarray(lambdas, np.float64).ravel(), np.asarray(fallback_actions, np.int64).ravel()
        if len(lam) == 0 or len(lam) != len(fb) or not ((fb >= -1) & (fb < len(self.grid))).all():
            raise ValueError(
                f"guard needs one fallback action in [-1, {len(self.grid)}) per λ, got {len(fb)} for {len(lam)} λ"
            )
        self.guard = (lam, fb)

    def act(self, obs: torch.Tensor, lam: float) -> torch.Tensor:
        """The deployed policy at λ: the guard's decision at the nearest swept λ — g_λ for everyone
        where it fell back, else π_λ(s). Without a guard, π_λ."""
        if self.guard is not None:
            lambdas, fallback = self.guard
            g = int(fallback[np.abs(lambdas - float(lam)).argmin()])
            if g >= 0:
                return torch.full((len(obs),), g, dtype=torch.long, device=obs.device)
        return self.greedy(obs, lam)

    def _forward(self, batch, **kwargs):
        obs = batch[Columns.OBS]
        out = {"q_scores": self.scores(obs, batch.get(Columns.ACTIONS))}
        return out

    def _forward_inference(self, batch, **kwargs):
        obs = batch[Columns.OBS]
        return {Columns.ACTIONS: self.greedy(obs, batch.get("lambda", self.lam))}

    def _forward_exploration(self, batch, **kwargs):  # the logging policy: uniform over the grid
        obs = batch[Columns.OBS]
        return {Columns.ACTIONS: torch.randint(0, len(self.grid), (len(obs),), device=obs.device)}


def save_agent(module: UtilityQModule, path: str) -> str:
    """What serving loads: the state dict (with reward scale) + grid + sizes + the do-no-harm guard,
    no RLlib checkpoint."""
    grid = module.grid.numpy()
    torch.save(
        {
            "state_dict": module.state_dict(),
            "grid": grid.tolist(),
            "hidden": module.heads.in_features,
            "obs_dim": module.observation_space.shape[0],
            "guard": None if module.guard is None else [g.tolist() for g in module.guard],
        },
        path,
    )
    return path


def load_agent(path: str) -> UtilityQModule:
    """A UtilityQModule saved by ``save_agent``, in eval mode."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"utility agent file {path!r} not found: run rllib_policies.train_utility_agent first")
    saved = torch.load(path, weights_only=True)
    module = UtilityQModule(
        observation_space=gym.spaces.Box(-np.inf, np.inf, (int(saved["obs_dim"]),), np.float32),
        action_space=gym.spaces.Discrete(len(saved["grid"])),
        model_config={"grid": saved["grid"], "hidden": int(saved["hidden"])},
    )
    module.load_state_dict(saved["state_dict"])
    if saved.get("guard") is not None:
        module.set_guard(*saved["guard"])
    return module.eval()
