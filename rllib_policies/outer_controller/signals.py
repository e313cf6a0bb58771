"""The learning signals each arm feeds its policy gradient, computed on the driver per iteration.

layered     inner: G_t = Σ γ^k·clip(r_{t+k})  → rolling baseline → β·Ĝ_t
            outer: R = Σ_k w_k·KPI_k (session)  → rolling baseline → R̂
            the learner blends A_t = clip((1 − κ)·β·Ĝ_t + κ·(T·c_t(R̂) + D̂_t), ±5) with gated-attention
            credit c_t; κ = 0 until ``min_sessions_for_kpi`` sessions have been seen (the gate),
            then κ(i) from the anneal schedule (or κ_end throughout without annealing).
monolithic  one per-step weighted sum m_t = β·clip(r_t) + d_t, G_t = Σ γ^k·m_{t+k} + R (the session
            reward R reaches every step undiscounted, as the layered arm's uniform credit does)
            → the same rolling baseline; no second signal, no credit, no κ.

Step KPIs (``step_kpis``, on by default): a KPI that decomposes over the session's requests
(``sessions.STEP_KPIS``: revenue and clicks are sums, NDCG a mean) is credited where it was earned:
d_t = Σ_{k decomposable} w_k·part_{k,t} joins the per-step stream, and only the rest (the next-day
return) stays in the session reward R. In the layered arm D_t = Σ γ^k·d_{t+k} is centred by its own
rolling mean and scaled by the rolling σ of the whole KPI blend (R + Σ_t d_t), so the KPIs keep their
weights relative to each other: D̂_t = (D_t − μ_D)/σ_J, R̂ = (R − μ_R)/σ_J. A request's action cannot
change the NDCG or revenue of the requests before it, so this drops their noise from its credit.

Per-session exploration (``exploration="session"``: one ε per session, u_t = m(s_t) + σ·ε) makes a
session one sample of one action, so it gets one advantage: the session objective
S = β·Σ_t clip(r_t) + J (monolithic) or (1 − κ)·β·Σ_t clip(r_t) + κ·J (layered), J = Σ_k w_k·KPI_k,
centred by the mean of the *other* sessions of the batch (leave-one-out: the baseline holds no part of
the session's own outcome) and scaled by the batch's σ (which does, slightly: a small bias), is spread
evenly over the session's T requests (A_t = Â/T; the
``step_signal`` column, with the learner's κ column 0). Its parts per term (the inner reward and each
KPI) are returned too, for the algorithm's per-KPI shrinkage (``kpi_shrinkage``). Per-request credit
would be biased there: a step credit or baseline counted T times correlates with ε wherever the action
changes the session's length (measured: seeds drifted to long-view-only ranking, which lengthens
sessions).

β (``inner_reward_weight``, 1 by default) is the inner reward's weight; β = 0 leaves the KPIs alone
(the learning tests train both arms on the business objective J that way).

KPI weights live here (not in the frozen AlgorithmConfig) so an operator can change them at run
time; the next iteration uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rllib_policies.credit import KappaSchedule, RollingBaseline, clip_rewards, discounted_returns

from .sessions import GROUND_TRUTH_KPIS, KPIS, SessionBatch


@dataclass
class SignalConfig:
    arm: str = "layered"  # "layered" | "monolithic"
    gamma: float = 0.9
    kpi_weights: dict = field(default_factory=lambda: {"revenue": 1.0, "return": 1.0, "ndcg": 1.0})
    kappa: KappaSchedule = field(default_factory=KappaSchedule)
    anneal: bool = True  # False: κ = kappa.end from the first gated iteration
    baseline: bool = True
    baseline_alpha: float = 0.01
    reward_clip: float = 5.0
    min_sessions_for_kpi: int = 10_000
    inner_reward_weight: float = 1.0  # β
    step_kpis: bool = True  # credit decomposable KPIs per request (see the module docstring)
    per_session: bool = False  # one advantage per session (per-session exploration; module docstring)

    def __post_init__(self) -> None:
        if self.arm not in ("layered", "monolithic"):
            raise ValueError(f"arm must be 'layered' or 'monolithic', got {self.arm!r}")
        if self.min_sessions_for_kpi < 0 or self.reward_clip <= 0:
            raise ValueError("min_sessions_for_kpi must be >= 0 and reward_clip > 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not (np.isfinite(self.inner_reward_weight) and self.inner_reward_weight >= 0):
            raise ValueError(f"inner_reward_weight must be finite and >= 0, got {self.inner_reward_weight}")
        validate_kpi_weights(self.kpi_weights)


def validate_kpi_weights(weights: dict) -> dict:
    if not weights:
        raise ValueError("kpi_weights must name at least one KPI")
    for name, w in weights.items():
        if name not in KPIS:
            raise ValueError(f"kpi_weights: unknown KPI {name!r}; choose from {KPIS}")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not np.isfinite(w):
            raise ValueError(f"kpi_weights[{name!r}] must be finite, got {w}")
    return {k: float(v) for k, v in weights.items()}


class OuterSignals:
    """Stateful (baselines, sessions seen, KPI weights); ``state()`` / ``set_state()`` checkpoint it."""

    def __init__(self, config: SignalConfig):
        self.config = config
        self.kpi_weights = dict(config.kpi_weights)
        self.inner_baseline = RollingBaseline(config.baseline_alpha)
        self.outer_baseline = RollingBaseline(config.baseline_alpha)
        self.step_kpi_baseline = RollingBaseline(config.baseline_alpha)  # D_t (step KPIs)
        self.blend_baseline = RollingBaseline(config.baseline_alpha)  # σ_J of the whole KPI blend
        self.sessions_seen = 0
        self.gated_iterations = 0

    def set_kpi_weights(self, weights: dict) -> None:
        self.kpi_weights = validate_kpi_weights(weights)

    def outer_reward(self, batch: SessionBatch) -> np.ndarray:
        """R = Σ_k w_k·KPI_k per session [B]."""
        missing = [k for k in self.kpi_weights if k not in batch.kpis]
        truth = [
            f"{k!r} needs the simulator's ground truth ({GROUND_TRUTH_KPIS[k]})"
            for k in missing
            if k in GROUND_TRUTH_KPIS
        ]
        if missing:
            raise ValueError(
                f"kpi_weights name KPIs this data does not carry: {missing} (has {sorted(batch.kpis)})"
                + (f"; {'; '.join(truth)}" if truth else "")
            )
        return sum(w * batch.kpis[k] for k, w in self.kpi_weights.items())

    def split_reward(self, batch: SessionBatch) -> tuple[np.ndarray, np.ndarray]:
        """(d [N], R [B]): the KPI blend split into per-request parts d_t = Σ_{k decomposable} w_k·part_{k,t}
        and the session-level rest R = Σ_{k not decomposable} w_k·KPI_k (all of it without step KPIs)."""
        d = np.zeros(len(batch.t))
        r_session = np.zeros(batch.n_sessions)
        for k, w in self.kpi_weights.items():
            part = batch.step_kpi(k) if self.config.step_kpis else None
            if part is None:
                r_session = r_session + w * batch.kpis[k]
            else:
                d = d + w * part
        return d, r_session

    def kappa(self) -> float:
        """κ for this iteration: 0 while the session gate is closed."""
        if self.sessions_seen < self.config.min_sessions_for_kpi:
            return 0.0
        k = self.config.kappa
        return k(self.gated_iterations) if self.config.anneal else k.end

    def compute(self, batch: SessionBatch) -> dict:
        """Per-row columns for the learner + metrics. Advances the gate and the baselines."""
        cfg, clip = self.config, self.config.reward_clip
        self.sessions_seen += batch.n_sessions
        kappa = self.kappa()
        if kappa > 0:
            self.gated_iterations += 1
        r_outer = self.outer_reward(batch)
        d, r_session = self.split_reward(batch)
        inner = clip_rewards(batch.inner_reward, -clip, clip)
        kpi_step = np.zeros(len(batch.t))
        session_reward = np.zeros(len(batch.t))
        if cfg.arm == "monolithic":
            per_step = cfg.inner_reward_weight * inner + d
            session_reward = r_session[batch.session]
            kappa, outer_signal = 0.0, np.zeros(batch.n_sessions)
        else:
            per_step = inner
            d_padded, mask = batch.padded(d)
            kpi_step = discounted_returns(d_padded, cfg.gamma, mask)
            if cfg.baseline:
                sigma = self.blend_baseline.scale(r_outer)
                kpi_step = self.step_kpi_baseline.centred(kpi_step, mask) / sigma
                outer_signal = self.outer_baseline.centred(r_session) / sigma
            else:
                outer_signal = r_session
            kpi_step = kpi_step[batch.session, batch.t]
        if cfg.per_session:
            return self._per_session(batch, inner, r_outer, kappa)
        padded, mask = batch.padded(per_step)
        g = discounted_returns(padded, cfg.gamma, mask) + batch.padded(session_reward)[0]
        if cfg.baseline:
            g = self.inner_baseline.advantage(g, mask)
        if cfg.arm == "layered":
            g = cfg.inner_reward_weight * g
        step_signal = g[batch.session, batch.t]
        return {
            "step_signal": step_signal.astype(np.float32),
            "outer_signal": outer_signal[batch.session].astype(np.float32),
            "kpi_step_signal": kpi_step.astype(np.float32),
            "kappa": np.full(len(batch.t), kappa, np.float32),
            "metrics": self._metrics(batch, r_outer, kappa),
        }

    def _per_session(self, batch: SessionBatch, inner: np.ndarray, r_outer: np.ndarray, kappa: float) -> dict:
        """One advantage per session, spread evenly over its requests (per-session exploration); also the
        advantage's parts per objective term (``session_parts`` [B, C], named ``part_names``), which sum to it."""
        cfg, n = self.config, batch.n_sessions
        inner_sum = cfg.inner_reward_weight * np.bincount(batch.session, weights=inner, minlength=n)
        kpi_weight = 1.0 if cfg.arm == "monolithic" else kappa
        parts = {"inner": inner_sum * (1.0 if cfg.arm == "monolithic" else 1 - kappa)}
        parts |= {k: kpi_weight * w * batch.kpis[k] for k, w in self.kpi_weights.items()}
        if cfg.baseline and n > 1:
            scale = max(float(sum(parts.values()).std()), 1e-8)
            parts = {k: (v - (v.sum() - v) / (n - 1)) / scale for k, v in parts.items()}  # leave-one-out
        stacked = np.stack(list(parts.values()), axis=1)
        length = np.bincount(batch.session, minlength=n)
        zeros = np.zeros(len(batch.t), np.float32)
        return {
            "step_signal": (stacked.sum(axis=1) / length)[batch.session].astype(np.float32),
            "outer_signal": zeros,
            "kpi_step_signal": zeros,
            "kappa": zeros,
            "session_parts": stacked,
            "part_names": list(parts),
            "metrics": self._metrics(batch, r_outer, kappa),
        }

    def _metrics(self, batch: SessionBatch, r_outer: np.ndarray, kappa: float) -> dict:
        return {
            "kappa": kappa,
            "sessions_seen": self.sessions_seen,
            "kpi_gate_open": float(self.sessions_seen >= self.config.min_sessions_for_kpi),
            "outer_reward_mean": float(r_outer.mean()),
            "inner_reward_mean": float(batch.inner_reward.mean()),
            **{f"kpi_{k}": float(v.mean()) for k, v in batch.kpis.items()},
        }

    def state(self) -> dict:
        return {
            "kpi_weights": self.kpi_weights,
            "inner": self.inner_baseline.state(),
            "outer": self.outer_baseline.state(),
            "step_kpi": self.step_kpi_baseline.state(),
            "blend": self.blend_baseline.state(),
            "sessions_seen": self.sessions_seen,
            "gated_iterations": self.gated_iterations,
        }

    def set_state(self, state: dict) -> None:
        self.kpi_weights = dict(state["kpi_weights"])
        for name, baseline in (
            ("inner", self.inner_baseline),
            ("outer", self.outer_baseline),
            ("step_kpi", self.step_kpi_baseline),
            ("blend", self.blend_baseline),
        ):
            s = state[name]
            baseline.mean, baseline.var, baseline.count = s["mean"], s["var"], s["count"]
        self.sessions_seen, self.gated_iterations = state["sessions_seen"], state["gated_iterations"]
