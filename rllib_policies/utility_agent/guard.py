"""Do no harm: per λ, deploy the personalised π_λ only where held-out logs show it beats the best
global weight vector g_λ at that λ; everywhere else serve g_λ.

With r_λ = λ·r₁/σ₁ + (1 − λ)·r₂/σ₂ (the scalarisation π_λ maximises; σ_k from the training logs),

    Δ̂_λ = V̂_λ(π_λ) − V̂_λ(g_λ)        paired reward at hit on held-out users' logs (ope.RewardAtHit.difference),
    deploy π_λ  iff  Δ̂_λ − z·se(Δ̂_λ) > 0      z = Φ⁻¹(level), one-sided; se clustered by user,
    else g_λ

so the deployed policy at λ is never significantly worse than g_λ: π_λ is kept only when its lower
confidence bound beats g_λ. With ``prior: myopic`` g_λ itself has passed the same test against the myopic
prior m_λ (``myopic_actions``: ranking by the λ-scalarised predicted rewards, what a practitioner sets without
learning; ``certified_globals``), m_λ serving where it did not — the chain m_λ → g_λ → π_λ, each step taken only
on held-out evidence. g_λ is chosen on the *training* logs, so the held-out logs judge both
policies fresh: by the agent's own model (``model_global_actions``: the action with the best mean
Q̂ over the training states; every request informs every action), by reward at hit per action
(``best_global_actions``: only the ~N/|A| requests that logged the action), or doubly robust
(``DoublyRobustGlobal``: the model's value plus each action's logged residual, optionally smoothed
over the grid and picked pessimistically against the model's choice). The learning test
(benchmarks/results/learning_utility_agent.md) measures every choice against the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .ope import RewardAtHit, cluster_sums

PERSONALISED, GLOBAL = "personalised", "global"
# how g_λ is picked on the training logs: mean Q̂, reward at hit, doubly robust (argmax, pessimistic
# against the model's choice, residuals smoothed over the grid: see DoublyRobustGlobal)
GLOBAL_CHOICES = ("model", "logs", "dr", "dr_lcb", "dr_smooth")
# what g_λ must beat on held-out logs before it is served: nothing, or the myopic prior m_λ (myopic_actions)
PRIORS = ("none", "myopic")


def scalarised_rewards(rewards: np.ndarray, lam: float, scale: np.ndarray) -> np.ndarray:
    """r_λ = λ·r₁/σ₁ + (1 − λ)·r₂/σ₂ per request [N] (rewards [N, 2] in OBJECTIVES order)."""
    r = np.asarray(rewards, np.float64)
    return lam * r[:, 0] / max(float(scale[0]), 1e-12) + (1 - lam) * r[:, 1] / max(float(scale[1]), 1e-12)


def argmax_allowed(values: np.ndarray, allowed=None) -> np.ndarray:
    """argmax over the last axis restricted to the ``allowed`` action indices (all by default): after
    adaptive exploration, g_λ and π_λ choose among the last round's survivors only."""
    v = np.asarray(values, np.float64)
    if allowed is None:
        return v.argmax(axis=-1)
    mask = np.full(v.shape[-1], -np.inf)
    mask[np.asarray(allowed, np.int64)] = 0.0
    return (v + mask).argmax(axis=-1)


def best_global_actions(logs: dict, n_actions: int, lambdas: np.ndarray, scale: np.ndarray, allowed=None) -> np.ndarray:
    """g_λ = argmax_{a ∈ allowed} V̂_λ(a) by reward at hit on ``logs`` (as_arrays columns), for every λ → [L]."""
    est = RewardAtHit()
    values = np.array(
        [
            est.estimate(logs["action"], logs["propensity"], logs["rewards"], np.full(len(logs["action"]), a)).value
            for a in range(n_actions)
        ]
    )  # [A, 2]
    per_lam = np.stack([scalarised_rewards(values, lam, scale) for lam in np.asarray(lambdas, np.float64)])
    return argmax_allowed(np.nan_to_num(per_lam, nan=-np.inf), allowed)


def model_global_actions(scores: np.ndarray, lambdas: np.ndarray, allowed=None) -> np.ndarray:
    """g_λ by the agent's own model: argmax_a (1/N) Σ_i λ·Q̃₁(s_i, a) + (1 − λ)·Q̃₂(s_i, a) over
    logged states (scores [N, A, 2]) → [L]. Every request informs every action's value (the action
    is an input of the Q network), where reward at hit sees only the ~N/|A| requests that logged it.
    ``allowed``: the action indices to choose from (all by default)."""
    return argmax_allowed(model_mean_values(scores, lambdas), allowed)


def model_mean_values(scores: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """The model's value of each global action at each λ, (1/N) Σ_i λ·Q̃₁(s_i, a) + (1 − λ)·Q̃₂(s_i, a)
    (scores [N, A, 2]) → [L, A]: what g_λ maximises and what adaptive exploration ranks survivors by."""
    mean = np.asarray(scores, np.float64).mean(axis=0)  # [A, 2]
    lam = np.asarray(lambdas, np.float64)[:, None]
    return lam * mean[None, :, 0] + (1 - lam) * mean[None, :, 1]


def scalarised_q(q: np.ndarray, lambdas: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Q̂_λ(s_i, a) = λ·Q̂₁/σ₁ + (1 − λ)·Q̂₂/σ₂ for every λ: q [N, A, 2] in reward units
    (UtilityQModule.q_values) → [L, N, A], on the scale of ``scalarised_rewards``."""
    s = np.maximum(np.asarray(scale, np.float64), 1e-12)
    lam = np.asarray(lambdas, np.float64)[:, None, None]
    q = np.asarray(q, np.float64)
    return lam * q[None, ..., 0] / s[0] + (1 - lam) * q[None, ..., 1] / s[1]


def _cluster_se(terms: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    """s.e. of the mean of per-row terms [N, ...], clustered: √(Σ_c (Σ_{i∈c} (t_i − t̄))²) / N."""
    centred = cluster_sums(terms - terms.mean(axis=0), clusters)
    return np.sqrt((centred**2).sum(axis=0)) / len(terms)


@dataclass(frozen=True)
class DoublyRobustGlobal:
    """g_λ by a doubly robust value of each global grid vector a on logs with known propensities p_i:

        ψ_i(a) = Q̂_λ(s_i, a) + 1{a_i = a}/p_i · (r_λ,i − Q̂_λ(s_i, a_i)),    V̂_DR(a) = (1/N) Σ_i ψ_i(a)

    (the model's mean Q̂ plus its residual where a was logged: unbiased for any Q̂, the model's
    pooling across actions kept in the first term). se clustered by user. Variants:

    - ``smooth``: the residual term replaced by its weighted least-squares fit on a quadratic in the
      grid coordinates, ρ(a) ≈ φ(a)ᵀβ, φ = (1, x, y, x², y², xy), x, y ∈ [0, 1]: corrects a smooth
      bias of the model's action effect with 6 parameters instead of |A| residual means.
    - ``pessimistic``: a* = argmax_a V̂_DR(a) replaces the model's choice a_m only where the paired
      Δ̂ = V̂_DR(a*) − V̂_DR(a_m) has a one-sided lower bound Δ̂ − z·se > 0, z = Φ⁻¹(1 − (1 − level)/(|A| − 1))
      (Bonferroni: a* is the best of |A| − 1 alternatives, so a plain z would switch on noise); ties
      and unresolved differences go to the model.

    Under uniform logging the residual term of one action averages ~N/|A| requests: its variance is
    reward at hit's times (1 − R²) of the heads, so it resolves value differences of about
    z·σ(r_λ)·√(2|A|/N) and no finer (the learning test reports what that means at its budgets)."""

    level: float = 0.95
    pessimistic: bool = False
    smooth: bool = False

    def __post_init__(self) -> None:
        if not 0.5 <= self.level < 1.0:
            raise ValueError(f"DoublyRobustGlobal level must be in [0.5, 1), got {self.level}")

    def terms(self, logs: dict, q: np.ndarray, lambdas: np.ndarray, scale: np.ndarray, grid: np.ndarray | None = None):
        """ψ_i(a) for every λ → [L, N, A]: logs = as_arrays columns, q [N, A, 2] = Q̂ in reward units
        at the logged states, grid [A, 3] = the weight vectors (needed when ``smooth``)."""
        q_lam = scalarised_q(q, lambdas, scale)  # [L, N, A]
        n, n_actions = q_lam.shape[1], q_lam.shape[2]
        if len(logs["action"]) != n:
            raise ValueError(f"q has {n} rows but the logs have {len(logs['action'])}")
        rows, logged = np.arange(n), np.asarray(logs["action"])
        r = np.stack([scalarised_rewards(logs["rewards"], lam, scale) for lam in np.asarray(lambdas, np.float64)])
        resid = r - q_lam[:, rows, logged]  # [L, N]
        hit = logged[:, None] == np.arange(n_actions)[None, :]  # [N, A]
        w = hit / np.asarray(logs["propensity"], np.float64)[:, None]
        if not self.smooth:
            return q_lam + w[None] * resid[..., None]
        if grid is None:
            raise ValueError("the smoothed doubly robust value needs the grid's weight vectors")
        xy = np.asarray(grid, np.float64)[:, 1:]
        xy = xy / np.maximum(xy.max(axis=0), 1e-12)
        phi = np.column_stack([np.ones(n_actions), xy, xy**2, xy[:, 0] * xy[:, 1]])  # [A, 6]
        # ρ̂ = φ β̂, β̂ = argmin Σ_i (resid_i − φ(a_i)ᵀβ)² (the per-action means weighted by their hits):
        # row i enters ρ̂(a) with weight φ(a)ᵀ (Φᵀ Φ)⁻¹ φ(a_i), Φ = φ(a_i) stacked over rows
        gram_inv = np.linalg.pinv(phi.T @ (phi * hit.sum(axis=0)[:, None]))
        per_row = n * phi[logged] @ gram_inv @ phi.T  # [N, A]
        return q_lam + per_row[None] * resid[..., None]

    def values(self, logs: dict, q: np.ndarray, lambdas: np.ndarray, scale: np.ndarray, grid=None):
        """(V̂_DR [L, A], se [L, A])."""
        psi = self.terms(logs, q, lambdas, scale, grid)
        return psi.mean(axis=1), np.stack([_cluster_se(p, logs.get("user_id")) for p in psi])

    def choose(
        self,
        logs: dict,
        q: np.ndarray,
        lambdas: np.ndarray,
        scale: np.ndarray,
        model_actions=None,
        grid=None,
        allowed=None,
    ) -> np.ndarray:
        """g_λ for every λ → [L] (``model_actions`` [L]: the model's choice, needed when pessimistic;
        ``allowed``: the action indices to choose from, all by default)."""
        psi = self.terms(logs, q, lambdas, scale, grid)  # [L, N, A]
        best = argmax_allowed(psi.mean(axis=1), allowed)
        if not self.pessimistic:
            return best
        if model_actions is None:
            raise ValueError("the pessimistic doubly robust choice needs the model's actions")
        out = np.asarray(model_actions).copy()
        z = float(stats.norm.ppf(1 - (1 - self.level) / max(psi.shape[2] - 1, 1)))
        for li, (a, m) in enumerate(zip(best, out)):
            d = psi[li, :, a] - psi[li, :, m]
            se = float(_cluster_se(d, logs.get("user_id")))
            if d.mean() - z * se > 0:
                out[li] = a
        return out

    def survivors(self, logs: dict, q: np.ndarray, lambdas: np.ndarray, scale: np.ndarray, support) -> np.ndarray:
        """Successive elimination's cut (Even-Dar et al. 2006): at each λ keep every vector a of the
        support S that the empirical best â = argmax_S V̂_DR does not beat significantly,

            keep a  ⇔  Δ̂(a) = V̂_DR(â) − V̂_DR(a) ≤ z·se(Δ̂(a)),   z = Φ⁻¹(1 − (1 − level)/(|S| − 1)),

        the paired difference's se clustered by user (the model's term is shared, so the pair resolves
        far finer than either value alone); returns the union over λ (sorted grid indices). With Q̂ fitted
        independently of these rows the true best survives one cut with probability ≥ ``level`` at each λ,
        whatever the model's bias; Q̂ fitted on the same rows (learning.py) shrinks the residuals at the
        logged actions, so the DR inherits part of its bias, and R − 1 cuts keep it with ≥ 1 − (R − 1)(1 − level)."""
        support = np.asarray(support, np.int64)
        psi = self.terms(logs, q, lambdas, scale)[:, :, support]  # [L, N, |S|]
        z = float(stats.norm.ppf(1 - (1 - self.level) / max(support.size - 1, 1)))
        keep = []
        for p in psi:
            best = int(np.argmax(p.mean(axis=0)))
            d = p[:, [best]] - p  # [N, |S|]
            se = _cluster_se(d, logs.get("user_id"))
            keep.append(support[d.mean(axis=0) <= z * se])
        return np.unique(np.concatenate(keep))


def choose_global_actions(
    choice: str,
    logs: dict,
    scores: np.ndarray,
    q: np.ndarray,
    lambdas: np.ndarray,
    scale: np.ndarray,
    grid,
    allowed=None,
) -> np.ndarray:
    """g_λ [L] by ``choice`` (GLOBAL_CHOICES) on ``logs`` (as_arrays columns): scores [N, A, 2] = Q̃
    (standardised), q = Q̂ in reward units at the logged states, grid [A, 3] = the weight vectors,
    ``allowed`` = the action indices g_λ may be (all by default; adaptive exploration: the survivors)."""
    if choice not in GLOBAL_CHOICES:
        raise ValueError(f"global_choice must be one of {GLOBAL_CHOICES}, got {choice!r}")
    model = model_global_actions(scores, lambdas, allowed)
    if choice == "model":
        return model
    if choice == "logs":
        return best_global_actions(logs, len(grid), lambdas, scale, allowed)
    dr = DoublyRobustGlobal(pessimistic=choice == "dr_lcb", smooth=choice == "dr_smooth")
    return dr.choose(logs, q, lambdas, scale, model, grid, allowed)


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
        names: tuple[str, str] = ("π_λ", "g_λ"),
    ) -> list[dict]:
        """One decision per λ: logs = held-out as_arrays columns, policy_actions [L, N] = π_λ on
        them, global_actions [L] = g_λ. Each decision: lambda, deployed (personalised | global),
        global_action, lift (Δ̂_λ, σ units), lift_se, lower_bound, hits, reason (``names``: the two
        policies as the reason calls them)."""
        mine, theirs = names
        est, out = RewardAtHit(), []
        n = len(logs["action"])
        for lam, pi, g in zip(np.asarray(lambdas, float), np.asarray(policy_actions), np.asarray(global_actions)):
            r = scalarised_rewards(logs["rewards"], lam, scale)[:, None]
            d, se = est.difference(logs["action"], logs["propensity"], r, pi, np.full(n, g), logs["user_id"])
            d, se = float(d[0]), float(se[0])
            lower = d - self.z * se
            if np.all(pi == g):
                keep, reason = False, f"{mine} serves {theirs} to every held-out request"
            elif not np.isfinite(lower):
                keep, reason = False, f"{mine} or {theirs} has no hit on the held-out logs: no evidence of a gain"
            elif lower > 0:
                keep = True
                reason = f"held-out logs support a gain over {theirs}: Δ̂ {d:+.4f}, lower bound {lower:+.4f} > 0"
            else:
                keep, reason = False, f"no significant gain over {theirs}: Δ̂ {d:+.4f}, lower bound {lower:+.4f} ≤ 0"
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


def myopic_actions(grid: np.ndarray, lambdas: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """m_λ [L], the myopic prior: the grid vector closest in direction (cosine) to ranking by the λ-scalarised
    predicted rewards, w ∝ (λ/σ₁, (1 − λ)/σ₂, 0) over (click, long view, purchase) — what a practitioner sets
    without learning (λ = 1: click-only; λ = 0: the most long-view weight, no purchase weight). grid [A, 3]."""
    w = np.asarray(grid, np.float64)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    lam = np.asarray(lambdas, np.float64)
    target = np.stack([lam / float(scale[0]), (1 - lam) / float(scale[1]), np.zeros_like(lam)], axis=1)  # [L, 3]
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    return (target @ unit.T).argmax(axis=1)


def certified_globals(
    guard: DoNoHarm, logs: dict, global_actions: np.ndarray, prior: np.ndarray, lambdas: np.ndarray, scale
) -> tuple[np.ndarray, list[dict]]:
    """Do no harm against the myopic prior: g_λ where held-out ``logs`` show it beats m_λ = ``prior`` at the
    guard's level (``DoNoHarm.decide`` with g_λ as the policy), m_λ elsewhere → (actions [L], decisions)."""
    g, m = np.asarray(global_actions, np.int64), np.asarray(prior, np.int64)
    n = len(logs["action"])
    raw = guard.decide(logs, np.repeat(g[:, None], n, axis=1), m, lambdas, scale, names=("g_λ", "m_λ"))
    kept = np.array([d["deployed"] == PERSONALISED for d in raw])
    decisions = [  # DoNoHarm's fields, named for this test: which was served, the two candidates, g_λ's hits
        {
            "lambda": d["lambda"],
            "served": "g_λ" if k else "m_λ",
            "prior_action": int(mi),
            "candidate_action": int(gi),
            "lift": d["lift"],
            "lift_se": d["lift_se"],
            "lower_bound": d["lower_bound"],
            "level": d["level"],
            "candidate_hits": d["hits"],
            "reason": d["reason"],
        }
        for d, k, gi, mi in zip(raw, kept, g, m)
    ]
    return np.where(kept, g, m), decisions


def deployed_actions(decisions: list[dict], policy_actions: np.ndarray) -> np.ndarray:
    """The deployed policy's actions [L, N]: π_λ where kept, g_λ elsewhere."""
    acts = np.array(policy_actions, copy=True)
    for li, dec in enumerate(decisions):
        if dec["deployed"] == GLOBAL:
            acts[li] = dec["global_action"]
    return acts
