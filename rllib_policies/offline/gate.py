"""The off-policy gate for offline-trained ranking-weight policies: fitted-Q evaluation (FQE) and a doubly
robust estimate on the logged sessions, each with an interval; a policy is promoted only when its lower bound
beats the live (behaviour) policy's value measured on the same logs.

FQE (Le, Voloshin & Yue 2019) for a deterministic policy π on transitions (s, ā, r, s', done):
    Q̂ ← argmin mean (Q(s, ā) − r − γ·(1 − done)·Q̂'(s', π(s')))²    (Q̂' a Polyak target), V̂(s) = Q̂(s, π(s))
    V̂_FQE = mean over the logged session starts of V̂(s0); interval: percentile bootstrap over sessions of
    ``n_boot`` refits on resampled sessions (the model's error, not only the starts' spread), widened to hold
    V̂_FQE itself when every refit lands on one side of it.

Weighted doubly robust (Thomas & Brunskill 2016), per-decision, with FQE as the model; π is deterministic
and the actions continuous, so the importance ratio uses a Gaussian kernel of bandwidth h (unit-cube action
units; Kallus & Zhou 2018):
    ρ_t = K_h(ā_t − π(s_t)) / μ(ā_t | s_t),  w_{i,t} = Π_{t' ≤ t} ρ_{i,t'}  (unchanged after a session's end)
    V̂_WDR = Σ_t [ Σ_i w_{i,t}·(r_{i,t} − Q̂(s_{i,t}, ā_{i,t})) / Σ_i w_{i,t}
                 + Σ_i w_{i,t−1}·V̂(s_{i,t}) / Σ_i w_{i,t−1} ]
with w_{i,−1} = 1 and r, Q̂, V̂ = 0 past a session's end; its parts go to the OPE library
(``rllib_policies.ope``): the ESS-corrected interval, and abstention when the sessions' effective number is
too small to say anything, or when the policy's actions lie outside the logs (mean first-step ratio ≪ 1).

Gate: promote π iff lower(π) > V̂_live, V̂_live = the logged sessions' mean return (on-policy); the estimator
named ``by`` ("fqe" default, or "dr") supplies the lower bound; an abstained estimate never promotes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from ray.rllib.core.learner.utils import update_target_network
from scipy import stats
from scipy.special import logsumexp

from rllib_policies.building_blocks import mlp
from rllib_policies.ope.intervals import AbstainRule, EssCorrected, Parts, kish_ess

LOW_ESS = AbstainRule(min_ess=10.0, min_ess_fraction=0.002)


@dataclass(frozen=True)
class Sessions:
    """A dataset's transitions grouped by session: index [n_sessions, T] into the rows (−1 past the end)."""

    index: np.ndarray
    starts: np.ndarray  # row of each session's first step

    @staticmethod
    def of(rows: dict[str, np.ndarray]) -> Sessions:
        _, sid = np.unique(rows["eps_id"], return_inverse=True)
        t = np.asarray(rows["t"], np.int64)
        index = np.full((sid.max() + 1, t.max() + 1), -1, np.int64)
        index[sid, t] = np.arange(len(t))
        if (index[:, 0] < 0).any():
            raise ValueError("every session needs its step t = 0")
        return Sessions(index, index[:, 0])

    def padded(self, per_row: np.ndarray) -> np.ndarray:
        """Per-row values [N] laid out per session [n_sessions, T], 0 past each session's end."""
        return np.where(self.index >= 0, per_row[np.maximum(self.index, 0)], 0.0)


def fitted_q(
    rows: dict[str, np.ndarray],
    policy,
    high: np.ndarray,
    gamma: float = 1.0,
    steps: int = 1500,
    batch_size: int = 256,
    hidden: tuple[int, ...] = (128, 128),
    lr: float = 1e-3,
    tau: float = 0.01,
    seed: int = 0,
    subset: np.ndarray | None = None,
):
    """FQE's Q̂ for ``policy(obs [B, d]) → weights [B, 3]`` on ``rows`` (or the rows ``subset``): returns
    q(obs, weights) → [B] (NumPy). Seeded by ``seed`` in a forked torch generator: the caller's stream (a learner
    gated between its training calls) is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        high = np.asarray(high, np.float32)
        idx_all = np.arange(len(rows["rewards"])) if subset is None else subset
        obs = torch.tensor(rows["obs"], dtype=torch.float32)  # a copy: rows read zero-copy from Arrow are read-only
        act = torch.as_tensor(np.clip(rows["actions"] / high, 0, 1), dtype=torch.float32)
        nxt = torch.tensor(rows["new_obs"], dtype=torch.float32)
        pi_next = torch.as_tensor(np.clip(policy(rows["new_obs"]) / high, 0, 1), dtype=torch.float32)
        reward = torch.as_tensor(np.array(rows["rewards"], np.float32))
        not_done = 1.0 - torch.tensor(rows["terminateds"], dtype=torch.float32)
        net = mlp(obs.shape[1] + act.shape[1], hidden, 1)
        target = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(steps):
            i = torch.as_tensor(rng.choice(idx_all, batch_size))
            with torch.no_grad():
                y = reward[i] + gamma * not_done[i] * target(torch.cat([nxt[i], pi_next[i]], -1)).squeeze(-1)
            loss = ((net(torch.cat([obs[i], act[i]], -1)).squeeze(-1) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_target_network(main_net=net, target_net=target, tau=tau)

        def q(o: np.ndarray, weights: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                a = torch.as_tensor(np.clip(weights / high, 0, 1), dtype=torch.float32)
                return net(torch.cat([torch.as_tensor(o, dtype=torch.float32), a], -1)).squeeze(-1).numpy()

        return q


@dataclass(frozen=True)
class GateEstimate:
    value: float
    low: float
    high: float
    ess: float
    abstained: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one policy against the live (behaviour) policy."""

    promote: bool
    by: str
    live: GateEstimate  # the logged sessions' mean return (on-policy), with its t-interval
    fqe: GateEstimate
    dr: GateEstimate
    reason: str


def live_value(rows: dict[str, np.ndarray], level: float = 0.95) -> GateEstimate:
    """The behaviour policy's value on its own logs: mean session return with a t-interval."""
    r = Sessions.of(rows).padded(rows["rewards"]).sum(1)
    half = stats.t.ppf(0.5 + level / 2, len(r) - 1) * r.std(ddof=1) / np.sqrt(len(r))
    return GateEstimate(float(r.mean()), float(r.mean() - half), float(r.mean() + half), float(len(r)))


def doubly_robust(
    rows: dict[str, np.ndarray],
    policy,
    q,
    high: np.ndarray,
    bandwidth: float = 0.2,
    level: float = 0.95,
    abstain: AbstainRule = LOW_ESS,
    min_coverage: float = 0.1,
) -> GateEstimate:
    """V̂_WDR of ``policy`` with FQE's ``q`` as the model (module docstring), ESS-corrected interval; abstains when
    the effective number of sessions is too small, or when the data cover less than ``min_coverage`` of the
    kernel's mass around the policy's first actions (mean_i ρ_{i,0})."""
    s = Sessions.of(rows)
    high = np.asarray(high, np.float64)
    pi = np.asarray(policy(rows["obs"]), np.float64)
    diff = (rows["actions"] - pi) / high
    log_kernel = (stats.norm.logpdf(diff / bandwidth) - np.log(bandwidth)).sum(1)
    log_mu = rows["action_logp"] + np.log(high).sum()  # the behaviour's density in unit-cube units
    log_rho = log_kernel - log_mu
    # E_μ[ρ_0] = the share of the kernel's mass the data cover at the first step: ≈ 1 inside the support, ≈ 0 for a
    # policy whose actions the logs never hold — which self-normalised weights alone cannot see (all equally tiny)
    coverage = float(np.exp(logsumexp(log_rho[s.starts]) - np.log(len(s.starts))))
    if coverage < min_coverage:
        reason = f"the policy's actions lie outside the logged support (mean first-step kernel ratio {coverage:.3g})"
        return GateEstimate(float("nan"), float("nan"), float("nan"), 0.0, True, reason)
    log_w = np.cumsum(s.padded(log_rho), axis=1)  # [n, T]
    log_w -= log_w.max()  # scale-free: every term is self-normalised per step
    w = np.exp(log_w)
    w_prev = np.concatenate([np.ones((len(w), 1)), w[:, :-1]], axis=1)
    q_logged = s.padded(q(rows["obs"], rows["actions"]))
    v_state = s.padded(q(rows["obs"], pi))
    reward = s.padded(rows["rewards"])
    num = np.concatenate([w * (reward - q_logged), w_prev * v_state], axis=1)[:, :, None]
    den = np.concatenate([w, w_prev], axis=1)
    parts = Parts(num, den, w[:, -1])
    ess = kish_ess(parts.weights)
    reason = abstain.reason(ess, parts.n)
    if reason is not None:
        return GateEstimate(float("nan"), float("nan"), float("nan"), ess, True, reason)
    value = parts.value()
    low, up = EssCorrected(level).bounds(parts, value, None, ess)
    return GateEstimate(float(value[0]), float(low[0]), float(up[0]), ess)


def fqe_estimate(
    rows: dict[str, np.ndarray], policy, high: np.ndarray, n_boot: int = 5, level: float = 0.95, seed: int = 0, **fit
) -> tuple[GateEstimate, object]:
    """V̂_FQE (the full-data fit) and a percentile bootstrap interval of ``n_boot`` refits on sessions drawn
    with replacement; returns (estimate, the full-data q)."""
    s = Sessions.of(rows)
    start_obs = rows["obs"][s.starts]
    start_pi = policy(start_obs)
    q = fitted_q(rows, policy, high, seed=seed, **fit)
    value = float(q(start_obs, start_pi).mean())
    rng = np.random.default_rng(seed + 1)
    reps = []
    for b in range(n_boot):
        pick = rng.integers(0, len(s.starts), len(s.starts))
        subset = s.index[pick][s.index[pick] >= 0]
        qb = fitted_q(rows, policy, high, seed=seed + 2 + b, subset=subset, **fit)
        reps.append(float(qb(start_obs[pick], start_pi[pick]).mean()))
    alpha = (1 - level) / 2
    low, up = np.quantile(reps, [alpha, 1 - alpha]) if reps else (np.nan, np.nan)
    # the interval always holds the full fit: refits from other initialisations can all land on one side of it
    return GateEstimate(value, float(min(low, value)), float(max(up, value)), float(len(s.starts))), q


def _answers_kept(policy):
    """``policy`` answering each input array once: FQE's full fit and every bootstrap refit ask for the actions at
    the same rows' next states, which costs a policy that picks among sampled candidates (IQL's, BCQ's) a pass of
    its critics over them each time."""
    answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def kept(obs: np.ndarray) -> np.ndarray:
        if id(obs) not in answers:  # the array is held beside its answer, so its id is not reused meanwhile
            answers[id(obs)] = (obs, policy(obs))
        return answers[id(obs)][1]

    return kept


def gate(
    rows: dict[str, np.ndarray],
    policy,
    high: np.ndarray,
    by: str = "fqe",
    bandwidth: float = 0.2,
    n_boot: int = 5,
    level: float = 0.95,
    seed: int = 0,
    **fit,
) -> GateDecision:
    """Promote ``policy`` iff the lower bound of estimator ``by`` ("dr" or "fqe") beats the live policy's
    value on the same logs."""
    if by not in ("dr", "fqe"):
        raise ValueError(f"gate by must be 'dr' or 'fqe', got {by!r}")
    policy = _answers_kept(policy)
    live = live_value(rows, level)
    fqe, q = fqe_estimate(rows, policy, high, n_boot, level, seed, **fit)
    dr = doubly_robust(rows, policy, q, high, bandwidth, level)
    chosen = dr if by == "dr" else fqe
    if chosen.abstained:
        return GateDecision(False, by, live, fqe, dr, f"held: {by} abstained ({chosen.reason})")
    promote = bool(chosen.low > live.value)
    verdict = "promoted" if promote else "held"
    return GateDecision(
        promote, by, live, fqe, dr, f"{verdict}: {by} lower bound {chosen.low:.3f} vs live {live.value:.3f}"
    )


def best_bound(lows: list[float]) -> int:
    """Checkpoint selection: the index of the highest lower bound among ``lows`` (a tie: the later; NaN, an
    estimator that abstained, ranks last). ValueError when there is none."""
    return max(range(len(lows)), key=lambda i: (-np.inf if np.isnan(lows[i]) else lows[i], i))
