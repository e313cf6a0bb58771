"""The daily cycle's config: one YAML mapping of ``DailyCycleConfig`` fields (unknown keys are an error)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from actors.world import WorldConfig
from rllib_policies.jobs import config_from_yaml

APPS = {"recommend": "serve_apps.recommend:app_builder", "inner_reward": "serve_apps.inner_reward:app_builder"}
INJECTIONS = ("bad_candidate_day", "drift_day", "training_failure_day")


@dataclass
class DailyCycleConfig:
    """serve → log → learn → gate → promote → monitor, once per simulated day.

    Args:
        storage: where everything the cycle makes goes (events, trajectories, request rows, candidates,
            the cycle's state, the per-day report); outlives the job. A relative path lies under the storage
            root (``rllib_policies.storage``: $MORL_STORAGE, else ~/morl-runs); a local path, since the
            recommend app's Parquet sink writes the events there.
        days: simulated days to run (a resumed run finishes the plan).
        sessions_per_day: sessions a day: yesterday's returning users first, then fresh users (never seen
            before, so a user's later session is always a return).
        env_config: the world {"preset", "world": {…}, "pipeline": {…}}; serving and traffic share it.
        apps: Serve import paths of the recommend and inner-reward applications (deployed by the cycle).
        http: {"host", "port"} of Serve's HTTP proxy; ``concurrency``: requests in flight at once.
        start_weights: the ranking weights (click, long view, purchase) both arms serve on day 0; the
            control arm keeps them.
        treatment_share: the treatment arm's share of users (the cycle promotes into it).
        weight_std: σ of Gaussian weight logging in log space (both arms): what makes logs learnable. At 0.3 the
            gate certified no trust-region step toward the oracle even on 17 000 requests; at 1.0 it certified
            every one from 5 500 (benchmarks/results/gate_power.md).
        lam: the objective r = λ·clicks/σ_c + (1 − λ)·long_views/σ_l per request (σ fitted on day 0).
        train_days: the learner trains on the last ``train_days`` finished days of logs.
        validation: share of users whose requests the gate certifies on (never trained on).
        crm: CRM options (``CRMConfig.crm`` keywords and ``iterations``, ``lr``). The learner proposes, the gate
            certifies: the default confidence 0.51 (z ≈ 0) lets CRM maximise the SNIPS estimate inside its ESS
            barrier; the pessimism lives in the gate's lower bound on held-out users.
        trust_region_kl: the learner's step: its proposal is moved at most this KL from the live policy.
        gate: {"level": one-sided confidence of the OPE lower bound, "kl_bound": max KL(live ‖ candidate)}.
        monitor: {"level": confidence that treatment is worse than control, "kl_bound": max KL(promoted ‖
            served) on the treatment's live traffic}; a breach rolls the treatment arm back.
        gap_s: within a day, a user's requests more than this apart are different sessions (sessioniser); a
            day's traffic is its own wall-clock slot, and next-day return is a session in the next day's slot.
        shadow: a candidate that passes the gate first runs in shadow for a day (it scores the live requests,
            nothing it proposes is served; the requests log its density of the served weights) and is promoted
            only if that day's fresh traffic certifies it too; otherwise promotion follows the gate at once.
        inject: {"bad_candidate_day", "drift_day", "training_failure_day"}: a day number or null — a
            deliberately bad candidate handed to the gate, an out-of-band change of the treatment's served
            weights before that day's traffic, a failing nightly training.
        seed: traffic and splits (one ``seed_sequence`` stream per day).
    """

    storage: str = "daily_cycle"
    days: int = 14
    sessions_per_day: int = 400
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 8000}})
    apps: dict = field(default_factory=lambda: dict(APPS))
    http: dict = field(default_factory=lambda: {"host": "127.0.0.1", "port": 8000, "concurrency": 16})
    experiment: str = "daily-cycle"
    start_weights: tuple[float, float, float] = (1.0, 1.0, 10.0)
    treatment_share: float = 0.5
    weight_std: float = 1.0
    lam: float = 0.25
    train_days: int = 3
    validation: float = 0.5
    crm: dict = field(default_factory=lambda: {"iterations": 10, "lr": 0.05, "confidence": 0.51})
    trust_region_kl: float = 0.5
    gate: dict = field(default_factory=lambda: {"level": 0.95, "kl_bound": 1.0})
    monitor: dict = field(default_factory=lambda: {"level": 0.99, "kl_bound": 0.5})
    gap_s: float = 10.0
    shadow: bool = False
    inject: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.start_weights = tuple(float(w) for w in self.start_weights)
        checks = [
            ("days", self.days >= 1, "must be ≥ 1"),
            ("sessions_per_day", self.sessions_per_day >= 2, "must be ≥ 2"),
            ("start_weights", len(self.start_weights) == 3 and min(self.start_weights) > 0, "must be 3 weights > 0"),
            ("treatment_share", 0 < self.treatment_share < 1, "must be in (0, 1)"),
            ("weight_std", self.weight_std > 0, "must be > 0"),
            ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
            ("train_days", self.train_days >= 1, "must be ≥ 1"),
            ("validation", 0 < self.validation < 1, "must be in (0, 1)"),
            ("trust_region_kl", self.trust_region_kl > 0, "must be > 0"),
            ("gate.level", 0.5 < self.gate.get("level", 0.95) < 1, "must be in (0.5, 1)"),
            ("gate.kl_bound", self.gate.get("kl_bound", 1.0) > 0, "must be > 0"),
            ("monitor.level", 0.5 < self.monitor.get("level", 0.95) < 1, "must be in (0.5, 1)"),
            ("monitor.kl_bound", self.monitor.get("kl_bound", 0.5) > 0, "must be > 0"),
            ("gap_s", self.gap_s > 0, "must be > 0"),
            ("inject", set(self.inject) <= set(INJECTIONS), f"keys must be among {INJECTIONS}"),
            ("apps", set(self.apps) == set(APPS), f"must name {sorted(APPS)}"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"daily cycle config: {name} {what}, got {getattr(self, name.split('.')[0])!r}")
        n_users = WorldConfig.preset(
            self.env_config.get("preset", "default"), **self.env_config.get("world", {})
        ).n_users
        if self.sessions_per_day * self.days > n_users:
            raise ValueError(
                f"daily cycle config: sessions_per_day × days = {self.sessions_per_day * self.days} exceeds the "
                f"world's {n_users} users (fresh users are never reused)"
            )

    @classmethod
    def from_yaml(cls, path: str) -> DailyCycleConfig:
        return config_from_yaml(cls, path)

    @property
    def sigma(self) -> np.ndarray:
        return np.full(3, self.weight_std)

    def to_dict(self) -> dict:
        return asdict(self)
