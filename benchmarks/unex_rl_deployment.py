"""Which of UNEX-RL's trained policies to deploy: the latest, an average of the iterates, or a static setting.

    python benchmarks/unex_rl_deployment.py                  # 10 seeds, two runs at a time: about 8 min on 2 cores
    python benchmarks/unex_rl_deployment.py --seeds 2 --iterations 2 --eval-sessions 50   # a smoke run

Each seed trains the learning test's run (benchmarks/learning_unex_rl.py: small world, default preset, starved
matching start, 30 iterations of 64 sessions, default options) once; every deployment rule is then evaluated on
the same 1 000 evaluation users with common random numbers, so the rules compare paired by seed:

    latest        the stage policies after the last iteration (what UNEX-RL deploys);
    ema α         θ̄ ← α·θ + (1 − α)·θ̄ after every iteration (Polyak–Ruppert averaging of the policies' weights),
                  from the first iterate on: a small α still carries the iterates from before the take-off;
    tail w        the mean of the last w iterates' weights (stochastic weight averaging's tail; fewer if fewer ran);
    static ā      every stage at its mean deterministic action ā over 200 fixed sessions' requests (a static
                  setting, as the oracle's is), and each stage alone at ā with the others learned.

If the plateau's oscillation were noise around a good centre, the averages would beat the latest; if the
policies' dependence on the request hurt, ā would. Gap closed against the oracle's best static setting
(benchmarks/unex_rl_sensitivity.ORACLE). Writes benchmarks/results/unex_rl_deployment.md and its JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.stages import STAGES  # noqa: E402 (after sys.path: run as a script)
from actors.world.metrics import gap_closed, mean_ci  # noqa: E402
from benchmarks.common import init_ray_worker, machine, write_results  # noqa: E402
from benchmarks.learning_unex_rl import EVAL_SEED, WORLDS  # noqa: E402
from benchmarks.unex_rl_sensitivity import ORACLE  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "unex_rl_deployment.md")
ALPHAS, TAILS = (0.1, 0.2, 0.3, 0.5), (5, 10)
ENV = {"preset": "default", **WORLDS["small"]}


def average(weights: list[dict]) -> dict:
    """The element-wise mean of several {stage: {name: array}} weight sets."""
    return {s: {k: np.mean([w[s][k] for w in weights], axis=0) for k in weights[0][s]} for s in STAGES}


def polyak(mean: dict, weights: dict, alpha: float) -> dict:
    """θ̄ ← α·θ + (1 − α)·θ̄ for every stage's weights."""
    return {s: {k: alpha * weights[s][k] + (1 - alpha) * mean[s][k] for k in weights[s]} for s in STAGES}


def run(job: tuple[int, int, int]) -> dict:
    """Train one seed; every deployment rule's usage per session on the evaluation users."""
    from rllib_policies.unex_rl.algorithm import _weights
    from rllib_policies.unex_rl.learning import build_learner, mean_action, static_policies, usage_per_session

    seed, iterations, eval_sessions = job
    t0 = time.perf_counter()
    algo = build_learner(ENV, "unex_rl", seed)
    try:
        pipeline = algo.pipeline

        def usage(policies) -> float:
            return usage_per_session(pipeline, policies, eval_sessions, EVAL_SEED)

        start = usage(algo.stage_policies)
        iterates, ema = [], dict.fromkeys(ALPHAS)
        for _ in range(iterations):
            algo.train()
            w = _weights(algo.stage_policies)
            iterates = [*iterates, w][-max(TAILS) :]
            for a in ALPHAS:
                ema[a] = w if ema[a] is None else polyak(ema[a], w, a)
        rules = {"latest": usage(algo.stage_policies)}
        rules.update({f"ema α {a}": usage(algo._policies(ema[a])) for a in ALPHAS})
        rules.update({f"tail {t}": usage(algo._policies(average(iterates[-t:]))) for t in TAILS})
        mean = mean_action(pipeline, algo.stage_policies, 200)
        rules["static ā (every stage)"] = usage(static_policies(mean))
        for s in STAGES:
            rules[f"{s} alone at ā"] = usage({**algo.stage_policies, s: static_policies(mean)[s]})
    finally:
        algo.stop()
    return {
        "seed": seed,
        "start": start,
        "rules": rules,
        "mean_action": {s: mean[s].round(3).tolist() for s in STAGES},
        "wall_s": time.perf_counter() - t0,
    }


def page(record: dict) -> str:
    runs, target = record["runs"], record["oracle_usage_s"]
    gaps = {rule: [gap_closed(r["start"], r["rules"][rule], target) for r in runs] for rule in runs[0]["rules"]}
    latest = np.asarray(gaps["latest"])
    lines = [
        "# UNEX-RL: which trained policies to deploy",
        "",
        f"Measured {record['measured']} on {record['machine']}. Command: `{record['command'].strip()}` "
        f"({record['wall_s']:.0f} s wall, {record.get('jobs', 2)} runs at a time). {len(runs)} seeds, "
        f"{record['iterations']} iterations of 64 sessions each, default options; every rule on the same "
        f"{record['eval_sessions']} evaluation users with common random numbers. Oracle's best static setting: "
        f"{target:.1f} s per session; starts {np.mean([r['start'] for r in runs]):.1f} s.",
        "",
        "| deployment rule | gap closed (95 % CI) | against the latest, paired by seed (95 % CI) | per seed |",
        "|---|---:|---:|---|",
    ]
    for rule, g in gaps.items():
        m, h = mean_ci(100 * np.asarray(g))
        dm, dh = mean_ci(100 * (np.asarray(g) - latest))
        paired = "—" if rule == "latest" else f"{dm:+.1f} ± {dh:.1f}"
        lines.append(f"| {rule} | {m:.0f} % ± {h:.0f} | {paired} | {' / '.join(f'{100 * x:.0f}' for x in g)} % |")
    lines += [
        "",
        "Mean actions ā after training:",
        "",
        "| seed | matching | pre-ranking | ranking |",
        "|---:|---|---|---|",
    ]
    fmt = lambda a: "(" + ", ".join(f"{x:.2f}" for x in a) + ")"  # noqa: E731
    lines += [" | ".join(["", str(r["seed"]), *(fmt(r["mean_action"][s]) for s in STAGES), ""]).strip() for r in runs]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--eval-sessions", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--page-only", action="store_true", help="only rewrite the page from the results' JSON")
    args = p.parse_args()
    if args.page_only:
        with open(args.results.replace(".md", ".json")) as f:
            write_results(args.results, [page(json.load(f))], partial=False)
        return
    init_ray_worker()
    from actors.cascade import build_world  # noqa: PLC0415
    from rllib_policies.unex_rl.learning import static_policies, usage_per_session  # noqa: PLC0415

    t0 = time.time()
    target = usage_per_session(build_world(ENV)[1], static_policies(ORACLE), args.eval_sessions, EVAL_SEED)
    jobs = [(seed, args.iterations, args.eval_sessions) for seed in range(args.seeds)]
    runs = []
    with ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_ray_worker
    ) as pool:
        for r in pool.map(run, jobs):
            runs.append(r)
            print(f"  seed {r['seed']}: {r['start']:.1f} → latest {r['rules']['latest']:.1f} s, {r['wall_s']:.0f} s")
    record = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": " ".join(["python benchmarks/unex_rl_deployment.py", *sys.argv[1:]]),
        "jobs": args.jobs,
        "iterations": args.iterations,
        "eval_sessions": args.eval_sessions,
        "oracle_usage_s": target,
        "wall_s": time.time() - t0,
        "runs": runs,
    }
    with open(args.results.replace(".md", ".json"), "w") as f:
        json.dump(record, f, indent=1)
    text = page(record)
    print(text)
    write_results(args.results, [text], partial=False)


if __name__ == "__main__":
    main()
