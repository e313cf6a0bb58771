"""UWAC, uncertainty weighted actor-critic (Wu et al. 2021), on TD3's actor-critic: the critics carry dropout,
and the spread of their Monte-Carlo-dropout passes down-weights the transitions whose actions the data cannot
vouch for.

Per minibatch of logged transitions (s, ā, r, s', done), ā = a / a_max:

uncertainty  U(s, a) = Var_k Q¹_k(s, a) over K dropout passes of Q¹ (K = ``dropout_samples``)
weight       w(s, a) = min(β·Ū / U(s, a), w_max), Ū = mean U(s, ā) over the batch's logged actions  (no gradient;
             a session's last step, whose target y = r is exact, keeps weight 1)
critics      ã' = clip(μ'(s') + clip(N(0, σ̃²), −c, c), 0, 1)                   TD3's target smoothing
             y  = r + γ·(1 − done)·min(Q¹', Q²')(s', ã')
             L_Q = mean w(s', ã')·[(Q¹(s, ā) − y)² + (Q²(s, ā) − y)²]            uncertain targets count less
actor        every ``policy_delay``-th step: L_μ = −mean w(s, μ(s))·Q¹(s, μ(s))  (critics frozen)

The paper puts these weights on BEAR (an MMD constraint to the data); here they sit on TD3 with nothing else,
so what UWAC adds over TD3 is exactly the uncertainty weighting. β is relative to the batch's own uncertainty
at its logged actions (Ū) rather than an absolute constant, so one β serves returns of any scale: an action as
uncertain as the data's own gets weight β. Target and estimate passes run with dropout off (the mean network).

    algo = (UWACConfig().environment(SessionEnv, env_config=…)
            .offline_rl(dataset="…/rows.parquet").uwac(dropout=0.1, beta=1.0).build_algo())
"""

from __future__ import annotations

import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from torch import nn

from rllib_policies.algorithm_base import set_provided
from rllib_policies.building_blocks import mlp

from .common import TwinCritic
from .td3 import TD3, TD3Config, TD3Learner, TD3Module


class UWACConfig(TD3Config):
    """AlgorithmConfig for UWAC; ``.uwac(...)`` sets its own options (``.td3(...)`` its TD3 ones)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or UWAC)
        self.dropout = 0.1
        self.dropout_samples = 10
        self.beta = 1.0
        self.max_weight = 1.5

    @property
    def default_learner_class(self):
        return UWACLearner

    def uwac(
        self,
        *,
        dropout: float = NotProvided,
        dropout_samples: int = NotProvided,
        beta: float = NotProvided,
        max_weight: float = NotProvided,
    ) -> UWACConfig:
        """Sets UWAC's own options.

        Args:
            dropout: The critics' dropout probability; in (0, 1).
            dropout_samples: K, the dropout passes whose variance is the uncertainty U.
            beta: β, the weight of an action exactly as uncertain as the batch's logged ones.
            max_weight: w_max, the cap on a weight (actions far more certain than the data's gain no more).

        Returns:
            This updated AlgorithmConfig object.
        """
        return set_provided(self, locals())

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.dropout < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {self.dropout}")
        if int(self.dropout_samples) < 2:
            raise ValueError(f"dropout_samples must be >= 2 (a variance), got {self.dropout_samples}")
        if self.beta <= 0 or self.max_weight <= 0:
            raise ValueError(f"beta and max_weight must be > 0, got {self.beta} and {self.max_weight}")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=UWACModule, model_config={"hidden": tuple(self.hidden), "dropout": self.dropout}
        )


class DropoutTwinCritic(TwinCritic):
    """TD3's twin critics with dropout after every hidden layer."""

    def __init__(self, d_obs: int, d_act: int, hidden: tuple[int, ...], p: float):
        nn.Module.__init__(self)
        self.q1, self.q2 = mlp(d_obs + d_act, hidden, 1, dropout=p), mlp(d_obs + d_act, hidden, 1, dropout=p)


class UWACModule(TD3Module):
    """TD3's actor μ(s) and dropout twin critics; ``uncertainty(obs, ā)`` is U."""

    def setup(self):
        super().setup()
        self.eval()  # the mean networks outside the learner's dropout passes

    def make_critic(self, d_obs: int, d_act: int, hidden: tuple[int, ...]) -> nn.Module:
        return DropoutTwinCritic(d_obs, d_act, hidden, float((self.model_config or {}).get("dropout", 0.1)))

    def uncertainty(self, obs: torch.Tensor, action: torch.Tensor, samples: int) -> torch.Tensor:
        """U(s, ā) [B]: the variance of Q¹ over ``samples`` dropout passes (no gradient)."""
        x = torch.cat([obs, action], dim=-1)
        was_training = self.critic.training
        self.critic.train()
        try:
            with torch.no_grad():
                q = torch.stack([self.critic.q1(x).squeeze(-1) for _ in range(samples)])
        finally:
            self.critic.train(was_training)
        return q.var(0)


class UWACLearner(TD3Learner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        m, cfg = self.module[module_id].unwrapped(), self.config
        obs, act, nxt = batch[Columns.OBS], batch[Columns.ACTIONS], batch[Columns.NEXT_OBS]
        k = int(cfg.dropout_samples)
        ref = m.uncertainty(obs, act, k).mean().clamp_min(1e-8)  # Ū: the data's own uncertainty

        def weight(o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            w = cfg.beta * ref / m.uncertainty(o, a, k).clamp_min(1e-8)
            return torch.nan_to_num(w, nan=0.0).clamp(max=cfg.max_weight)

        m.eval()  # forward_train left every network in training mode: targets and the actor's Q use the mean
        with torch.no_grad():
            y, next_act = self.target(m, batch)
            # a session's last step has the exact target y = r: nothing uncertain to down-weight
            w_target = torch.where(batch[Columns.TERMINATEDS] > 0, 1.0, weight(nxt, next_act))
        m.critic.train()  # the Bellman regression itself is a dropout pass
        try:
            q1, q2 = m.critic(obs, act)
        finally:
            m.critic.eval()
        critic_loss = (w_target * ((q1 - y) ** 2 + (q2 - y) ** 2)).mean()

        def ascend(m, o: torch.Tensor) -> tuple[torch.Tensor, dict]:
            action = m.act_unit(o)
            w_actor = weight(o, action.detach())
            loss = -(w_actor * m.critic(o, action)[0]).mean()
            return loss, {"actor_loss": loss.item(), "actor_weight": w_actor.mean().item()}

        actor_loss, logged = self.actor_loss(m, obs, act, ascend)
        self.metrics.log_dict(
            {
                "critic_loss": critic_loss.item(),
                "q_mean": q1.mean().item(),
                "target_weight": w_target.mean().item(),
                **logged,
            },
            key=module_id,
            window=1,
        )
        return critic_loss + actor_loss


class UWAC(TD3):
    config_class = UWACConfig
