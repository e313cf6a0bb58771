"""BCQ, batch-constrained Q-learning (Fujimoto, Meger & Precup 2019), continuous actions: the seed's learner
that converged where TD3 did not.

Three parts, trained together on logged transitions (s, ā, r, s', done), ā = a / a_max ∈ [0, 1]³:

generator      a conditional VAE of the logged actions: E(s, ā) → N(m, σ²), z = m + σ·ε, D(s, z) = sigmoid(·);
               L_G = mean ‖D(s, z) − ā‖² + ½·mean KL(N(m, σ²) ‖ N(0, I)).  Sampling: z ~ N(0, I) clipped to ±½,
               so D proposes actions the data hold
perturbation   ξ(s, â) = Φ·tanh(MLP(s, â)) ∈ [−Φ, Φ]; the actor's action π(s, â) = clip(â + ξ(s, â), 0, 1),
               â ~ D(s, ·); L_ξ = −mean Q¹(s, π(s, â))                          (critics and D frozen)
critics        for each s', n candidates â'_j ~ D(s', ·) perturbed by the target ξ';
               y = r + γ·(1 − done)·max_j [λ·min(Q¹', Q²')(s', â'_j) + (1 − λ)·max(Q¹', Q²')(s', â'_j)]
               L_Q = mean (Q¹(s, ā) − y)² + mean (Q²(s, ā) − y)²
policy         π(s) = the candidate with the largest Q¹ among n perturbed samples of D(s, ·) (a fixed set of
               latent draws, so π is a deterministic function of s)
targets        ξ', Q' ← Polyak after every step

Φ bounds how far the policy may leave the data's support: Φ = 0 is a greedy pick among the generator's
proposals, Φ = 1 is unconstrained (d3rlpy's ``BCQ`` defaults: Φ = 0.05, n = 10, λ = 0.75).

    algo = (BCQConfig().environment(SessionEnv, env_config=…)
            .offline_rl(dataset="…/rows.parquet").bcq(action_flexibility=0.05).build_algo())
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from torch import nn

from rllib_policies.algorithm_base import set_provided
from rllib_policies.building_blocks import mlp

from .common import OfflineActorCritic, OfflineActorCriticModule, OfflineConfig, OfflineLearner

LATENT_CLIP = 0.5


class BCQConfig(OfflineConfig):
    """AlgorithmConfig for BCQ; ``.bcq(...)`` sets its own options."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or BCQ)
        self.action_flexibility = 0.05
        self.n_action_samples = 10
        self.lam = 0.75
        self.generator_lr = 1e-3
        self.kl_weight = 0.5

    @property
    def default_learner_class(self):
        return BCQLearner

    def bcq(
        self,
        *,
        action_flexibility: float = NotProvided,
        n_action_samples: int = NotProvided,
        lam: float = NotProvided,
        generator_lr: float = NotProvided,
        kl_weight: float = NotProvided,
    ) -> BCQConfig:
        """Sets BCQ's own options.

        Args:
            action_flexibility: Φ, the perturbation's bound (unit-cube action units); in [0, 1].
            n_action_samples: n, the generator's candidates per state (targets and the policy).
            lam: λ, the soft clipped double-Q weight of the min in the target.
            generator_lr: The conditional VAE's learning rate.
            kl_weight: The VAE's KL weight.

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.action_flexibility <= 1.0:
            raise ValueError(f"action_flexibility must be in [0, 1], got {self.action_flexibility}")
        if int(self.n_action_samples) < 1:
            raise ValueError(f"n_action_samples must be >= 1, got {self.n_action_samples}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=BCQModule,
            model_config={
                "hidden": tuple(self.hidden),
                "action_flexibility": self.action_flexibility,
                "n_action_samples": self.n_action_samples,
                "seed": self.seed or 0,
            },
        )


class ConditionalVAE(nn.Module):
    """E(s, ā) → (m, log σ) of z [2·d_act]; D(s, z) → ā ∈ [0, 1]."""

    def __init__(self, d_obs: int, d_act: int, hidden: tuple[int, ...]):
        super().__init__()
        self.d_latent = 2 * d_act
        self.encoder = mlp(d_obs + d_act, hidden, 2 * self.d_latent)
        self.decoder = mlp(d_obs + self.d_latent, hidden, d_act)

    def encode(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.encoder(torch.cat([obs, action], -1)).chunk(2, -1)
        return mean, log_std.clamp(-4.0, 15.0)

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.cat([obs, z], -1)))


class BCQModule(OfflineActorCriticModule):
    """The generator, the perturbation actor ξ and the twin critics (and targets ξ', Q')."""

    def setup_actor(self, d_obs: int, d_act: int, hidden: tuple[int, ...]) -> None:
        cfg = self.model_config or {}
        self.phi = float(cfg.get("action_flexibility", 0.05))
        self.n = int(cfg.get("n_action_samples", 10))
        self.generator = ConditionalVAE(d_obs, d_act, hidden)
        self.actor = mlp(d_obs + d_act, hidden, d_act)  # ξ's MLP
        g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        latent = (torch.randn(self.n, self.generator.d_latent, generator=g)).clamp(-LATENT_CLIP, LATENT_CLIP)
        self.register_buffer("policy_latent", latent)  # the policy's fixed latent draws

    def perturb(self, obs: torch.Tensor, proposal: torch.Tensor, target: bool = False) -> torch.Tensor:
        """π(s, â) = clip(â + Φ·tanh(MLP(s, â)), 0, 1)."""
        xi = self.phi * torch.tanh((self.target_actor if target else self.actor)(torch.cat([obs, proposal], -1)))
        return (proposal + xi).clamp(0.0, 1.0)

    def candidates(self, obs: torch.Tensor, latent: torch.Tensor, target: bool = False) -> torch.Tensor:
        """n perturbed proposals per state [B, n, d_act] for latent draws [B, n, d_z] (or [n, d_z])."""
        b, n = len(obs), latent.shape[-2]
        rep = obs.repeat_interleave(n, 0)
        z = latent.expand(b, n, -1).reshape(b * n, -1)
        return self.perturb(rep, self.generator.decode(rep, z), target).reshape(b, n, -1)

    def act_unit(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        """π(s): the candidate (fixed latent draws) with the largest Q¹ (Q¹' for the target)."""
        cand = self.candidates(obs, self.policy_latent, target)
        b, n, d = cand.shape
        critic = self.target_critic if target else self.critic
        q = critic(obs.repeat_interleave(n, 0), cand.reshape(b * n, d))[0].reshape(b, n)
        return cand[torch.arange(b), q.argmax(1)]


class BCQLearner(OfflineLearner):
    def optimizers(self, module, config):
        return [
            ("critic", module.critic, config.lr),
            ("actor", module.actor, config.actor_lr),
            ("generator", module.generator, config.generator_lr),
        ]

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        m, cfg = self.module[module_id].unwrapped(), self.config
        obs, act, nxt = batch[Columns.OBS], batch[Columns.ACTIONS], batch[Columns.NEXT_OBS]

        # generator: the conditional VAE of the logged actions
        mean, log_std = m.generator.encode(obs, act)
        z = mean + log_std.exp() * torch.randn_like(mean)
        recon = ((m.generator.decode(obs, z) - act) ** 2).sum(-1).mean()
        kl = (-0.5 * (1 + 2 * log_std - mean**2 - (2 * log_std).exp())).sum(-1).mean()
        generator_loss = recon + cfg.kl_weight * kl

        # critics: soft clipped double-Q over n perturbed proposals at s'
        with torch.no_grad():
            b, n = len(nxt), cfg.n_action_samples
            latent = torch.randn(b, n, m.generator.d_latent, device=obs.device).clamp(-LATENT_CLIP, LATENT_CLIP)
            cand = m.candidates(nxt, latent, target=True)
            q1, q2 = m.target_critic(nxt.repeat_interleave(n, 0), cand.reshape(b * n, -1))
            soft = (cfg.lam * torch.minimum(q1, q2) + (1 - cfg.lam) * torch.maximum(q1, q2)).reshape(b, n)
            y = batch[Columns.REWARDS] + cfg.gamma * (1.0 - batch[Columns.TERMINATEDS]) * soft.max(1).values
        q1, q2 = m.critic(obs, act)
        critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()

        # perturbation actor: ascend Q¹ from the generator's proposals (critics and generator frozen)
        with torch.no_grad():
            latent = torch.randn(len(obs), m.generator.d_latent, device=obs.device).clamp(-LATENT_CLIP, LATENT_CLIP)
            proposal = m.generator.decode(obs, latent)
        m.critic.requires_grad_(False)
        try:
            actor_loss = -m.critic(obs, m.perturb(obs, proposal))[0].mean()
        finally:
            m.critic.requires_grad_(True)
        self.metrics.log_dict(
            {
                "critic_loss": critic_loss.item(),
                "actor_loss": actor_loss.item(),
                "generator_loss": generator_loss.item(),
                "reconstruction": recon.item(),
                "q_mean": q1.mean().item(),
            },
            key=module_id,
            window=1,
        )
        return critic_loss + actor_loss + generator_loss


class BCQ(OfflineActorCritic):
    config_class = BCQConfig
