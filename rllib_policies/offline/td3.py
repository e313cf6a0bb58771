"""TD3 trained offline (Fujimoto et al. 2018): the unconstrained baseline that should fail.

Per minibatch of logged transitions (s, ā, r, s', done), ā = a / a_max:

critics   ã' = clip(μ'(s') + clip(N(0, σ̃²), −c, c), 0, 1)                  target policy smoothing
          y  = r + γ·(1 − done)·min(Q¹'(s', ã'), Q²'(s', ã'))                clipped double-Q
          L_Q = mean (Q¹(s, ā) − y)² + mean (Q²(s, ā) − y)²
actor     every ``policy_delay``-th step: L_μ = −mean Q¹(s, μ(s))             (critics frozen)
          (the first ``bc_steps`` steps, optional: L_μ = mean ‖μ(s) − ā‖², a start at the logged behaviour)
targets   θ' ← τ·θ + (1 − τ)·θ' after every step

Nothing keeps μ(s) near the logged actions: where the data hold no action, Q¹ extrapolates and the actor
climbs the extrapolation (the seed's "inference error"; d3rlpy's TD3 on D4RL).

    algo = (TD3Config().environment(SessionEnv, env_config=…)
            .offline_rl(dataset="…/rows.parquet").td3(policy_delay=2).build_algo())
    algo.train()["offline"]["q_estimate"];  algo.policy_weights(obs)
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_policies.algorithm_base import set_provided
from rllib_policies.building_blocks import mlp

from .common import OfflineActorCritic, OfflineActorCriticModule, OfflineConfig, OfflineLearner, is_int


class TD3Config(OfflineConfig):
    """AlgorithmConfig for offline TD3; ``.td3(...)`` sets its own options."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TD3)
        self.policy_delay = 2
        self.target_noise = 0.2
        self.target_noise_clip = 0.5
        self.bc_steps = 0

    @property
    def default_learner_class(self):
        return TD3Learner

    def td3(
        self,
        *,
        policy_delay: int = NotProvided,
        target_noise: float = NotProvided,
        target_noise_clip: float = NotProvided,
        bc_steps: int = NotProvided,
    ) -> TD3Config:
        """Sets TD3's own options.

        Args:
            policy_delay: One actor step every ``policy_delay`` critic steps.
            target_noise: σ̃ of the target policy smoothing (unit-cube action units).
            target_noise_clip: c, its clip.
            bc_steps: The first ``bc_steps`` gradient steps train the actor by behaviour cloning, mean ‖μ(s) − ā‖²
                on the logged actions, while the critics learn: the policy starts at the logged behaviour instead
                of an untrained network's box centre (the CQL paper's warm start). The count is checkpointed:
                a restored run goes on from where it stopped.

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    def validate(self) -> None:
        super().validate()
        if not is_int(self.bc_steps) or self.bc_steps < 0:
            raise ValueError(f"bc_steps must be an int >= 0, got {self.bc_steps!r}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=TD3Module, model_config={"hidden": tuple(self.hidden)})


class TD3Module(OfflineActorCriticModule):
    """μ(s) = sigmoid(MLP(s)) ∈ [0, 1]³ and the twin critics."""

    def setup_actor(self, d_obs: int, d_act: int, hidden: tuple[int, ...]) -> None:
        self.actor = mlp(d_obs, hidden, d_act)

    def act_unit(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        return torch.sigmoid((self.target_actor if target else self.actor)(obs))


class TD3Learner(OfflineLearner):
    def optimizers(self, module, config):
        return [("critic", module.critic, config.lr), ("actor", module.actor, config.actor_lr)]

    def actor_loss(self, m, obs: torch.Tensor, act: torch.Tensor, ascend) -> tuple[torch.Tensor, dict]:
        """This step's actor loss and what to log: behaviour cloning, mean ‖μ(s) − ā‖², during the first
        ``bc_steps`` (logged as ``bc_loss``; the count is part of the learner's state),
        then ``ascend(m, obs) → (loss, logged)`` with the critics frozen every ``policy_delay``-th step, else
        nothing."""
        if self.steps < self.config.bc_steps:
            loss = ((m.act_unit(obs) - act) ** 2).sum(-1).mean()
            return loss, {"bc_loss": loss.item()}
        if (self.steps + 1) % self.config.policy_delay:
            return torch.zeros((), device=obs.device), {}
        m.critic.requires_grad_(False)
        try:
            return ascend(m, obs)
        finally:
            m.critic.requires_grad_(True)

    @staticmethod
    def ascend(m, obs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """TD3's actor loss, −mean Q¹(s, μ(s))."""
        loss = -m.critic(obs, m.act_unit(obs))[0].mean()
        return loss, {"actor_loss": loss.item()}

    def target(self, m, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """y = r + γ·(1 − done)·min(Q¹', Q²')(s', ã') and the smoothed target action ã' (call under no_grad)."""
        cfg, nxt, done = self.config, batch[Columns.NEXT_OBS], batch[Columns.TERMINATEDS]
        noise = torch.randn_like(batch[Columns.ACTIONS]) * cfg.target_noise
        next_act = (m.act_unit(nxt, target=True) + noise.clamp(-cfg.target_noise_clip, cfg.target_noise_clip)).clamp(
            0, 1
        )
        y = batch[Columns.REWARDS] + cfg.gamma * (1.0 - done) * torch.minimum(*m.target_critic(nxt, next_act))
        return y, next_act

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        m = self.module[module_id].unwrapped()
        obs, act = batch[Columns.OBS], batch[Columns.ACTIONS]
        with torch.no_grad():
            y, _ = self.target(m, batch)
        q1, q2 = m.critic(obs, act)
        critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
        actor_loss, logged = self.actor_loss(m, obs, act, self.ascend)
        self.metrics.log_dict(
            {"critic_loss": critic_loss.item(), "q_mean": q1.mean().item(), **logged}, key=module_id, window=1
        )
        return critic_loss + actor_loss


class TD3(OfflineActorCritic):
    config_class = TD3Config
