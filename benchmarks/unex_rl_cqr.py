"""What UNEX-RL's category-quantile rescaling (CQR) rewards, next to what the objective counts.

UNEX-RL's reward is the request's usage seconds; CQR replaces it by its mid-rank quantile within a
(user cohort, item group) cell (``rllib_policies.unex_rl.cic.CategoryQuantileRescaler``). A quantile is
bounded: a long view of 300 s scores at most 1, like a 40 s one. For static ranking weights on the oracle's
matching and pre-ranking stages (the learning test's world), this prints and writes the mean usage seconds per
session (the objective) and the summed quantile reward per session (what a critic on CQR rewards learns to
maximise), the cells fitted on the pooled requests of every setting, all settings on the same users and
random numbers.

    .venv/bin/python benchmarks/unex_rl_cqr.py                 # ≈ 1 min; writes benchmarks/results/unex_rl_cqr.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import build_world  # noqa: E402 (after sys.path: run as a script)
from benchmarks.common import machine, write_results  # noqa: E402
from rllib_policies.unex_rl.cic import CategoryQuantileRescaler  # noqa: E402
from rllib_policies.unex_rl.learning import static_policies  # noqa: E402
from rllib_policies.unex_rl.sampler import N_ITEM_GROUPS, sample_sessions  # noqa: E402

WORLD = {
    "preset": "default",
    "world": {"n_items": 1500, "n_users": 400},
    "pipeline": {"k_matching": 150, "k_pre_ranking": 30},
}
UPSTREAM = {"matching": [1.9, 0.3, 1.0, 0.4], "pre_ranking": [2.0, 0.1, 0.0]}  # the learning test's joint oracle
RANKING = {  # (w_click, w_long_view, w_purchase)
    "oracle (0, 1, 10)": (0.0, 1.0, 10.0),
    "default (1, 1, 10)": (1.0, 1.0, 10.0),
    "click-heavier (2, 1, 10)": (2.0, 1.0, 10.0),
    "purchase only (0, 0, 10)": (0.0, 0.0, 10.0),
    "clicks only (1, 0, 0)": (1.0, 0.0, 0.0),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--seed", type=int, default=10_000)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    pipeline = build_world(WORLD)[1]
    batches = {}
    for name, weights in RANKING.items():
        policies = static_policies({**UPSTREAM, "ranking": weights})
        rng = np.random.default_rng(args.seed)
        batches[name] = sample_sessions(pipeline, policies, args.sessions, rng, explore=False, users_seed=args.seed)
    cqr = CategoryQuantileRescaler(3, N_ITEM_GROUPS + 1, window=10**9)  # the cells of every setting's requests
    for batch, _ in batches.values():
        cqr.update(batch["reward_s"], batch["user_group"], batch["item_group"])
    rows = []
    for name, (batch, summary) in batches.items():
        q = cqr.quantiles(batch["reward_s"], batch["user_group"], batch["item_group"])
        rows.append(
            (
                name,
                summary["usage_s_per_session"],
                q.sum() / args.sessions,
                summary["requests_per_session"],
                summary["clicks_per_session"],
            )
        )
    best_usage = max(rows, key=lambda r: r[1])[0]
    best_cqr = max(rows, key=lambda r: r[2])[0]
    table = [
        "| ranking weights | usage s / session (the objective) | CQR reward / session | requests / session "
        "| clicks / session |",
        "|---|---:|---:|---:|---:|",
        *(f"| {n} | {u:.1f} | {q:.2f} | {r:.2f} | {c:.2f} |" for n, u, q, r, c in rows),
    ]
    text = "\n".join(
        [
            "# What CQR rewards, next to the objective",
            "",
            f"Machine: {machine()}. `python benchmarks/unex_rl_cqr.py --sessions {args.sessions}` "
            f"({time.perf_counter() - t0:.0f} s). World: the UNEX-RL learning test's (small, default preset); "
            "matching and pre-ranking at the learning test's joint oracle; the same users and random numbers "
            "for every setting; CQR cells fitted on every setting's requests together.",
            "",
            *table,
            "",
            f"Best by usage: **{best_usage}**. Best by the CQR reward: **{best_cqr}**.",
            "",
        ]
    )
    print(text)
    write_results(os.path.join(ROOT, "benchmarks", "results", "unex_rl_cqr.md"), [text], partial=False)


if __name__ == "__main__":
    main()
