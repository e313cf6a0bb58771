"""The UNEX-RL learner: one TD-trained global critic and the three stage actors, updated together.

Per minibatch of transitions (one request each: o_1 as the raw request, the three stage actions,
the rescaled reward r̃, the next request):

critic   y = r̃ + γ·(1 − done)·Q'_g(o'_1, a'_1, a'_2, a'_3),   a'_k = μ'_k(o'_k)
         L_Q = mean (Q_g(o_1, a_1, a_2, a_3) − y)²
actors   ã_k = μ_k(o_k),  L_μ = −mean Q_g(o_1, ã_1, ã_2, ã_3)   (critic frozen)

CIC on: o'_k and the actors' o_k are rebuilt from o_1 and the *current* upstream actions by replaying
matching / pre-ranking (cic.stage_observations); off: the buffer's stored o_k (stale: produced under
the behaviour actions). SG on: the upstream actions inside o_k are detached, so ∂L/∂θ_1 flows only
through a_1's own input to the critic, not through ã_2, ã_3. Independent arm: one critic per stage,
Q_k(o_k, a_k), each actor against its own critic, stored observations.
"""

from __future__ import annotations

import torch
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from rllib_policies.envs import build_world

from .cic import STAGES, UPSTREAM_DIM, Requests, stage_observations
from .modules import MAX_ACTION_DIM, polyak

CRITIC = "global_critic"
REQUEST_FIELDS = ("user", "history", "step", "clicks", "request_id")


def requests_from(batch, prefix: str = "") -> Requests:
    return Requests(*(batch[f"{prefix}{f}"].cpu().numpy() for f in REQUEST_FIELDS))


def rebuild(pipeline, req: Requests, context: torch.Tensor, actions: dict[str, torch.Tensor], upto: str,
            stop_gradient: bool, cache: dict | None = None) -> torch.Tensor:
    """CIC with a differentiable tail: o_k = [context, summary(replayed candidates), a_{<k}/a_max], the
    replay (NumPy, exact) driven by the detached actions, the action features kept in the graph
    unless ``stop_gradient``. ``cache`` carries matching's candidates from o_2's replay to o_3's."""
    np_actions = {s: a.detach().cpu().numpy() for s, a in actions.items()}
    cache = {} if cache is None else cache
    obs, cand = stage_observations(pipeline, req, np_actions, upto, context.detach().cpu().numpy(), cache.get("matched"))
    cache["matched"] = cand.get("pre_ranking")
    o = torch.as_tensor(obs[upto], device=context.device)
    n_up = o.shape[1] - UPSTREAM_DIM
    feats = [(a.detach() if stop_gradient else a) / _high(s, a) for s, a in actions.items() if s != upto]
    if not feats:
        return o
    up = torch.cat(feats, dim=-1)
    return torch.cat([o[:, :n_up], up, o[:, n_up + up.shape[1]:]], dim=-1)


def _high(stage: str, like: torch.Tensor) -> torch.Tensor:
    from rllib_policies.envs import STAGE_ACTION_HIGH

    return torch.as_tensor(STAGE_ACTION_HIGH[stage], device=like.device)


class UnexRLLearner(TorchLearner):
    def build(self) -> None:
        super().build()
        self._pipeline = build_world(self.config.env_config)[1]

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        """Adam per module: the critic at ``lr``, the stage actors at ``actor_lr``."""
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.Adam(params), params=params,
                                lr_or_lr_schedule=config.actor_lr if module_id in STAGES else config.lr)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):   # all losses: compute_losses
        raise NotImplementedError

    def compute_losses(self, *, fwd_out, batch):
        b, cfg = batch[CRITIC], self.config
        actors = {s: self.module[s].unwrapped() for s in STAGES}
        critic = self.module[CRITIC].unwrapped()
        ctx, next_ctx = b["context"], b["next_context"]
        stored = {s: b[f"obs_{s}"] for s in STAGES}
        next_stored = {s: b[f"next_obs_{s}"] for s in STAGES}
        acts = {s: b[f"act_{s}"] for s in STAGES}
        scaled = lambda a: torch.cat([a[s] / actors[s].high for s in STAGES], dim=-1)  # noqa: E731
        independent = critic.n_critics > 1

        # ---------------------------------------------------------------- critic (TD)
        with torch.no_grad():
            if independent:
                nxt = [critic.value(next_stored[s], _pad(actors[s].act(next_stored[s], True) / actors[s].high), i, True)
                       for i, s in enumerate(STAGES)]
            else:
                target_actions = cascade(self._pipeline, actors, next_stored, next_ctx, requests_from(b, "next_"),
                                         target=True, cic=cfg.cic, stop_gradient=True, trainable=cfg.trainable_stages)
                nxt = [critic.value(next_stored["matching"], scaled(target_actions), 0, True)]
            not_done = 1.0 - b["done"].float()
            ys = [b["reward"] + cfg.gamma * not_done * q for q in nxt]
        if independent:
            qs = [critic.value(stored[s], _pad(acts[s] / actors[s].high), i) for i, s in enumerate(STAGES)]
        else:
            qs = [critic.value(stored["matching"], scaled(acts), 0)]
        critic_loss = sum(torch.mean((q - y) ** 2) for q, y in zip(qs, ys))

        # ---------------------------------------------------------------- actors (critic frozen)
        critic.q.requires_grad_(False)
        try:
            if not bool(b["actor_on"][0] > 0):   # critic warm-up / policy delay: no actor step on this minibatch
                actor_loss = torch.zeros((), device=ctx.device)
            elif independent:
                actor_loss = -sum(critic.value(stored[s], _pad(actors[s].act(stored[s]) / actors[s].high), i).mean()
                                  for i, s in enumerate(STAGES) if s in cfg.trainable_stages)
            else:
                new = cascade(self._pipeline, actors, stored, ctx, requests_from(b), target=False, cic=cfg.cic,
                              stop_gradient=cfg.stop_gradient, trainable=cfg.trainable_stages)
                actor_loss = -critic.value(stored["matching"], scaled(new), 0).mean()
        finally:
            critic.q.requires_grad_(True)
        self.metrics.log_dict({"critic_loss": critic_loss.item(), "actor_loss": float(actor_loss.detach()) if torch.is_tensor(actor_loss) else float(actor_loss),
                               "q_mean": qs[0].mean().item(), "reward_mean": b["reward"].mean().item()},
                              key=CRITIC, window=1)
        # one entry: the critic and the three actors are optimised from this sum (their parameter sets
        # are disjoint: the critic is frozen in the actor term, the actors are absent from the TD term)
        return {CRITIC: critic_loss + actor_loss}

    def compute_gradients(self, loss_per_module, **kwargs):
        """With several learners, only the critic runs through its DDP wrapper's forward, so DDP
        averages only the critic's gradients: average the actors' here (all-reduce), or each
        learner would train its own actors on its own shard."""
        grads = super().compute_gradients(loss_per_module, **kwargs)
        import torch.distributed as dist

        if self.config.num_learners > 1 and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            for s in STAGES:
                for p in self.module[s].unwrapped().pi.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
        return grads

    def after_gradient_based_update(self, *, timesteps) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        tau = self.config.tau
        for s in STAGES:
            m = self.module[s].unwrapped()
            polyak(m.target_pi, m.pi, tau)
        critic = self.module[CRITIC].unwrapped()
        polyak(critic.target_q, critic.q, tau)


def cascade(pipeline, actors: dict, stored: dict, context: torch.Tensor, req: Requests, target: bool, cic: bool,
            stop_gradient: bool, trainable=STAGES) -> dict:
    """ã_k = μ_k(o_k) for the three stages in order; o_k rebuilt by CIC from o_1 and ã_{<k}, or (CIC
    off) the buffer's o_k, produced under the behaviour actions. Frozen stages' actions are detached."""
    out, cache = {}, {}
    for s in STAGES:
        o = stored[s] if s == "matching" or not cic else rebuild(pipeline, req, context, dict(out), s, stop_gradient, cache)
        out[s] = actors[s].act(o, target)
        if s not in trainable:
            out[s] = out[s].detach()
    return out


def _pad(a: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(a, (0, MAX_ACTION_DIM - a.shape[-1]))
