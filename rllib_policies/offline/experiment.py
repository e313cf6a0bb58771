"""One offline-RL run: a learner trained on one logged dataset, its critic's estimate of its own policy's value
next to that policy's true value from the simulator over training, and the off-policy gate's verdict at the end.

    spec = OfflineSpec()
    run = run_offline("bcq", "concurrent", rows_path, seed=0, spec=spec)
    run.true_curve, run.estimate_curve, run.gate

Our learners (TD3, BCQ, UWAC: ``rllib_policies.offline.td3`` / ``bcq`` / ``uwac``) and RLlib's (BC, CQL, IQL:
``rllib_policies.offline.shipped``) are trained for the same number of gradient steps of the same batch size
on the same rows; every policy is evaluated on the same users with the same random numbers. BCQ-EE is BCQ
with ``exploration_rounds`` online rounds between its training phases (``explore``), and IQL-EE and CQL-EE are
IQL and CQL with the same rounds (offline-to-online fine-tuning, as the IQL paper's §5.3 runs it): the only
learners here that see more than the logs, so their rows count the sessions they served (``online_sessions``).
"""

from __future__ import annotations

import inspect
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from actors.cascade import build_world
from actors.stages import RANKING_ACTION_HIGH
from rllib_policies.envs import SessionEnv

from .common import check_window, is_int
from .data import (
    EXPLORATION_NOISE,
    eval_users,
    policy_behaviour,
    read_rows,
    support_fraction,
    true_value,
    write_dataset,
)
from .gate import best_bound, gate
from .registry import LEARNERS as OFFLINE_LEARNERS
from .registry import OWN, own_config
from .shipped import SHIPPED, ShippedOffline, check_count, check_shipped, shipped_config

# BCQ-EE: BCQ with online exploration enhancement (BatchRL-MTF, Zhang et al. KDD 2022): between offline training
# phases the current policy is served with log-normal exploration around its actions, and the logged sessions
# join the dataset (a growing batch). IQL-EE and CQL-EE run the same rounds around IQL and CQL. learner name → the
# offline learner it explores with (and whose options it takes)
EXPLORING = {"bcq_ee": "bcq", "iql_ee": "iql", "cql_ee": "cql"}
LEARNERS = (*OFFLINE_LEARNERS, *EXPLORING)


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
    # the -EE learners' online rounds, evenly spaced over the iterations after any warm start
    exploration_rounds: int = 2
    exploration_sessions: int = 250  # sessions served per round
    exploration_noise: float = EXPLORATION_NOISE  # σ of the log-normal exploration around the policy's weights
    # the row sets an -EE learner trains on after a round: the last data_window (the logs are the first set, each
    # round adds one); None: all of them, a growing batch
    data_window: int | None = None
    # learner name → its options: ours through their options methods (``registry.own_config``), RLlib's as
    # ``shipped_config`` keywords (IQL's ``beta``, CQL's ``min_q_weight`` and ``num_actions``, both's
    # ``action_scale``); an -EE learner takes its offline learner's, under that name (BCQ-EE's under "bcq")
    options: dict = field(default_factory=dict)
    # None: serve the last iterate. N: serve, among the iterates evaluated from N gradient steps on, the one whose
    # gate lower bound (``gate_by``'s, on the logs alone) is highest: OPE-based checkpoint selection
    select_from: int | None = None

    def check_select_from(self) -> None:
        """ValueError unless ``select_from`` is None or an integer number of steps the run reaches (its last
        iterate is always evaluated, so at least that one is a candidate)."""
        total, n = self.iterations * self.updates_per_iteration, self.select_from
        if n is not None and (not is_int(n) or not 0 <= n <= total):
            raise ValueError(f"select_from must be None or an integer in [0, {total}] steps, got {n!r}")

    def exploration_iterations(self, warm_steps: int = 0) -> list[int]:
        """The iterations after which an -EE learner explores, each round followed by training on what it served:
        the rounds evenly spaced over the iterations after the learner's warm start (its first ``warm_steps``
        gradient steps, CQL's ``bc_steps``: a round serves the learner's own policy, not a half-cloned one),
        w + round(k·(iterations − w) / (rounds + 1)), k = 1..rounds, w = ⌈warm_steps / updates_per_iteration⌉.
        ValueError when those iterations cannot hold that many rounds (or ``data_window`` is not a window)."""
        check_window(self.data_window)
        warm = -(-check_count("warm_steps (bc_steps)", warm_steps) // self.updates_per_iteration)
        left = self.iterations - warm
        if warm and self.exploration_rounds and left < 2:
            raise ValueError(
                f"a warm start of {warm} of {self.iterations} iterations leaves none for exploration rounds "
                "(each needs training after it)"
            )
        if not 0 <= self.exploration_rounds < max(left, 1):
            after_warm = f" − {warm} of warm start" if warm else ""
            raise ValueError(
                f"exploration_rounds must be in [0, iterations{after_warm}) = [0, {max(left, 1)}), "
                f"got {self.exploration_rounds}"
            )
        n = self.exploration_rounds + 1
        after = sorted({warm + max(1, round(k * left / n)) for k in range(1, n)})
        if len(after) < self.exploration_rounds:
            raise ValueError(f"{self.exploration_rounds} exploration rounds do not fit apart in {left} iterations")
        return after

    def explore_after(self, name: str) -> list[int]:
        """``exploration_iterations`` for learner ``name``: none for an offline learner; an -EE learner's after the
        warm start its offline learner's options ask for (``bc_steps``)."""
        if name not in EXPLORING:
            return []
        return self.exploration_iterations(self.options.get(EXPLORING[name], {}).get("bc_steps", 0))


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
    online_sessions: int = 0  # sessions served online for exploration (the -EE learners); 0 for an offline learner
    # with ``select_from``: the gate's lower bound at each evaluated iterate (NaN before select_from), and the
    # gradient steps of the iterate served (its true value is final_true); None: the last iterate
    gate_lows: list[float] | None = None
    selected_update: int | None = None
    support_curve: list[float] = field(default_factory=list)  # ``support`` at each evaluated iterate

    def row(self) -> dict:
        return asdict(self)


def check_options(options: dict) -> None:
    """Every learner's options checked before any run: ours through their options methods (``own_config``),
    RLlib's against ``shipped_config``'s keywords; a ValueError names the learner and the option."""
    for name, opts in options.items():
        if name in OWN:
            own_config(name, opts)
        elif name in SHIPPED:
            takes = set(inspect.signature(shipped_config).parameters) - {"name", "rows_path", "observation_dim", "seed"}
            if unknown := sorted(set(opts) - takes):
                raise ValueError(f"{name} has no option(s) {unknown}; RLlib's learners take {sorted(takes)}")
            check_shipped(name, **opts)
        else:
            raise ValueError(
                f"options for {name!r}: no such offline learner ({(*OWN, *SHIPPED)}; "
                "an -EE learner takes its offline learner's)"
            )


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
            **{**({"num_actions": spec.cql_num_actions} if name == "cql" else {}), **spec.options.get(name, {})},
        )
    return (
        own_config(name, spec.options.get(name))
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


def explore(learner, pipeline, spec: OfflineSpec, out_dir: str, seed: int) -> int:
    """One online exploration round: serve ``spec.exploration_sessions`` sessions with log-normal exploration
    around the learner's policy (``policy_behaviour``) through the telemetry path, and grow its dataset by them
    (keeping the last ``spec.data_window`` row sets).
    Returns the sessions served."""
    out = write_dataset(
        "exploration",
        spec.env_config,
        out_dir,
        days=1,
        users_per_day=spec.exploration_sessions,
        seed=seed,
        sample=policy_behaviour(learner.policy_weights, pipeline, spec.exploration_noise),
    )
    learner.add_rows(out["path"], window=spec.data_window)
    return int(out["sessions"])


def run_offline(name: str, dataset: str, rows_path: str, seed: int, spec: OfflineSpec, progress=print) -> OfflineRun:
    """Train ``name`` on the rows at ``rows_path`` (dataset ``dataset``), evaluating every ``eval_every``
    iterations; then the gate (``gate.gate``) on the same rows. With ``spec.select_from`` the gate runs at every
    evaluated iterate from there on, and the run serves the one with the highest lower bound (its value, support,
    weights and gate verdict are the run's), as a deployment would keep that checkpoint."""
    spec.check_select_from()
    _, pipeline = build_world(spec.env_config)
    users = eval_users(pipeline, spec.eval_sessions, spec.eval_seed)
    rows = read_rows(rows_path)
    initial = rows["obs"][rows["t"] == 0]
    learner = build_learner(EXPLORING.get(name, name), rows_path, seed, spec)
    explore_after = spec.explore_after(name)
    updates, estimates, truths, supports, train_s, online = [], [], [], [], 0.0, 0
    lows, judged = [], {}  # judged: index of an iterate the gate ran on → (weights at the starts, decision)

    def judge():  # FQE seeds torch in a generator of its own (``fitted_q``): gating between iterates leaves training
        return gate(rows, learner.policy_weights, RANKING_ACTION_HIGH, by=spec.gate_by, n_boot=3, steps=1000, seed=seed)

    try:
        for i in range(1, spec.iterations + 1):
            t0 = time.perf_counter()
            learner.train()
            train_s += time.perf_counter() - t0
            if i in explore_after:  # the round's rows are read into the learner: its files go with the folder
                with tempfile.TemporaryDirectory(prefix=f"{name}-{dataset}-s{seed}-i{i}-") as out_dir:
                    online += explore(learner, pipeline, spec, out_dir, seed=1000 * (seed + 1) + i)
            if i % spec.eval_every == 0 or i == spec.iterations:
                updates.append(i * spec.updates_per_iteration)
                estimates.append(learner.q_estimate(initial))
                truths.append(float(true_value(pipeline, learner.policy_weights, users, spec.eval_seed).mean()))
                weights = learner.policy_weights(initial)  # at the session starts: support, and the served weights
                supports.append(support_fraction(weights, rows["actions"]))
                if spec.select_from is not None:
                    lows.append(np.nan)
                    if updates[-1] >= spec.select_from:
                        decision = judge()
                        lows[-1] = getattr(decision, spec.gate_by).low
                        judged[len(truths) - 1] = (weights, decision)
        if not judged:  # the last iterate
            start_weights, decision, pick = weights, judge(), len(truths) - 1  # the last iteration is evaluated
        else:
            pick = list(judged)[best_bound([lows[k] for k in judged])]
            start_weights, decision = judged[pick]
    finally:
        learner.stop()
    run = OfflineRun(
        learner=name,
        dataset=dataset,
        seed=seed,
        updates=updates,
        estimate_curve=estimates,
        true_curve=truths,
        final_true=truths[pick],
        final_estimate=estimates[pick],
        support=supports[pick],
        mean_weights=np.round(start_weights.mean(0), 4).tolist(),
        gate={
            "promote": decision.promote,
            "reason": decision.reason,
            "live": asdict(decision.live),
            "fqe": asdict(decision.fqe),
            "dr": asdict(decision.dr),
        },
        train_seconds=train_s,
        online_sessions=online,
        gate_lows=lows if spec.select_from is not None else None,
        selected_update=updates[pick] if spec.select_from is not None else None,
        support_curve=supports,
    )
    progress(
        f"  {name:<4} {dataset:<11} seed {seed}: true {run.final_true:.2f}, critic {run.final_estimate:.2f}, "
        f"support {run.support:.0%}, gate {'promote' if decision.promote else 'hold'}, {train_s:.0f} s"
        + ("" if run.selected_update is None else f", served the iterate at {run.selected_update} steps")
    )
    return run
