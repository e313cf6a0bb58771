"""Where UNEX-RL's learning test loses usage: the oracle's static stage parameters with one stage changed; how
much one evaluation of a fixed setting varies with the users it is measured on; and, for the settings the learner
ends at (each stage at its mean action ā after training, read from ``benchmarks/results/unex_rl_deployment.json``:
session 42's defaults, the critic on raw actions), their
usage under the learner's own exploration noise and which stage they lose on.

    python benchmarks/unex_rl_sensitivity.py        # about 3 minutes on 2 cores

World and evaluator as benchmarks/learning_unex_rl.py (default preset, the small world; deterministic static
policies, ``usage_per_session`` on 1 000 users of the learning test's evaluation seed). The oracle's setting is the
one that benchmark's joint search found (learning_unex_rl.md), ranking written as (0, 1, 10): ranking by Σ w·p is
scale-invariant, so this is its (0, 0.091, 0.909). Writes benchmarks/results/unex_rl_sensitivity.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import build_world  # noqa: E402 (after sys.path: run as a script)
from actors.stages import STAGES  # noqa: E402
from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.learning_unex_rl import EVAL_SEED, WORLDS  # noqa: E402
from rllib_policies.unex_rl.algorithm import UnexRLConfig  # noqa: E402
from rllib_policies.unex_rl.learning import static_policies, usage_per_session  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "unex_rl_sensitivity.md")
LEARNED = os.path.join(ROOT, "benchmarks", "results", "unex_rl_deployment.json")
ORACLE = {"matching": (1.9, 0.3, 1.0, 0.4), "pre_ranking": (2.0, 0.1, 0.0), "ranking": (0.0, 1.0, 10.0)}
# (stage, the setting that replaces the oracle's): the directions the learned policies end in (learning_unex_rl.md)
VARIANTS = [
    ("ranking", (1.0, 1.0, 10.0)),
    ("ranking", (0.5, 1.0, 10.0)),
    ("ranking", (0.0, 1.0, 20.0)),
    ("pre_ranking", (1.8, 0.4, 0.5)),
    ("pre_ranking", (2.0, 0.1, 0.5)),
    *(("matching", (1.9, pop, 1.0, 0.4)) for pop in (0.05, 0.15, 0.5, 0.8, 1.0)),
    *(("matching", (rel, 0.3, 1.0, 0.4)) for rel in (0.5, 1.0, 1.5, 2.0)),
]
NOISE = [(1000, EVAL_SEED), (1000, EVAL_SEED + 1), (200, EVAL_SEED), (200, EVAL_SEED + 1), (200, EVAL_SEED + 2)]


def usage(pipeline, params: dict, n_sessions: int = 1000, seed: int = EVAL_SEED) -> float:
    policies = static_policies({s: np.asarray(v, np.float32) for s, v in params.items()})
    return usage_per_session(pipeline, policies, n_sessions, seed)


def explored_usage(pipeline, params: dict) -> float:
    """Usage of ``params`` served with the learner's default exploration noise on every stage (σ as a fraction of
    each action's range, per request): the smoothed objective its critic sees. The same users as ``usage``, and the
    same noise draws for every setting."""
    policies = static_policies({s: np.asarray(v, np.float32) for s, v in params.items()})
    explore_std = {s: UnexRLConfig().explore_std_of(s) for s in STAGES}
    return usage_per_session(pipeline, policies, 1000, EVAL_SEED, explore_std)


def learned_settings(pipeline, oracle: float) -> tuple[list[str], str]:
    """Per seed of the deployment benchmark: ā's usage, served as is and explored, and the usage each stage gains
    when it alone is set to the oracle's."""
    runs = json.load(open(LEARNED))["runs"]
    explored = [
        "| seed | ā: usage s / session | ā explored | matching → oracle's | pre_ranking → oracle's | "
        "ranking → oracle's |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        mean = {s: tuple(run["mean_action"][s]) for s in STAGES}
        u = usage(pipeline, mean)
        gains = [usage(pipeline, {**mean, s: ORACLE[s]}) - u for s in STAGES]
        explored.append(
            f"| {run['seed']} | {u:.1f} | {explored_usage(pipeline, mean):.1f} | "
            + " | ".join((f"{g:+.1f}" if round(g, 1) != 0 else "0.0") for g in gains)
            + " |"
        )
        print(explored[-1], flush=True)
    oracle_row = f"| the oracle's setting | {oracle:.1f} | {explored_usage(pipeline, ORACLE):.1f} | — | — | — |"
    return explored, oracle_row


def main() -> None:
    started = time.time()
    pipeline = build_world({"preset": "default", **WORLDS["small"]})[1]
    oracle = usage(pipeline, ORACLE)
    rows = ["| stage changed | its setting | usage s / session | against the oracle's setting |", "|---|---|---:|---:|"]
    rows.append(f"| — (the oracle's) | — | {oracle:.1f} | — |")
    for stage, setting in VARIANTS:
        u = usage(pipeline, {**ORACLE, stage: setting})
        rows.append(f"| {stage} | {setting} | {u:.1f} | {u - oracle:+.1f} |")
        print(rows[-1], flush=True)
    noise = ["| users | user seed | usage s / session |", "|---:|---:|---:|"]
    for n, seed in NOISE:
        noise.append(f"| {n} | {seed} | {usage(pipeline, ORACLE, n, seed):.1f} |")
        print(noise[-1], flush=True)
    learned, oracle_row = learned_settings(pipeline, oracle)
    setup = __doc__.split("\n\n")[2]  # the docstring's paragraph on the world and the evaluator
    sections = [
        "# UNEX-RL: the usage surface around the oracle's setting\n",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. Command: "
        f"`python benchmarks/unex_rl_sensitivity.py` ({time.time() - started:.0f} s). {setup}\n",
        "## One stage changed (1 000 users, the evaluation seed, common random numbers)\n",
        "\n".join(rows) + "\n",
        "## The oracle's setting measured on different users (evaluation noise)\n",
        "\n".join(noise) + "\n",
        "## Where the learner ends (the deployment benchmark's mean actions ā: 30 iterations, session 42's defaults, "
        "the critic on raw actions; unex_rl_deployment.json)\n",
        "Each seed's ā served deterministically and with the learner's default exploration noise (σ "
        + ", ".join(f"{UnexRLConfig().explore_std_of(s):g} on {s}" for s in STAGES)
        + " of each action's range, per request: the smoothed objective its critic is fitted on); "
        "then ā with one stage set to the oracle's setting, the usage that gains (1 000 users, common random "
        "numbers).\n",
        "\n".join([*learned, oracle_row]) + "\n",
    ]
    write_results(RESULTS, sections, partial=False)


if __name__ == "__main__":
    main()
