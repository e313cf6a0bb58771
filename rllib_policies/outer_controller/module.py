"""The ranking policy as an RLlib (new API stack) RLModule.

Action = the ranking stage's utility weights for one request, a = high ⊙ x with x on the simplex
(w_click, w_long_view, w_purchase). Ranking by Σ_k w_k·p_k depends only on the weights' direction,
so the policy has K − 1 = 2 degrees of freedom and explores them with an additive logistic normal:

    u ~ N(m(s), diag σ²) ∈ R^{K−1},   x = softmax([u, 0]),   a = high ⊙ x

(``SimplexLogisticNormal``, an RLlib ``TorchDiagGaussian`` over u whose samples are mapped onto the
simplex). Inference serves μ(s) = high ⊙ softmax([m(s), 0]). A step of σ in u multiplies one share
against the last by e^σ, so a share near 0 can grow by orders of magnitude in a few steps, and no
sample is clipped. ``high`` sets the scale of each share: x = (1, 0, 0) is click-only ranking and
x = (0, 0, 1) purchase-only, whatever the heads' base rates.
log π(a|s) = log N(u; m, σ²) − Σ_{k=1..K} log x_k (the additive-logistic Jacobian), u_k = log(x_k/x_K).
KL and entropy are those of the Gaussian over u (KL is invariant under the bijection; the entropy is u's).

Why not one free weight per head: earlier versions explored each weight separately (in action
units, then in logit space). The common scale of the weights is then a free direction the policy
gradient random-walks along: seeds drifted to a corner of the box ((0, 0, 0) or (2, 2, 0)) while J
did not change, and the learning test closed 15 % of its gap (benchmarks/results/learning_tests.md).

``model_config["init_action"]`` = a₀ starts the policy at a₀'s direction in every state: the output layer's
bias is log(x₀_k / x₀_K) with x₀ = (a₀/high) normalised to sum 1 and each share floored at 1e-3
(then renormalised), and its weights are scaled by ``init_output_scale`` (0.01), so μ(s) ≈ a₀'s
direction everywhere.

``exploration="session"`` (OuterControllerConfig) draws one ε ~ N(0, I) per session and explores with
u_t = m(s_t) + σ·ε at every request of it (``SessionNoise`` puts ε into the exploration batch): the
session's next-day return then answers one direction instead of T independent ones, so its coin flip
adds Var(R) to the policy gradient rather than T·Var(R) (the score of each step, (u_t − m_t)/σ² = ε/σ,
is unchanged; exact for a state-independent m, as ``personalisation_l2`` pulls m toward).

The module also owns the gated-attention credit network: it is trained jointly with the policy by
the learner, checkpointed with it, and never used at inference.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchDiagGaussian
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from rllib_policies.building_blocks import mlp
from rllib_policies.credit import GatedAttentionCredit

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
# shares are kept ≥ EDGE when mapped back to u: float32's smallest normal, so a sampled share is
# recovered exactly unless u lies ~85 logit units out (σ_u = 6 reaches 14σ before that)
EDGE = 1e-37
INIT_SHARE_FLOOR = 1e-3
SESSION_NOISE = "session_noise"  # the exploration batch's per-session ε [B, K − 1] (SessionNoise)


def to_simplex(u: torch.Tensor) -> torch.Tensor:
    """x = softmax([u, 0]) [..., K] from u [..., K − 1]."""
    return torch.softmax(torch.cat([u, torch.zeros_like(u[..., :1])], dim=-1), dim=-1)


def shares(a: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """x = (a/high) / Σ(a/high), each share ≥ EDGE: the direction of a weight vector on the simplex."""
    x = (a / high).clamp(min=EDGE)
    return x / x.sum(-1, keepdim=True)


def simplex_logits(action, high, floor: float = INIT_SHARE_FLOOR) -> torch.Tensor:
    """u₀ [K − 1] with high ⊙ softmax([u₀, 0]) ∝ the direction of ``action`` [K]: u₀_k = log(x₀_k/x₀_K),
    x₀ = action's shares floored at ``floor``. Refuses a vector outside [0, high] or all zero."""
    high = torch.as_tensor(high, dtype=torch.float32)
    a0 = torch.as_tensor(np.asarray(action, np.float32))
    if a0.shape != high.shape or not torch.isfinite(a0).all() or (a0 < 0).any() or (a0 > high).any() or not a0.any():
        raise ValueError(
            f"init_action must be {tuple(high.shape)} values in [0, high={high.tolist()}], not all 0, got {action}"
        )
    x0 = shares(a0, high).clamp(min=floor)
    log_x0 = torch.log(x0 / x0.sum())
    return log_x0[:-1] - log_x0[-1]


class SimplexLogisticNormal(TorchDiagGaussian):
    """u ~ N(loc, diag scale²) over K − 1 dims and a = high ⊙ softmax([u, 0]); ``high`` is a class
    attribute (one subclass per module, ``on_simplex``), since RLlib builds distributions with
    ``from_logits(inputs)``."""

    high: torch.Tensor = torch.ones(1)

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.high * to_simplex(u)

    def unsquash(self, a: torch.Tensor) -> torch.Tensor:
        log_x = torch.log(shares(a, self.high))
        return log_x[..., :-1] - log_x[..., -1:]

    def sample(self, *, sample_shape=None):
        return self.squash(super().sample(sample_shape=sample_shape))

    def rsample(self, *, sample_shape=None):
        return self.squash(super().rsample(sample_shape=sample_shape))

    def logp(self, value: torch.Tensor) -> torch.Tensor:
        """log N(u; m, σ²) − Σ_k log x_k, x = shares(a), u_k = log(x_k/x_K)."""
        return super().logp(self.unsquash(value)) - torch.log(shares(value, self.high)).sum(-1)

    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=self.squash(self.loc))


def on_simplex(high: torch.Tensor) -> type[SimplexLogisticNormal]:
    return type("SimplexLogisticNormal", (SimplexLogisticNormal,), {"high": high.detach().clone()})


class RankingPolicyModule(TorchRLModule):
    """model_config: hidden (64, 64), init_std (σ of u, 2.5), min_std (σ's floor, None: e^−5; init_std
    keeps exploring at the start's reach), max_logit (U: m(s) = U·tanh(raw/U) stays in [−U, U], so σ-sized
    exploration always reaches every corner; None: unbounded), credit_dk (32), init_action (None: the default
    initialisation; a₀ [K]: μ(s) ≈ a₀'s direction), init_output_scale (0.01)."""

    def setup(self):
        cfg = {
            "hidden": (64, 64),
            "init_std": 2.5,
            "credit_dk": 32,
            "init_action": None,
            "init_output_scale": 0.01,
            "min_std": None,
            "max_logit": None,
            **(self.model_config or {}),
        }
        d_obs, d_act = self.observation_space.shape[0], self.action_space.shape[0]
        self.register_buffer("high", torch.as_tensor(np.asarray(self.action_space.high, np.float32)))
        self.pi = mlp(d_obs, tuple(cfg["hidden"]), d_act - 1, nn.Tanh)  # m(s): K − 1 logits on the simplex
        self.max_logit = None if cfg["max_logit"] is None else float(cfg["max_logit"])
        if cfg["init_action"] is not None:
            self.start_at(cfg["init_action"], float(cfg["init_output_scale"]))
        self.log_std = nn.Parameter(torch.full((d_act - 1,), float(np.log(cfg["init_std"]))))
        if cfg["min_std"] is not None and not 0 < cfg["min_std"] <= np.exp(LOG_STD_MAX):
            raise ValueError(f"min_std must be in (0, e^{LOG_STD_MAX:g}], got {cfg['min_std']}")
        if self.max_logit is not None and not self.max_logit > 0:
            raise ValueError(f"max_logit must be > 0 or None, got {self.max_logit}")
        # a floor, σ = max(σ_θ, min_std): below it the parameter gets no gradient, so once σ_θ has fallen
        # under the floor σ stays at min_std (with min_std = init_std: a fixed exploration scale)
        self.log_std_min = LOG_STD_MIN if cfg["min_std"] is None else float(np.log(cfg["min_std"]))
        self.credit = GatedAttentionCredit(d_obs + d_act, int(cfg["credit_dk"]))
        # π(·|s) for exploration, inference and training (get_*_action_dist_cls)
        self.action_dist_cls = on_simplex(self.high)

    def start_at(self, action, output_scale: float = 0.01) -> None:
        """μ(s) ≈ a₀'s direction for every s: output bias = ``simplex_logits(a₀)``, output weights × scale."""
        bias = simplex_logits(action, self.high)
        if self.max_logit is not None:  # the raw output that U·tanh(raw/U) maps onto u₀
            u = self.max_logit
            bias = u * torch.atanh((bias / u).clamp(-0.999, 0.999))
        out = self.pi[-1]
        with torch.no_grad():
            out.bias.copy_(bias)
            out.weight.mul_(output_scale)

    def logits(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(s), log σ) [B, K − 1]: the Gaussian over u for a batch of observations."""
        m = self.pi(obs)
        if self.max_logit is not None:
            m = self.max_logit * torch.tanh(m / self.max_logit)
        return m, self.log_std.clamp(self.log_std_min, LOG_STD_MAX).expand_as(m)

    def gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ(s) = high ⊙ softmax([m(s), 0]), log σ): the served action and the exploration scale in u."""
        m, log_std = self.logits(obs)
        return self.high * to_simplex(m), log_std

    def _forward(self, batch, **kwargs):
        m, log_std = self.logits(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: torch.cat([m, log_std], dim=-1)}

    def _forward_exploration(self, batch, **kwargs):
        """Samples π(·|s) as RLlib does, or, when the batch carries the session's ε (``SessionNoise``),
        acts u = m(s) + σ·ε with log π(a|s) of the same per-step distribution."""
        out = self._forward(batch)
        if SESSION_NOISE not in batch:
            return out
        m, log_std = self.logits(batch[Columns.OBS])
        dist = self.action_dist_cls(loc=m, scale=log_std.exp())
        actions = dist.squash(m + log_std.exp() * batch[SESSION_NOISE].to(m.dtype))
        return {**out, Columns.ACTIONS: actions, Columns.ACTION_LOGP: dist.logp(actions)}

    def action_dist(self, obs: torch.Tensor) -> SimplexLogisticNormal:
        """π(·|s): u ~ N(m(s), diag σ²), a = high ⊙ softmax([u, 0]), for a batch of observations."""
        m, log_std = self.logits(obs)
        return self.get_train_action_dist_cls()(loc=m, scale=log_std.exp())

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(a|s) [N], entropy H[π(·|s)] [N])."""
        dist = self.action_dist(obs)
        return dist.logp(actions), dist.entropy()


class SessionNoise(ConnectorV2):
    """Env-to-module piece for session-level exploration: one ε ~ N(0, I_{K−1}) per episode (drawn
    from torch's seeded RNG at the episode's first step, kept in ``episode.custom_data``), added to
    the exploration batch as ``SESSION_NOISE``; nothing at inference."""

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs):
        if not explore:
            return batch
        dim = rl_module.action_space.shape[0] - 1
        for episode in self.single_agent_episode_iterator(episodes):
            if SESSION_NOISE not in episode.custom_data:
                episode.custom_data[SESSION_NOISE] = torch.randn(dim).numpy()
            self.add_batch_item(batch, SESSION_NOISE, episode.custom_data[SESSION_NOISE], single_agent_episode=episode)
        return batch
