"""The world's headroom: what the oracle says each decision family can achieve, per world preset.

    python benchmarks/headroom.py              # ~3 CPU-minutes; longer on busy shared cores
    python benchmarks/headroom.py --quick      # smaller sizes, for a look

For each preset (default, heterogeneous, cascade_0.9), on a fixed set of request states (the first
--requests requests of --users sessions served by the default cascade):

(a) ranking utility weights (a simplex grid, uniform in the heads' contribution shares, plus the default
    weights (1, 1, 10)): for each objective the reference value (the default weights), the best static
    vector, the best per cohort, per user and per request on the world's exact expectations, and their
    lifts over the best static vector in %;
(b) the per-user dispersion the preset produces under the default cascade (docs/world.md);
(c) matching × pre-ranking parameters on a product grid (ranking weights at their defaults), fewer states;
(d) the session objective J = NDCG + return + 0.3·revenue (simulated, not exact; 95 % t-intervals):
    best static and best per-cohort ranking weights, chosen on one set of sessions and re-measured on fresh ones.
Writes benchmarks/results/headroom.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "headroom.md")
REFERENCE = np.array([1.0, 1.0, 10.0])


def ranking_table(preset: str, args) -> tuple[list[str], list[str], float]:
    """(a) and (b) for one preset: table rows, dispersion row, wall seconds."""
    from actors.cascade import Pipeline
    from actors.world import World, WorldConfig
    from actors.world.oracle import (
        Family,
        Scalarised,
        action_values,
        head_means,
        ranking_grid,
        sample_states,
        user_rates,
    )

    t0 = time.perf_counter()
    pipeline = Pipeline(World(WorldConfig.preset(preset)))
    states = sample_states(pipeline, args.users, args.requests, seed=args.seed)
    family, ref = Family.ranking(ranking_grid(args.resolution, head_means(pipeline, states))).with_action(REFERENCE)
    values = action_values(pipeline, states, family)
    wall = time.perf_counter() - t0
    objectives = [
        "clicks",
        "long_views",
        Scalarised(0.0),
        Scalarised(0.5),
        Scalarised(1.0),
        "purchases",
        "revenue",
        "ndcg",
    ]
    rows = []
    for objective in objectives:
        h = values.headroom(objective, ref)
        w = family.stage_grid("ranking")[h.static_action]
        rows.append(
            f"| {preset} | {h.objective} | {h.reference:.4f} | {h.static:.4f} | {h.cohort:.4f} | {h.user:.4f} | "
            f"{h.request:.4f} | {h.lift('reference'):+.2f} | {h.lift('cohort'):+.2f} | {h.lift('user'):+.2f} | "
            f"{h.lift('request'):+.2f} | {w[0]:.3f}, {w[1]:.3f}, {w[2]:.3f} |"
        )
        print(rows[-1], flush=True)
    rates = user_rates(pipeline, states)
    q = {k: np.percentile(v, [10, 50, 90]) for k, v in rates.items()}
    cv = {k: v.std() / v.mean() for k, v in rates.items()}
    ctr, lv, buy = q["ctr"], q["long_views_per_click"], q["purchases_per_click"]
    disp = (
        f"| {preset} | {states.n_users} | {ctr[0]:.3f} / {ctr[1]:.3f} / {ctr[2]:.3f} | {cv['ctr']:.2f} | "
        f"{lv[0]:.3f} / {lv[1]:.3f} / {lv[2]:.3f} | {cv['long_views_per_click']:.2f} | {buy[1] * 100:.2f} | "
        f"{cv['purchases_per_click']:.2f} |"
    )
    print(disp, flush=True)
    meta = f"{preset}: {len(states)} states of {states.n_users} users, {family.size} weight vectors, {wall:.0f} s"
    return rows, [disp, meta], wall


def stage_table(preset: str, args) -> tuple[list[str], str]:
    """(c): matching (w_history, exploration) × pre-ranking (w_popularity, w_quality), ranking at (1, 1, 10)."""
    from actors.cascade import Pipeline
    from actors.world import World, WorldConfig
    from actors.world.oracle import Family, Scalarised, action_values, sample_states

    t0 = time.perf_counter()
    pipeline = Pipeline(World(WorldConfig.preset(preset)))
    states = sample_states(pipeline, args.stage_users, args.requests, seed=args.seed)
    matching = np.array([[1.0, 0.05, h, e] for h in (0.0, 0.5, 1.0) for e in (0.05, 0.2)])
    pre_ranking = np.array([[1.0, p, q] for p in (0.0, 0.1, 0.3) for q in (0.0, 0.5, 1.0)])
    family, ref = Family.stages(matching=matching, pre_ranking=pre_ranking).with_action({})
    values = action_values(pipeline, states, family)
    wall = time.perf_counter() - t0
    rows = []
    for objective in ("clicks", "long_views", Scalarised(0.5), "ndcg"):
        h = values.headroom(objective, ref)
        m, p = family.stage_grid("matching")[h.static_action], family.stage_grid("pre_ranking")[h.static_action]
        rows.append(
            f"| {preset} | {h.objective} | {h.reference:.4f} | {h.static:.4f} | {h.lift('reference'):+.2f} | "
            f"{h.lift('cohort'):+.2f} | {h.lift('user'):+.2f} | {h.lift('request'):+.2f} | "
            f"h {m[2]:g}, expl {m[3]:g}; pop {p[1]:g}, q {p[2]:g} |"
        )
        print(rows[-1], flush=True)
    return rows, f"{preset}: {len(states)} states of {states.n_users} users, {family.size} actions, {wall:.0f} s"


def session_table(preset: str, args) -> tuple[str, str]:
    """(d): simulated J, best static and per cohort over a coarse ranking grid."""
    from actors.cascade import Pipeline
    from actors.world import World, WorldConfig
    from actors.world.oracle import Family, head_means, ranking_grid, sample_states, session_headroom

    t0 = time.perf_counter()
    pipeline = Pipeline(World(WorldConfig.preset(preset)))
    scale = head_means(pipeline, sample_states(pipeline, 200, 2, seed=args.seed))
    family = Family.ranking(ranking_grid(2, scale))
    h = session_headroom(pipeline, family, n_sessions=args.sessions, seed=args.seed, reference=REFERENCE)
    wall = time.perf_counter() - t0
    f = lambda m_ci: f"{m_ci[0]:.4f} ± {m_ci[1]:.4f}"  # noqa: E731
    grid = family.with_action(REFERENCE)[0].stage_grid("ranking")  # the actions session_headroom searched
    w = lambda a: "(" + ", ".join(f"{x:.3f}" for x in grid[a]) + ")"  # noqa: E731
    row = (
        f"| {preset} | {f(h.reference)} | {f(h.static)} | {f(h.cohort)} | {f(h.cohort_minus_static)} | "
        f"{w(h.static_action)} | {', '.join(f'{c} {w(a)}' for c, a in h.cohort_actions.items())} |"
    )
    print(row, flush=True)
    return (
        row,
        f"{preset}: {h.n_actions} actions × {h.n_sessions} sessions (selection) + 3 × {h.n_sessions} (evaluation), "
        f"{wall:.0f} s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="default,heterogeneous,cascade_0.9")
    parser.add_argument("--users", type=int, default=800, help="users whose sessions give the states")
    parser.add_argument("--requests", type=int, default=6, help="first requests of each session used as states")
    parser.add_argument("--resolution", type=int, default=12, help="simplex grid resolution r: (r+1)(r+2)/2 vectors")
    parser.add_argument("--stage-users", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=200, help="sessions per setting for the simulated J")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="users 300, stage users 100, sessions 100, resolution 8")
    args = parser.parse_args()
    if args.quick:
        args.users, args.stage_users, args.sessions, args.resolution = 300, 100, 100, 8
    presets = args.presets.split(",")
    t_start = time.perf_counter()
    ranking_rows, disp_rows, metas = [], [], []
    for preset in presets:
        rows, (disp, meta), _ = ranking_table(preset, args)
        ranking_rows += rows
        disp_rows.append(disp)
        metas.append(meta)
    stage_rows, stage_metas = [], []
    for preset in presets[:2]:
        rows, meta = stage_table(preset, args)
        stage_rows += rows
        stage_metas.append(meta)
    session_rows, session_metas = [], []
    for preset in presets[:2]:
        row, meta = session_table(preset, args)
        session_rows.append(row)
        session_metas.append(meta)
    total = time.perf_counter() - t_start

    head = (
        "| preset | objective | reference (1, 1, 10) | best static | per cohort | per user | per request | "
        "reference vs static % | cohort lift % | user lift % | request lift % | best static w (simplex) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    disp_head = (
        "| preset | users | per-user CTR q10 / q50 / q90 | CTR cv | long views per click q10 / q50 / q90 | cv | "
        "purchases per click, median % | cv |\n|---|---:|---|---:|---|---:|---:|---:|"
    )
    stage_head = (
        "| preset | objective | reference (defaults) | best static | reference vs static % | cohort lift % | "
        "user lift % | request lift % | best static |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    session_head = (
        "| preset | reference (1, 1, 10) | best static | best per cohort | per cohort − static (paired) | "
        "best static w (simplex) | per-cohort w |\n|---|---:|---:|---:|---:|---:|---|"
    )
    sections = [
        "# Headroom: what the world's oracle says is achievable\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()} (shared with other jobs). "
        f"Command: `python benchmarks/headroom.py` (seed {args.seed}); "
        f"total wall time {total:.0f} s. The oracle is `actors/world/oracle.py`; the method and the presets are in "
        "docs/world.md.\n",
        "## (a) Ranking utility weights, exact expectations\n\n"
        f"States: the first {args.requests} requests of {args.users} sessions (distinct users) served by the default "
        f"cascade. Actions: {(args.resolution + 1) * (args.resolution + 2) // 2 + 1} — the simplex grid of "
        f"resolution {args.resolution} ((r+1)(r+2)/2 weight vectors, uniform in the heads' contribution shares) "
        "plus the default weights (1, 1, 10). Values are per request. λ = 1 is clicks/σ, λ = 0 long views/σ "
        "(σ: std of the KPI over all states × actions). Per user is in-sample over a user's states (an upper "
        "bound on what a user-level policy can reach; it shrinks toward the per-user truth as states per user "
        "grow).\n\n" + head + "\n" + "\n".join(ranking_rows) + "\n\n" + "\n".join(f"- {m}" for m in metas) + "\n",
        "## (b) Per-user dispersion under the default cascade (exact expected rates over each user's states)\n\n"
        + disp_head
        + "\n"
        + "\n".join(disp_rows)
        + "\n",
        "## (c) Matching × pre-ranking parameters (ranking weights (1, 1, 10)), exact expectations\n\n"
        "Matching w_history ∈ {0, 0.5, 1} × exploration ∈ {0.05, 0.2}; pre-ranking w_popularity ∈ {0, 0.1, 0.3} × "
        "w_quality ∈ {0, 0.5, 1}; 54 actions + the defaults. The per-request lifts include the matching stage's "
        "exploration noise, which is held fixed per state.\n\n"
        + stage_head
        + "\n"
        + "\n".join(stage_rows)
        + "\n\n"
        + "\n".join(f"- {m}" for m in stage_metas)
        + "\n",
        "## (d) Session objective J = NDCG@10 + P(return) + 0.3·revenue per session — simulated, not exact\n\n"
        "Ranking weights on the resolution-2 simplex (6 vectors) + (1, 1, 10). Selection on one set of sessions "
        "(common random numbers across actions), values re-measured on fresh users with fresh common random "
        "numbers; ± is the 95 % t-interval half-width.\n\n"
        + session_head
        + "\n"
        + "\n".join(session_rows)
        + "\n\n"
        + "\n".join(f"- {m}" for m in session_metas)
        + "\n",
    ]
    write_results(RESULTS, sections, partial=False)


if __name__ == "__main__":
    main()
