"""PRL-PUTS on our world: personalised utility weights vs the best global fixed weights.

    python benchmarks/utility_agent.py                 # study + latency, ~9 minutes on 2 cores
    python benchmarks/utility_agent.py --part study --sessions 1500 --eval-sessions 300

(a) the study (rllib_policies/utility_agent/study.py): uniform exploration logs over the 49-action
grid → offline training of the two-head Q agent → 25-point λ sweep, every π_λ evaluated by reward
at hit on held-out users' logs and by whole sessions on the simulator (common users and draws for
every policy); baselines: each of the 49 global weight vectors, and per λ the static policy fixed at
π_λ's average weights. (b) the added latency of asking the agent per request vs fixed weights, on
POST /recommend at fixed offered load. Writes benchmarks/results/utility_agent.{md,png,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import (  # noqa: E402 (after the sys.path line: run as a script)
    add_load_args,
    http_table,
    machine,
    run_loadgen,
    run_server_configs,
    wait_for,
    write_results,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
OUT_DIR = os.path.join(tempfile.gettempdir(), "morl-bench-utility-agent")
PAPER = (
    "PRL-PUTS (arXiv 2605.16344) reports that sweeping λ traces a frontier that dominates the global "
    "fixed-weight grid, with the gain coming from personalisation (the static policy at the agent's average "
    "weights does not reproduce it)."
)


def pm(value, ci, digits=3) -> str:
    return f"{value:.{digits}f} ± {ci:.{digits}f}"


def frontier_table(art: dict) -> str:
    lines = [
        "| λ | off-policy clicks | off-policy long views | ESS | exact clicks | exact long views | simulator clicks "
        "| simulator long views | non-dominated (off-policy / simulator) | distinct actions "
        "| mean weights (w_lv, w_buy) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---|",
    ]
    for p in art["points"]:
        o, s, e = p["off_policy"], p.get("simulator", {}), p.get("exact")
        sim = (pm(s["clicks"], s["clicks_ci"]), pm(s["long_views"], s["long_views_ci"], 4)) if s else ("–", "–")
        ex = (f"{e['clicks']:.3f}", f"{e['long_views']:.4f}") if e else ("–", "–")
        mw = p["action_distribution"]["mean_weights"]
        lines.append(
            f"| {p['lambda']:.3f} | {pm(o['clicks'], o['clicks_ci'])} | {pm(o['long_views'], o['long_views_ci'], 4)} | "
            f"{o['ess']:.0f} | {ex[0]} | {ex[1]} | {sim[0]} | {sim[1]} | "
            f"{'✓' if p['non_dominated_off_policy'] else '·'} / "
            f"{'✓' if p.get('non_dominated_simulator') else '·'} | {p['action_distribution']['distinct_actions']} | "
            f"({mw[1]:.2f}, {mw[2]:.1f}) |"
        )
    return "\n".join(lines)


def global_table(art: dict) -> str:
    """The global fixed-weight vectors that are non-dominated on the simulator (or off-policy)."""
    from rllib_policies.utility_agent import non_dominated

    rows = art["meta"]["global_fixed"]
    key = "simulator" if "simulator" in rows[0] else "off_policy"
    nd = non_dominated(np.array([[r[key]["clicks"], r[key]["long_views"]] for r in rows]))
    lines = [
        "| action | weights (w_click, w_long_view, w_purchase) | off-policy clicks | off-policy long views | "
        "exact clicks | exact long views | simulator clicks | simulator long views |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r, keep in zip(rows, nd):
        if keep:
            o, s = (
                r["off_policy"],
                r.get(
                    "simulator", {"clicks": np.nan, "clicks_ci": np.nan, "long_views": np.nan, "long_views_ci": np.nan}
                ),
            )
            e = r.get("exact", {"clicks": np.nan, "long_views": np.nan})
            lines.append(
                f"| {r['action']} | {tuple(round(w, 2) for w in r['weights'])} | {pm(o['clicks'], o['clicks_ci'])} | "
                f"{pm(o['long_views'], o['long_views_ci'], 4)} | {e['clicks']:.3f} | {e['long_views']:.4f} | "
                f"{pm(s['clicks'], s['clicks_ci'])} | "
                f"{pm(s['long_views'], s['long_views_ci'], 4)} |"
            )
    return "\n".join(lines)


def lift_table(art: dict) -> str:
    lines = [
        "| λ | best global weights (by λ on train logs) | Δ clicks vs best global | Δ long views vs best global "
        "| Δ scalarised (σ units) | Δ clicks vs static average | Δ long views vs static average "
        "| Δ scalarised vs static |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in art["points"]:
        if "lift_vs_best_global" not in p:
            continue
        g, s = p["lift_vs_best_global"], p["lift_vs_static_average"]
        lines.append(
            f"| {p['lambda']:.3f} | {tuple(round(w, 2) for w in p['best_global_weights'])} | "
            f"{pm(g['clicks'], g['clicks_ci'], 4)} | {pm(g['long_views'], g['long_views_ci'], 4)} | "
            f"{pm(g['scalarised'], g['scalarised_ci_bound'], 4)} | {pm(s['clicks'], s['clicks_ci'], 4)} | "
            f"{pm(s['long_views'], s['long_views_ci'], 4)} | {pm(s['scalarised'], s['scalarised_ci_bound'], 4)} |"
        )
    return "\n".join(lines)


def cohort_table(art: dict) -> str:
    from actors.world import COHORTS

    lines = [
        "| λ | cohort | mean weights (w_lv, w_buy) | off-policy clicks | off-policy long views | simulator clicks | "
        "simulator long views |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for p in art["points"][:: max(1, len(art["points"]) // 4)]:
        for c in COHORTS:
            if c not in p["cohort_mean_weights"]:
                continue
            o, s = p["off_policy"]["cohorts"][c], p.get("simulator", {}).get("cohorts", {}).get(c)
            mw = p["cohort_mean_weights"][c]
            sim = f"{pm(s['clicks'], s['clicks_ci'])} | {pm(s['long_views'], s['long_views_ci'], 4)}" if s else "– | –"
            lines.append(
                f"| {p['lambda']:.3f} | {c} | ({mw[1]:.2f}, {mw[2]:.1f}) | {pm(o['clicks'], o['clicks_ci'])} | "
                f"{pm(o['long_views'], o['long_views_ci'], 4)} | {sim} |"
            )
    return "\n".join(lines)


def hypervolume_table(art: dict) -> str:
    lines = [
        "| evaluation | personalised π_λ | global fixed weights | static average weights "
        "| ratio personalised / global |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, name in (
        ("hypervolume_off_policy", "off-policy (held-out logs)"),
        ("hypervolume_exact", "exact, held-out states"),
        ("hypervolume_simulator", "simulator, whole sessions"),
    ):
        hv = art["meta"].get(key)
        if hv:
            ratio = hv["personalised"] / hv["global_fixed"] if hv["global_fixed"] else float("nan")
            lines.append(
                f"| {name} | {hv['personalised']:.5f} | {hv['global_fixed']:.5f} | "
                f"{hv.get('static_average', float('nan')):.5f} | {ratio:.3f} |"
            )
    return "\n".join(lines)


def serve_latency(config: str, rates: list[int], duration: float, warmup: float) -> list[dict]:
    """Child process: recommend app with fixed per-request weights, or with the trained agent."""
    import ray
    from ray import serve

    from serve_apps import inner_reward, recommend
    from serve_apps.launch import start_local_ray

    start_local_ray(num_cpus=2, ingress="haproxy")
    serve.start(http_options={"host": "127.0.0.1", "port": 8000}, logging_config={"enable_access_log": False})
    serve.run(inner_reward.app_builder({}), name="inner_reward", route_prefix="/ir")
    args = {"world": {"n_items": 5000, "n_users": 4000}}
    if config == "agent":
        args["utility_agent"] = {
            "mode": "agent",
            "path": os.path.join(OUT_DIR, "agent.pt"),
            "frontier": os.path.join(OUT_DIR, "frontier.json"),
        }
    serve.run(recommend.app_builder(args), name="recommend", route_prefix="/")
    assert wait_for("http://127.0.0.1:8000/healthz"), "nothing answers on :8000"
    body = {"user_id": 42, "history": [1, 2, 3], "step": 1}
    if config == "fixed":
        body["ranking_weights"] = [1.0, 1.0, 10.0]
    f = tempfile.NamedTemporaryFile(delete=False, suffix=".json")
    f.write(json.dumps(body).encode())
    f.close()
    results = []
    try:
        for rate in rates:
            res = run_loadgen(8000, "/recommend", f.name, "application/json", rate, duration, warmup)
            res.update(
                route=f"recommend, {'agent picks w (λ sweep point)' if config == 'agent' else 'fixed w in request'}"
            )
            results.append(res)
            print(f"    {config} @ {rate} req/s: p50 {res['p50_ms']} p99 {res['p99_ms']}", file=sys.stderr, flush=True)
    finally:
        os.unlink(f.name)
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "study", "latency"], default="all")
    parser.add_argument("--sessions", type=int, default=20000, help="exploration sessions")
    parser.add_argument("--eval-sessions", type=int, default=1500, help="simulated sessions per evaluated policy")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=RESULTS, help="where the page, plots and frontier copy go")
    add_load_args(parser, "25,50", "--serve-config")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    os.makedirs(args.results_dir, exist_ok=True)
    if args.serve_config:
        print("RESULT " + json.dumps(serve_latency(args.serve_config, rates, args.duration, args.warmup)), flush=True)
        return
    sections = [
        f"# Utility-weight agent (PRL-PUTS) on the simulated world\n\nMeasured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. Command: "
        f"`python benchmarks/utility_agent.py` (one run, seed {args.seed}).\n\n{PAPER}\n"
    ]
    if args.part in ("all", "study"):
        from rllib_policies.jobs import init_ray
        from rllib_policies.utility_agent.study import StudyConfig, run_study

        init_ray(2)
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        cfg = StudyConfig(
            out_dir=OUT_DIR,
            exploration_sessions=args.sessions,
            eval_sessions=args.eval_sessions,
            iterations=args.iterations,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        art = run_study(cfg)
        minutes = (time.perf_counter() - t0) / 60
        meta = art["meta"]
        shutil.copy(os.path.join(OUT_DIR, "frontier.png"), os.path.join(args.results_dir, "utility_agent.png"))
        shutil.copy(
            os.path.join(OUT_DIR, "frontier_cohorts.png"), os.path.join(args.results_dir, "utility_agent_cohorts.png")
        )
        shutil.copy(
            os.path.join(OUT_DIR, "frontier.json"), os.path.join(args.results_dir, "utility_agent_frontier.json")
        )
        tables = {
            "frontier": frontier_table(art),
            "global": global_table(art),
            "hv": hypervolume_table(art),
            "lift": lift_table(art),
            "cohort": cohort_table(art),
        }
        for t in tables.values():
            print(t + "\n")
        sections.append(
            f"## (a) The frontier\n\nWorld: 5 000 items, 4 000 users. Exploration: {meta['data'].get('sessions', '?')} "
            f"sessions, {meta['data']['train_rows']} training / {meta['data']['holdout_rows']} held-out requests "
            f"(split by user), actions uniform over the 7 × 7 grid (w_click = 1, w_long_view ∈ [0, 2], w_purchase ∈ "
            f"[0, 40]). Heads: clicks and long views (≥ 18 s) per request. Agent: {cfg.iterations} passes, "
            f"final R² clicks {meta['training'][-1]['r2_head0']:.3f}, "
            f"long views {meta['training'][-1]['r2_head1']:.3f}. "
            f"Simulator: {meta.get('eval_sessions', 0)} whole sessions per policy, the same users and draws for every "
            f"policy. Exact = the simulator's expected clicks / long views of each policy's own slates at the held-out "
            f"logged states (what reward at hit estimates, no sampling noise). 95 % CIs: delta method clustered by "
            f"user "
            f"(off-policy), session-clustered (simulator). Study wall time "
            f"{minutes:.1f} min.\n\n![frontier](utility_agent.png)\n\n" + tables["frontier"] + "\n"
        )
        sections.append("## Global fixed weights: the non-dominated ones\n\n" + tables["global"] + "\n")
        sections.append(
            "## Hypervolume (reference point: the worst value of each objective over all evaluated "
            "policies)\n\n" + tables["hv"] + "\n"
        )
        sections.append(
            "## Lift per operating point (simulator, paired on users and draws)\n\nBest global = the grid "
            "vector maximising λ·clicks/σ + (1 − λ)·long views/σ by reward at hit on the training logs; "
            "static average = π_λ's mean weight vector served to everyone. Scalarised Δ uses the same "
            "σ-scaled λ weights; its ± is a conservative bound (sum of the scaled per-objective CIs).\n\n"
            + tables["lift"]
            + "\n"
        )
        sections.append(
            "## Per cohort (every ~6th λ)\n\n![per cohort](utility_agent_cohorts.png)\n\n" + tables["cohort"] + "\n"
        )
    if args.part in ("all", "latency"):
        if not os.path.exists(os.path.join(OUT_DIR, "agent.pt")):
            sys.exit("no trained agent: run --part study first")
        print("(b) added latency of the agent on /recommend", flush=True)
        table = http_table(
            run_server_configs(__file__, "--serve-config", ["fixed", "agent"], rates, args.duration, args.warmup)
        )
        print(table)
        sections.append(
            "## (b) Added latency of the agent\n\nPOST /recommend (5 000 items) with the weights in the "
            "request vs. without (the ingress asks the agent deployment in parallel with matching and "
            "pre-ranking: user features + Q for all 49 actions, batched), 64 connections, open loop from "
            f"`benchmarks/loadgen` on the same 2 cores, {args.duration:.0f} s per rate.\n\n" + table + "\n"
        )
    write_results(os.path.join(args.results_dir, "utility_agent.md"), sections, partial=args.part != "all")


if __name__ == "__main__":
    main()
