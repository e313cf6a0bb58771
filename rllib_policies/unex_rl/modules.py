"""UNEX-RL's modules: one deterministic policy per stage and the global critic (RLlib new stack).

StagePolicyModule   μ_k(o_k) = a_max · sigmoid(MLP(o_k)) (the actor of stage k's actor-critic);
                    exploration samples N(μ, (σ·a_max)²) (RLlib's diagonal Gaussian from
                    ACTION_DIST_INPUTS = [μ, log σ]).
GlobalCriticModule  Q_g(o_1, a_1, a_2, a_3) on the joint action of all stages, learner-only
                    (or on φ(a), each stage's scale weights as a direction: ``scale_free``);
                    ``n_critics = 3`` gives the independent-learners arm one critic per stage,
                    Q_k(o_k, a_k); ``twin`` gives each critic two heads Q^1, Q^2 (TD3's clipped
                    double-Q: the TD target takes min(Q'^1, Q'^2), the actor ascends Q^1).

Both implement RLlib's ``TargetNetworkAPI``: the learner makes the slowly tracking target copies
(μ'_k, Q'_g) and Polyak-averages them after every update; the env runners' inference-only copies
of the stage policies carry no target network (``InferenceOnlyAPI``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from actors.stages import STAGE_ACTION_HIGH
from rllib_policies.building_blocks import mlp

JOINT_ACTION_DIM = sum(len(v) for v in STAGE_ACTION_HIGH.values())  # 4 + 3 + 3
MAX_ACTION_DIM = max(len(v) for v in STAGE_ACTION_HIGH.values())
Q_VALUES = "q_values"
# Each stage ranks its items by a score linear in these of its parameters (matching: w_relevance, w_popularity and
# exploration, the Gumbel noise's scale; pre-ranking and ranking: all three weights), so any positive multiple of
# them serves the same items; matching's w_history shapes the query instead.
SCALE_WEIGHTS = {"matching": (0, 1, 3), "pre_ranking": (0, 1, 2), "ranking": (0, 1, 2)}


def _scale_groups() -> np.ndarray:
    """[stage, joint action column]: 1 where the column is one of that stage's scale weights (the joint action
    concatenates the stages in ``STAGE_ACTION_HIGH``'s order)."""
    groups, start = np.zeros((len(STAGE_ACTION_HIGH), JOINT_ACTION_DIM), np.float32), 0
    for k, (stage, high) in enumerate(STAGE_ACTION_HIGH.items()):
        groups[k, start + np.asarray(SCALE_WEIGHTS[stage])] = 1.0
        start += len(high)
    return groups


_GROUPS = _scale_groups()


def scale_free(actions: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """φ(a): each stage's scale weights (``SCALE_WEIGHTS``) divided by their sum + ε, its other parameters as
    they are; ``actions`` [..., JOINT_ACTION_DIM] scaled to [0, 1]. The cascade serves a and c·a (c > 0 on one
    stage's scale weights) the same items, so Q_g(o, a) is constant along such rays: a critic on φ(a) has that
    built in instead of learning it from noisy rewards."""
    groups = torch.as_tensor(_GROUPS, device=actions.device)
    per_column = (actions @ groups.T) @ groups  # each scale column: its stage's sum; 0 elsewhere
    return torch.where(groups.sum(0) > 0, actions / (per_column + eps), actions)


class StagePolicyModule(TorchRLModule, TargetNetworkAPI, InferenceOnlyAPI):
    """model_config: hidden (64, 64), explore_std (0.1 of each action's range), init (default action)."""

    def setup(self):
        cfg = {"hidden": (64, 64), "explore_std": 0.1, **(self.model_config or {})}
        high = torch.as_tensor(np.asarray(self.action_space.high, np.float32))
        self.register_buffer("high", high)
        self.pi = mlp(self.observation_space.shape[0], tuple(cfg["hidden"]), len(high))
        if cfg.get("init") is not None:  # start at a given action: bias = logit(init / high)
            p = np.clip(np.asarray(cfg["init"], np.float32) / high.numpy(), 1e-3, 1 - 1e-3)
            with torch.no_grad():
                self.pi[-1].weight.mul_(0.1)  # near the default action, but still a function of o_k
                self.pi[-1].bias.copy_(torch.as_tensor(np.log(p / (1 - p))))
        self.log_std = math.log(float(cfg["explore_std"]))

    def logits(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        """z = MLP(o_k), the pre-squash output (μ_k = a_max · sigmoid(z)), or the target policy's."""
        return (self.target_pi if target else self.pi)(obs)

    def act(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        """μ_k(o_k), or the target policy's μ'_k(o_k)."""
        return self.high * torch.sigmoid(self.logits(obs, target))

    def _forward(self, batch, **kwargs):
        mean = self.act(batch[Columns.OBS])
        log_std = torch.log(self.high).expand_as(mean) + self.log_std
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, log_std], dim=-1)}

    def _forward_inference(self, batch, **kwargs):
        return {Columns.ACTIONS: self.act(batch[Columns.OBS])}

    # ---------------------------------------------------------------- TargetNetworkAPI
    def make_target_networks(self) -> None:
        self.target_pi = make_target_network(self.pi)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.pi, self.target_pi)]

    def forward_target(self, batch: dict) -> dict:
        return {Columns.ACTIONS: self.act(batch[Columns.OBS], target=True)}

    # ---------------------------------------------------------------- InferenceOnlyAPI
    def get_non_inference_attributes(self) -> list[str]:
        return ["target_pi"]


class GlobalCriticModule(TorchRLModule, TargetNetworkAPI):
    """model_config: obs_dim (o_1's width), n_critics (1 global or 3 per-stage), twin (two heads per
    critic, TD3), scale_free (the global critic reads φ(a), ``scale_free``), hidden (128, 128)."""

    def setup(self):
        cfg = {"hidden": (128, 128), "n_critics": 1, "twin": False, "scale_free": False, **(self.model_config or {})}
        d_obs, self.n_critics = int(cfg["obs_dim"]), int(cfg["n_critics"])
        self.scale_free = bool(cfg["scale_free"])
        if self.scale_free and self.n_critics != 1:
            raise ValueError("scale_free reads the joint action: it needs the global critic (n_critics 1)")
        self.n_heads = 2 if cfg["twin"] else 1
        d_act = JOINT_ACTION_DIM if self.n_critics == 1 else MAX_ACTION_DIM
        self.q = nn.ModuleList(
            [mlp(d_obs + d_act, tuple(cfg["hidden"]), 1) for _ in range(self.n_critics * self.n_heads)]
        )

    def value(
        self, obs: torch.Tensor, actions: torch.Tensor, index: int = 0, target: bool = False, head: int = 0
    ) -> torch.Tensor:
        """Q(o, a) [B] of critic ``index``'s ``head`` (or the target Q'); actions already scaled to [0, 1]
        (joint for the global critic)."""
        net = (self.target_q if target else self.q)[index * self.n_heads + head]
        return net(torch.cat([obs, scale_free(actions) if self.scale_free else actions], dim=-1)).squeeze(-1)

    def values(self, obs: torch.Tensor, actions: torch.Tensor, index: int = 0, target: bool = False) -> list:
        """[Q^h(o, a) for every head h] of critic ``index``."""
        return [self.value(obs, actions, index, target, h) for h in range(self.n_heads)]

    def target_value(self, obs: torch.Tensor, actions: torch.Tensor, index: int = 0) -> torch.Tensor:
        """min_h Q'^h(o, a): the clipped double-Q target (one head: Q'(o, a))."""
        return torch.stack(self.values(obs, actions, index, target=True)).min(dim=0).values

    def _forward(self, batch, **kwargs):
        return {}

    # ---------------------------------------------------------------- TargetNetworkAPI
    def make_target_networks(self) -> None:
        self.target_q = make_target_network(self.q)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.q, self.target_q)]

    def forward_target(self, batch: dict) -> dict:
        """Q'(o, a) of critic ``batch.get("critic", 0)``."""
        return {Q_VALUES: self.value(batch[Columns.OBS], batch[Columns.ACTIONS], batch.get("critic", 0), target=True)}
