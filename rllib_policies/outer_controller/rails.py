"""Deployment rails around a trained ranking policy: evaluation on the simulator, shadow mode, and
the inner-reward weights the outer controller hands to the inner-reward service.

evaluate            the policy's mean action served to n simulated sessions → SessionSummary
ShadowLog/shadow    the live policy serves; a candidate ranks the same requests beside it; its
                    actions and counterfactual rewards are logged, its slates never served
fit_inner_reward_weights   ridge fit of the credited KPI per step onto the inner reward's
                    features (clicks, Σ ln(1+dwell), skips, Σ relevance) → click_w, dwell_w,
                    skip_penalty, rel_w
push_inner_reward_weights  PUT them to the inner-reward service's /weights
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import numpy as np
import torch

from actors.cascade import build_world
from actors.simulate import SessionSummary, SlatePolicy, inner_rewards, run_sessions
from actors.world import seed_sequence

INNER_REWARD_FIELDS = ("click_w", "dwell_w", "skip_penalty", "rel_w")


def ranking_policy(module) -> SlatePolicy:
    """The module's mean action μ(s) as the ranking weights of each request (no exploration)."""

    def policy(world, pipeline, req, rng):
        with torch.no_grad():
            mean, _ = module.gaussian(torch.as_tensor(pipeline.context(req)))
        return pipeline.recommend(req, {"ranking": mean.numpy()}).slate

    return policy


def evaluate(
    module, env_config: dict, n_sessions: int = 300, seed: int = 10_007, name: str = "policy"
) -> SessionSummary:
    """Serve μ(s) to ``n_sessions`` simulated sessions (same users and draws for the same seed/name)."""
    world, pipeline = build_world(env_config)
    return run_sessions(world, pipeline, ranking_policy(module), n_sessions, seed, name)


@dataclass
class ShadowLog:
    """Per request: both policies' actions and both slates' inner rewards (the candidate's is
    counterfactual: the same users' responses to its slate, drawn from a separate stream)."""

    live_actions: list = field(default_factory=list)
    candidate_actions: list = field(default_factory=list)
    live_reward: list = field(default_factory=list)
    candidate_reward: list = field(default_factory=list)
    served_slates: list = field(default_factory=list)

    def summary(self) -> dict:
        q = (0.1, 0.5, 0.9)
        live, cand = np.concatenate(self.live_reward), np.concatenate(self.candidate_reward)
        return {
            "requests": len(live),
            "live_reward_mean": float(live.mean()),
            "candidate_reward_mean": float(cand.mean()),
            "live_reward_quantiles": np.quantile(live, q).tolist(),
            "candidate_reward_quantiles": np.quantile(cand, q).tolist(),
            "candidate_action_mean": np.concatenate(self.candidate_actions).mean(axis=0).tolist(),
            "live_action_mean": np.concatenate(self.live_actions).mean(axis=0).tolist(),
        }


def shadow(live_module, candidate_module, log: ShadowLog, seed: int = 0) -> SlatePolicy:
    """A slate policy that serves ``live_module`` and logs ``candidate_module`` beside it."""
    cand_rng, live_rng = seed_sequence(seed, "shadow-candidate"), seed_sequence(seed, "shadow-live")

    def policy(world, pipeline, req, rng):
        obs = torch.as_tensor(pipeline.context(req))
        with torch.no_grad():
            live_w = live_module.gaussian(obs)[0].numpy()
            cand_w = candidate_module.gaussian(obs)[0].numpy()
        live = pipeline.recommend(req, {"ranking": live_w})
        cand = pipeline.recommend(req, {"ranking": cand_w})
        # both slates scored the same way, on draws apart from the served session's (never served:
        # world.respond changes no session state)
        log.live_reward.append(
            inner_rewards(pipeline.ctx, req.user, live.slate, world.respond(req.user, live.slate, live_rng))[1]
        )
        log.candidate_reward.append(
            inner_rewards(pipeline.ctx, req.user, cand.slate, world.respond(req.user, cand.slate, cand_rng))[1]
        )
        log.live_actions.append(live_w)
        log.candidate_actions.append(cand_w)
        log.served_slates.append(live.slate)
        return live.slate

    return policy


def run_shadow(
    live_module, candidate_module, env_config: dict, n_sessions: int = 200, seed: int = 0
) -> tuple[SessionSummary, ShadowLog]:
    """Simulated sessions served by ``live_module`` with ``candidate_module`` in shadow."""
    world, pipeline = build_world(env_config)
    log = ShadowLog()
    summary = run_sessions(world, pipeline, shadow(live_module, candidate_module, log, seed), n_sessions, seed, "live")
    return summary, log


def fit_inner_reward_weights(features: np.ndarray, credited_kpi: np.ndarray, ridge: float = 1e-2) -> dict[str, float]:
    """w = argmin ‖F·w − c‖² + λ‖w‖² with F [N, 4] the per-step inner-reward features and c [N]
    the credited KPI of each step: the inner reward that best tracks the outer controller's credit."""
    f = np.asarray(features, np.float64)
    c = np.asarray(credited_kpi, np.float64)
    if f.ndim != 2 or f.shape[1] != 4 or len(f) != len(c):
        raise ValueError(f"features must be [N, 4] and credited_kpi [N], got {f.shape} and {c.shape}")
    scale = f.std(axis=0) + 1e-8
    w = np.linalg.solve((f / scale).T @ (f / scale) + ridge * len(f) * np.eye(4), (f / scale).T @ c) / scale
    return dict(zip(INNER_REWARD_FIELDS, np.clip(w, -1e6, 1e6).round(6).tolist()))


class GateRejected(ValueError):
    """A candidate the gate refused: nothing was pushed, the live version stays."""


# the kernel's reward_i = click_w·clicked + dwell_w·ln(1 + dwell) + skip_penalty·skipped + rel_w·relevance:
# a click, watch time and relevance are rewarded, a skip is penalised
INNER_REWARD_SIGNS = {"click_w": 1, "dwell_w": 1, "skip_penalty": -1, "rel_w": 1}


@dataclass(frozen=True)
class InnerRewardBounds:
    """The parameter gate for inner-reward weights: each weight has its sign (INNER_REWARD_SIGNS; 0 allowed)
    and |w| ≤ ``max_abs``.

    Args:
        max_abs: the largest magnitude a weight may take (the defaults are O(1)).
    """

    max_abs: float = 10.0

    def violations(self, weights: dict[str, float]) -> list[str]:
        """What is out of bounds, one phrase per weight (empty: the candidate passes)."""
        out = []
        for name, sign in INNER_REWARD_SIGNS.items():
            w = float(weights[name])
            if not np.isfinite(w) or abs(w) > self.max_abs:
                out.append(f"{name} {w:+.3f} outside ±{self.max_abs:g}")
            elif w * sign < 0:
                out.append(f"{name} {w:+.3f} must be {'≥' if sign > 0 else '≤'} 0")
        return out


def push_inner_reward_weights(
    url: str,
    weights: dict[str, float],
    expected_version: int | None = None,
    timeout_s: float = 30.0,
    bounds: InnerRewardBounds | None = InnerRewardBounds(),  # noqa: B008 (frozen: one shared default is safe)
) -> dict:
    """Gate, then PUT the weights to ``{url}/weights``; returns the service's new state (version, weights).
    Raises GateRejected (nothing pushed) when ``bounds`` finds a weight out of bounds (None: no gate), and
    RuntimeError with the service's message on a 4xx/5xx (e.g. 409 on a stale version)."""
    problems = [] if bounds is None else bounds.violations(weights)
    if problems:
        raise GateRejected("; ".join(problems))
    body = {k: float(weights[k]) for k in INNER_REWARD_FIELDS}
    if expected_version is not None:
        body["expected_version"] = int(expected_version)
    r = httpx.put(f"{url.rstrip('/')}/weights", json=body, timeout=timeout_s)
    if r.status_code >= 400:
        raise RuntimeError(f"PUT {url}/weights → {r.status_code}: {r.text}")
    return r.json()
