"""One offline-RL run: a learner trained on one logged dataset, its critic's estimate of its own policy's value
next to that policy's true value from the simulator over training, and the off-policy gate's verdict at the end.

    spec = OfflineSpec()
    run = run_offline("bcq", "concurrent", rows_path, seed=0, spec=spec)
    run.true_curve, run.estimate_curve, run.gate

Our learners (TD3, BCQ: ``rllib_policies.offline.td3`` / ``bcq``) and RLlib's (BC, CQL, IQL:
``rllib_policies.offline.shipped``) are trained for the same number of gradient steps of the same batch size
on the same rows; every policy is evaluated on the same users with the same random numbers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from actors.cascade import build_world
from actors.stages import RANKING_ACTION_HIGH
from rllib_policies.envs import SessionEnv

from .bcq import BCQConfig
from .data import eval_users, read_rows, support_fraction, true_value
from .gate import gate
from .shipped import SHIPPED, ShippedOffline
from .td3 import TD3Config

OWN = {"td3": TD3Config, "bcq": BCQConfig}
LEARNERS = ("td3", "bcq", *SHIPPED)


@dataclass
class OfflineSpec:
    """The shared budget and evaluation of every run."""

    env_config: dict = field(default_factory=lambda: {"preset": "default", "world": {"n_items": 5000, "n_users": 2000}})
    iterations: int = 10
    updates_per_iteration: int = 150  # gradient steps per iteration (batch_size transitions each)
    batch_size: int = 256
    eval_every: int = 2
    eval_sessions: int = 1000
    eval_seed: int = 7
    gamma: float = 1.0
    hidden: tuple = (128, 128)
    gate_by: str = "fqe"
    # CQL's sampled actions per state in its logsumexp penalty (RLlib's default 10): each costs a pass of
    # the twin critics over the batch; at 10 one CQL step took 0.48 s here, 20× a TD3 step (4: 0.25 s)
    cql_num_actions: int = 4


@dataclass
class OfflineRun:
    learner: str
    dataset: str
    seed: int
    updates: list[int]
    estimate_curve: list[float]  # the critic's mean_s0 Q(s0, π(s0)) (NaN for BC)
    true_curve: list[float]  # V(π) on the evaluation users
    final_true: float
    final_estimate: float
    support: float  # share of the policy's actions at the dataset's session starts within 0.1 of a logged one
    mean_weights: list[float]
    gate: dict
    train_seconds: float

    def row(self) -> dict:
        return asdict(self)


def build_learner(name: str, rows_path: str, seed: int, spec: OfflineSpec):
    """A learner with ``train()``, ``policy_weights(obs)``, ``q_estimate(initial_obs)`` and ``stop()``."""
    _, pipeline = build_world(spec.env_config)
    if name in SHIPPED:
        return ShippedOffline(
            name,
            rows_path,
            pipeline.spec.context_dim,
            seed,
            updates_per_iteration=spec.updates_per_iteration,
            batch_size=spec.batch_size,
            gamma=spec.gamma,
            hidden=tuple(spec.hidden),
            **({"num_actions": spec.cql_num_actions} if name == "cql" else {}),
        )
    if name not in OWN:
        raise ValueError(f"unknown offline learner {name!r}; choose from {LEARNERS}")
    return (
        OWN[name]()
        .environment(SessionEnv, env_config={**spec.env_config, "seed": seed})
        .training(gamma=spec.gamma)
        .offline_rl(
            dataset=rows_path,
            updates_per_iteration=spec.updates_per_iteration,
            batch_size=spec.batch_size,
            hidden=tuple(spec.hidden),
        )
        .debugging(seed=seed, log_level="ERROR")
        .build_algo()
    )


def run_offline(name: str, dataset: str, rows_path: str, seed: int, spec: OfflineSpec, progress=print) -> OfflineRun:
    """Train ``name`` on the rows at ``rows_path`` (dataset ``dataset``), evaluating every ``eval_every``
    iterations; then the gate (``gate.gate``) on the same rows."""
    _, pipeline = build_world(spec.env_config)
    users = eval_users(pipeline, spec.eval_sessions, spec.eval_seed)
    rows = read_rows(rows_path)
    initial = rows["obs"][rows["t"] == 0]
    learner = build_learner(name, rows_path, seed, spec)
    updates, estimates, truths, train_s = [], [], [], 0.0
    try:
        for i in range(1, spec.iterations + 1):
            t0 = time.perf_counter()
            learner.train()
            train_s += time.perf_counter() - t0
            if i % spec.eval_every == 0 or i == spec.iterations:
                updates.append(i * spec.updates_per_iteration)
                estimates.append(learner.q_estimate(initial))
                truths.append(float(true_value(pipeline, learner.policy_weights, users, spec.eval_seed).mean()))
        start_weights = learner.policy_weights(initial)
        decision = gate(
            rows, learner.policy_weights, RANKING_ACTION_HIGH, by=spec.gate_by, n_boot=3, steps=1000, seed=seed
        )
    finally:
        learner.stop()
    run = OfflineRun(
        learner=name,
        dataset=dataset,
        seed=seed,
        updates=updates,
        estimate_curve=estimates,
        true_curve=truths,
        final_true=truths[-1],
        final_estimate=estimates[-1],
        support=support_fraction(start_weights, rows["actions"]),
        mean_weights=np.round(start_weights.mean(0), 4).tolist(),
        gate={
            "promote": decision.promote,
            "reason": decision.reason,
            "live": asdict(decision.live),
            "fqe": asdict(decision.fqe),
            "dr": asdict(decision.dr),
        },
        train_seconds=train_s,
    )
    progress(
        f"  {name:<4} {dataset:<11} seed {seed}: true {run.final_true:.2f}, critic {run.final_estimate:.2f}, "
        f"support {run.support:.0%}, gate {'promote' if decision.promote else 'hold'}, {train_s:.0f} s"
    )
    return run
