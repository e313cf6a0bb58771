"""The UNEX-RL learner: one TD-trained global critic and the three stage policies, updated together.

Per minibatch of transitions (one request each: o_1 as the raw request, the three stage actions,
the rescaled reward r̃, the next request):

critic          y = r̃ + γ·(1 − done)·Q'_g(o'_1, a'_1, a'_2, a'_3),   a'_k = μ'_k(o'_k)
                L_Q = mean (Q_g(o_1, a_1, a_2, a_3) − y)²
stage policies  ã_k = μ_k(o_k),  L_μ = −mean Q_g(o_1, ã_1, ã_2, ã_3)   (critic frozen; the actor loss)
                + β·mean ‖ã − a*‖²  with ``search_candidates`` > 1 (a* = the critic's best of the candidates
                ã, ã + σ·ε_j: ``search_action``; actions scaled to [0, 1], β = ``search_weight``)
                + λ·Σ_k mean Σ_j relu(|z_kj| − logit(1 − m))²  (``saturation_penalty`` λ, ``action_margin`` m;
                z_k the pre-squash outputs, μ_k = a_max·sigmoid(z_k): keeps the policies off the box's faces)
targets         θ' ← τ·θ + (1 − τ)·θ' after every update (RLlib's TargetNetworkAPI + update_target_network)

Twin critics (``twin_q``, TD3's clipped double-Q): y = r̃ + γ·(1 − done)·min_h Q'^h, both heads
regress on y, the actors ascend Q^1. Step bound (``max_action_step``): after every update each
learning stage's deterministic action may have moved at most δ (a fraction of its range, mean over
the minibatch) from where it stood at the iteration's start; a longer step is shortened towards the
start (``UnexRLLearner.bound_action_step``), as the outer controller backtracks its KL trust region.

CIC on: o'_k and the policies' o_k are rebuilt from o_1 and the *current* upstream actions by
replaying the cascade (cic.stage_observations); off: the buffer's stored o_k (stale: produced under
the behaviour actions). SG on: the upstream actions inside o_k are detached, so ∂L/∂θ_1 flows only
through a_1's own input to the critic, not through ã_2, ã_3. Independent arm: one critic per stage,
Q_k(o_k, a_k), each stage policy against its own critic, stored observations.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.learner.utils import update_target_network
from ray.rllib.core.rl_module.apis import TargetNetworkAPI

from actors.cascade import Pipeline, build_world
from actors.stages import STAGE_ACTION_HIGH, STAGES, RequestBatch

from .cic import stage_observations
from .modules import MAX_ACTION_DIM
from .sampler import REQUEST_FIELDS

CRITIC = "global_critic"


def requests_from(batch, prefix: str = "") -> RequestBatch:
    """The raw requests of a learner batch (``next_`` prefix: the next requests)."""
    return RequestBatch(*(batch[f"{prefix}{f}"].cpu().numpy() for f in REQUEST_FIELDS))


def rebuild(
    pipeline: Pipeline,
    req: RequestBatch,
    context: torch.Tensor,
    actions: dict[str, torch.Tensor],
    upto: str,
    stop_gradient: bool,
    cache: dict | None = None,
) -> torch.Tensor:
    """CIC with a differentiable tail: o_k = [context, summary(replayed candidates), a_{<k}/a_max], the
    replay (NumPy, exact) driven by the detached actions, the upstream-action columns
    (``spec.upstream_offsets``) kept in the graph unless ``stop_gradient``. ``cache`` carries
    matching's candidates from o_2's replay to o_3's."""
    np_actions = {s: a.detach().cpu().numpy() for s, a in actions.items()}
    cache = {} if cache is None else cache
    obs, replay = stage_observations(
        pipeline, req, np_actions, upto, context.detach().cpu().numpy(), cache.get("matched")
    )
    cache["matched"] = replay.matched
    o = torch.as_tensor(obs[upto], device=context.device)
    offsets = pipeline.spec.upstream_offsets(upto)
    if not offsets:
        return o
    feats = [(actions[s].detach() if stop_gradient else actions[s]) / _high(s, o) for s in offsets]
    start, stop = pipeline.spec.slices["upstream"].start, max(sl.stop for sl in offsets.values())
    return torch.cat([o[:, :start], *feats, o[:, stop:]], dim=-1)


def _high(stage: str, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(STAGE_ACTION_HIGH[stage], device=like.device)


class UnexRLLearner(TorchLearner):
    def build(self) -> None:
        super().build()
        # the target networks μ'_k, Q'_g, made where RLlib's own learners make them (after the optimizers)
        self.module.foreach_module(
            lambda _, module: module.make_target_networks() if isinstance(module, TargetNetworkAPI) else None
        )
        self.pipeline = build_world(self.config.env_config)[1]

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        """Adam per module: the critic at ``lr``, the stage policies at ``actor_lr``."""
        params = self.get_parameters(self._module[module_id])
        lr = config.actor_lr if module_id in STAGES else config.lr
        self.register_optimizer(
            module_id=module_id, optimizer=torch.optim.Adam(params), params=params, lr_or_lr_schedule=lr
        )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):  # all losses: compute_losses
        raise NotImplementedError

    def compute_losses(self, *, fwd_out, batch):
        b, cfg = batch[CRITIC], self.config
        policies = {s: self.module[s].unwrapped() for s in STAGES}
        critic = self.module[CRITIC].unwrapped()
        ctx, next_ctx = b["context"], b["next_context"]
        stored = {s: b[f"obs_{s}"] for s in STAGES}
        next_stored = {s: b[f"next_obs_{s}"] for s in STAGES}
        acts = {s: b[f"act_{s}"] for s in STAGES}
        scaled = lambda a: torch.cat([a[s] / policies[s].high for s in STAGES], dim=-1)  # noqa: E731
        independent = critic.n_critics > 1
        search_std = {s: cfg.explore_std_of(s) if cfg.search_std is None else cfg.search_std for s in STAGES}
        search_args, logits = (cfg.action_margin, cfg.search_rounds), {}

        # ---------------------------------------------------------------- critic (TD)
        with torch.no_grad():
            if independent:
                nxt = [
                    critic.target_value(
                        next_stored[s], _pad(policies[s].act(next_stored[s], True) / policies[s].high), i
                    )
                    for i, s in enumerate(STAGES)
                ]
            else:
                target_actions = cascade(
                    self.pipeline,
                    policies,
                    next_stored,
                    next_ctx,
                    requests_from(b, "next_"),
                    target=True,
                    cic=cfg.cic,
                    stop_gradient=True,
                    trainable=cfg.trainable_stages,
                )
                nxt = [critic.target_value(next_stored["matching"], scaled(target_actions), 0)]
            not_done = 1.0 - b["done"].float()
            ys = [b["reward"] + cfg.gamma * not_done * q for q in nxt]
        if independent:
            qs = [critic.values(stored[s], _pad(acts[s] / policies[s].high), i) for i, s in enumerate(STAGES)]
        else:
            qs = [critic.values(stored["matching"], scaled(acts), 0)]
        critic_loss = sum(torch.mean((q - y) ** 2) for heads, y in zip(qs, ys) for q in heads)
        if cfg.max_action_step is not None and bool(b["anchor"][0] > 0):  # the iteration's first minibatch
            self._anchor = {s: copy.deepcopy(policies[s].pi.state_dict()) for s in cfg.trainable_stages}
        self._anchor_obs = {s: stored[s].detach() for s in STAGES}

        # ---------------------------------------------------------------- stage policies (critic frozen)
        critic.q.requires_grad_(False)
        try:
            if not bool(b["actor_on"][0] > 0):  # critic warm-up / policy delay: no policy step on this minibatch
                actor_loss = torch.zeros((), device=ctx.device)
            elif independent:
                actor_loss = torch.zeros((), device=ctx.device)
                for i, s in enumerate(STAGES):
                    if s not in cfg.trainable_stages:
                        continue
                    z = policies[s].logits(stored[s])
                    own = torch.sigmoid(z)
                    actor_loss = actor_loss - critic.value(stored[s], _pad(own), i).mean()
                    if cfg.saturation_penalty > 0:
                        actor_loss = actor_loss + cfg.saturation_penalty * saturation(z, cfg.action_margin).mean()
                    if cfg.search_candidates > 1:
                        q_of = lambda a, i=i, s=s: critic.value(  # noqa: E731
                            stored[s].repeat_interleave(cfg.search_candidates, 0), _pad(a), i
                        )
                        best = search_action(
                            q_of, own.detach(), search_std[s], None, cfg.search_candidates, *search_args
                        )
                        actor_loss = actor_loss + cfg.search_weight * ((own - best) ** 2).sum(-1).mean()
            else:
                new = cascade(
                    self.pipeline,
                    policies,
                    stored,
                    ctx,
                    requests_from(b),
                    target=False,
                    cic=cfg.cic,
                    stop_gradient=cfg.stop_gradient,
                    trainable=cfg.trainable_stages,
                    logits=logits,
                )
                joint = scaled(new)
                actor_loss = -critic.value(stored["matching"], joint, 0).mean()
                if cfg.saturation_penalty > 0:
                    penalty = sum(saturation(z, cfg.action_margin).mean() for z in logits.values())
                    actor_loss = actor_loss + cfg.saturation_penalty * penalty
                if cfg.search_candidates > 1:
                    free = torch.cat(  # σ on the learning stages' dimensions, 0 on the frozen ones'
                        [torch.full_like(policies[s].high, search_std[s] * (s in cfg.trainable_stages)) for s in STAGES]
                    )
                    q_of = lambda a: critic.value(  # noqa: E731
                        stored["matching"].repeat_interleave(cfg.search_candidates, 0), a, 0
                    )
                    best = search_action(q_of, joint.detach(), 1.0, free, cfg.search_candidates, *search_args)
                    actor_loss = actor_loss + cfg.search_weight * ((joint - best) ** 2).sum(-1).mean()
        finally:
            critic.q.requires_grad_(True)
        metrics = {
            "critic_loss": critic_loss.item(),
            "actor_loss": float(actor_loss.detach()),
            "q_mean": qs[0][0].mean().item(),
            "reward_mean": b["reward"].mean().item(),
        }
        self.metrics.log_dict(metrics, key=CRITIC, window=1)
        # one entry: the critic and the three stage policies are optimised from this sum (their parameter
        # sets are disjoint: the critic is frozen in the actor term, the policies are absent from the TD term)
        return {CRITIC: critic_loss + actor_loss}

    def compute_gradients(self, loss_per_module, **kwargs):
        """With several learners, only the critic runs through its DDP wrapper's forward, so DDP
        averages only the critic's gradients: average the stage policies' here (all-reduce), or each
        learner would train its own policies on its own shard."""
        grads = super().compute_gradients(loss_per_module, **kwargs)
        if self.config.num_learners > 1 and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            for s in STAGES:
                for p in self.module[s].unwrapped().pi.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
        return grads

    def after_gradient_based_update(self, *, timesteps) -> None:
        """The step bound (``bound_action_step``), then θ' ← τ·θ + (1 − τ)·θ' for every (main, target)
        pair of the modules (RLlib's Polyak update)."""
        if self.config.max_action_step is not None and getattr(self, "_anchor", None):
            self.metrics.log_value((CRITIC, "action_step"), self.bound_action_step(), window=1)
        super().after_gradient_based_update(timesteps=timesteps)
        for module in self.module.foreach_module(lambda _, module: module):
            if isinstance(module, TargetNetworkAPI):
                for main, target in module.get_target_network_pairs():
                    update_target_network(main_net=main, target_net=target, tau=self.config.tau)

    def bound_action_step(self) -> float:
        """The per-iteration step bound of the stage policies: for each learning stage k, with θ_a its
        parameters at the iteration's start and the minibatch's observations o,

            d_k(θ) = max_j mean_o |μ_θ(o)_j − μ_θa(o)_j| / a_max,j  ≤  δ = ``max_action_step``,

        else θ ← θ_a + c·(θ − θ_a), c = 0.99·δ/d_k first, then halved until inside (0 after 8
        halvings). With several learners d_k is the max over them (the policies stay identical).
        Returns the largest d_k after the bound."""
        steps = [
            _bound_step(self.module[s].unwrapped(), anchor, self._anchor_obs[s], self.config.max_action_step)
            for s, anchor in self._anchor.items()
        ]
        return max(steps, default=0.0)


@torch.no_grad()
def _bound_step(policy, anchor: dict, obs: torch.Tensor, delta: float) -> float:
    """One stage's step bound (``UnexRLLearner.bound_action_step``); returns d after the bound."""
    theta = {k: v.clone() for k, v in policy.pi.state_dict().items()}
    moved = policy.act(obs)
    policy.pi.load_state_dict(anchor)
    start = policy.act(obs)

    def dist_of(actions: torch.Tensor) -> float:
        return float(_global_max(((actions - start).abs().mean(dim=0) / policy.high).max()))

    def step(c: float) -> float:
        policy.pi.load_state_dict({k: anchor[k] + c * (theta[k] - anchor[k]) for k in theta})
        return dist_of(policy.act(obs))

    d = dist_of(moved)
    if d <= delta:
        policy.pi.load_state_dict(theta)
        return d
    c = 0.99 * delta / d
    d = step(c)
    for _ in range(8):
        if d <= delta:
            return d
        c /= 2
        d = step(c)
    return d if d <= delta else step(0.0)


def _global_max(x: torch.Tensor) -> torch.Tensor:
    """max over the learners (itself with one learner)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def cascade(
    pipeline: Pipeline,
    policies: dict,
    stored: dict,
    context: torch.Tensor,
    req: RequestBatch,
    target: bool,
    cic: bool,
    stop_gradient: bool,
    trainable=STAGES,
    logits: dict | None = None,
) -> dict:
    """ã_k = μ_k(o_k) (μ'_k if ``target``) for the three stages in order; o_k rebuilt by CIC from o_1
    and ã_{<k}, or (CIC off) the buffer's o_k, produced under the behaviour actions. Frozen stages'
    actions are detached. ``logits`` (a dict) receives the learning stages' pre-squash outputs z_k."""
    out, cache = {}, {}
    for s in STAGES:
        if s == "matching" or not cic:
            o = stored[s]
        else:
            o = rebuild(pipeline, req, context, dict(out), s, stop_gradient, cache)
        z = policies[s].logits(o, target)
        out[s] = policies[s].high * torch.sigmoid(z)
        if s not in trainable:
            out[s] = out[s].detach()
        elif logits is not None:
            logits[s] = z
    return out


@torch.no_grad()
def search_action(
    q_of, base: torch.Tensor, std: float, free: torch.Tensor | None, k: int, margin: float = 0.0, rounds: int = 1
) -> torch.Tensor:
    """The critic-guided action search: per row, the best of k candidates by the critic,

        a* = argmax_{c ∈ {ã, clip(ã + σ·ε_2), …, clip(ã + σ·ε_k)}} Q̂(o, c),   ε_j ~ N(0, I),

    actions scaled to [0, 1] (σ a fraction of each action's range, the exploration's), clipped to
    [m, 1 − m] (m = ``margin``: a* off the box's faces, where the sigmoid policies saturate), the noise
    scaled per dimension by ``free`` (0: a frozen stage's; None: 1 everywhere). ``rounds`` > 1 repeats
    the search around the best so far (a random walk uphill on Q̂, reach ≈ σ·√rounds). ``q_of`` maps
    [B·k, D] candidates (row-major: each row's k in turn) to Q̂ [B·k]. A step towards a* sees the
    critic's shape within the explored region, where the deterministic policy gradient ∇_a Q̂ sees only
    its slope at ã (flat on a plateau such as a starved matching stage's). Returns a* [B, D]."""
    b, d = base.shape
    rows = torch.arange(b, device=base.device)
    best = base
    for _ in range(max(rounds, 1)):
        noise = std * torch.randn(b, k, d, device=base.device, dtype=base.dtype)
        if free is not None:
            noise = noise * free
        noise[:, 0] = 0.0
        candidates = best.unsqueeze(1) + noise
        candidates[:, 1:] = candidates[:, 1:].clamp(margin, 1.0 - margin)
        q = q_of(candidates.reshape(b * k, d)).reshape(b, k)
        best = candidates[rows, q.argmax(dim=1)]
    return best


def saturation(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """The pre-squash penalty of a sigmoid policy, per row: Σ_j relu(|z_j| − z_m)², z_m = logit(1 − m)
    (0 while every action stays inside [m, 1 − m] of its range; grows where the policy saturates)."""
    z_m = math.log((1.0 - margin) / margin)
    return (torch.relu(logits.abs() - z_m) ** 2).sum(-1)


def _pad(a: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(a, (0, MAX_ACTION_DIM - a.shape[-1]))
