"""Do no harm: per λ, deploy the personalised π_λ only where held-out logs show it beats the best
global weight vector g_λ at that λ; everywhere else serve g_λ.

With r_λ = λ·r₁/σ₁ + (1 − λ)·r₂/σ₂ (the scalarisation π_λ maximises; σ_k from the training logs),

    Δ̂_λ = V̂_λ(π_λ) − V̂_λ(g_λ)        paired reward at hit on held-out users' logs (ope.RewardAtHit.difference),
    deploy π_λ  iff  Δ̂_λ − z·se(Δ̂_λ) > 0      z = Φ⁻¹(level), one-sided; se clustered by user,
    else g_λ

so the deployed policy at λ is never significantly worse than g_λ: π_λ is kept only when its lower
confidence bound beats g_λ. g_λ is chosen on the *training* logs, so the held-out logs judge both
policies fresh: by the agent's own model (``model_global_actions``: the action with the best mean
Q̂ over the training states; every request informs every action) or by reward at hit per action
(``best_global_actions``: only the ~N/|A| requests that logged the action). The learning test
(benchmarks/results/learning_utility_agent.md) measures both against the oracle; the model's is the
default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .ope import RewardAtHit

PERSONALISED, GLOBAL = "personalised", "global"
GLOBAL_CHOICES = ("model", "logs")  # how g_λ is picked on the training logs: mean Q̂, or reward at hit


def scalarised_rewards(rewards: np.ndarray, lam: float, scale: np.ndarray) -> np.ndarray:
    """r_λ = λ·r₁/σ₁ + (1 − λ)·r₂/σ₂ per request [N] (rewards [N, 2] in OBJECTIVES order)."""
    r = np.asarray(rewards, np.float64)
    return lam * r[:, 0] / max(float(scale[0]), 1e-12) + (1 - lam) * r[:, 1] / max(float(scale[1]), 1e-12)


def best_global_actions(logs: dict, n_actions: int, lambdas: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """g_λ = argmax_a V̂_λ(a) by reward at hit on ``logs`` (as_arrays columns), for every λ → [L]."""
    est = RewardAtHit()
    values = np.array(
        [
            est.estimate(logs["action"], logs["propensity"], logs["rewards"], np.full(len(logs["action"]), a)).value
            for a in range(n_actions)
        ]
    )  # [A, 2]
    return np.array([scalarised_rewards(values, lam, scale).argmax() for lam in np.asarray(lambdas, np.float64)])


def model_global_actions(scores: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """g_λ by the agent's own model: argmax_a (1/N) Σ_i λ·Q̃₁(s_i, a) + (1 − λ)·Q̃₂(s_i, a) over
    logged states (scores [N, A, 2]) → [L]. Every request informs every action's value (the action
    is an input of the Q network), where reward at hit sees only the ~N/|A| requests that logged it."""
    mean = scores.mean(axis=0)  # [A, 2]
    lam = np.asarray(lambdas, np.float64)[:, None]
    return (lam * mean[None, :, 0] + (1 - lam) * mean[None, :, 1]).argmax(axis=1)


@dataclass(frozen=True)
class DoNoHarm:
    """The per-λ choice between π_λ and g_λ (module docstring). ``level``: one-sided confidence that
    a deployed π_λ beats g_λ (0.95: z = 1.645)."""

    level: float = 0.95

    def __post_init__(self) -> None:
        if not 0.5 <= self.level < 1.0:
            raise ValueError(f"DoNoHarm level must be in [0.5, 1), got {self.level}")

    @property
    def z(self) -> float:
        return float(stats.norm.ppf(self.level))

    def decide(
        self,
        logs: dict,
        policy_actions: np.ndarray,
        global_actions: np.ndarray,
        lambdas: np.ndarray,
        scale: np.ndarray,
    ) -> list[dict]:
        """One decision per λ: logs = held-out as_arrays columns, policy_actions [L, N] = π_λ on
        them, global_actions [L] = g_λ. Each decision: lambda, deployed (personalised | global),
        global_action, lift (Δ̂_λ, σ units), lift_se, lower_bound, hits, reason."""
        est, out = RewardAtHit(), []
        n = len(logs["action"])
        for lam, pi, g in zip(np.asarray(lambdas, float), np.asarray(policy_actions), np.asarray(global_actions)):
            r = scalarised_rewards(logs["rewards"], lam, scale)[:, None]
            d, se = est.difference(logs["action"], logs["propensity"], r, pi, np.full(n, g), logs["user_id"])
            d, se = float(d[0]), float(se[0])
            lower = d - self.z * se
            if np.all(pi == g):
                keep, reason = False, "π_λ serves g_λ to every held-out request"
            elif not np.isfinite(lower):
                keep, reason = False, "π_λ or g_λ has no hit on the held-out logs: no evidence of a gain"
            elif lower > 0:
                keep, reason = True, f"held-out logs support a gain over g_λ: Δ̂ {d:+.4f}, lower bound {lower:+.4f} > 0"
            else:
                keep, reason = False, f"no significant gain over g_λ: Δ̂ {d:+.4f}, lower bound {lower:+.4f} ≤ 0"
            out.append(
                {
                    "lambda": float(lam),
                    "deployed": PERSONALISED if keep else GLOBAL,
                    "global_action": int(g),
                    "lift": d,
                    "lift_se": se,
                    "lower_bound": lower,
                    "level": self.level,
                    "hits": int((logs["action"] == pi).sum()),
                    "reason": reason,
                }
            )
        return out


def deployed_actions(decisions: list[dict], policy_actions: np.ndarray) -> np.ndarray:
    """The deployed policy's actions [L, N]: π_λ where kept, g_λ elsewhere."""
    acts = np.array(policy_actions, copy=True)
    for li, dec in enumerate(decisions):
        if dec["deployed"] == GLOBAL:
            acts[li] = dec["global_action"]
    return acts
