"""What UNEX-RL's trained global critic believes about moving one stage to the oracle's setting, against the truth.

    python benchmarks/unex_rl_critic.py                       # 2 seeds × 2 learner options, about 8 min on 2 cores
    python benchmarks/unex_rl_critic.py --seeds 0 2 5 --jobs 2

For each set of learner options and seed: the learning test's run (benchmarks/learning_unex_rl.py: small world,
default preset, starved matching start, 30 iterations of 64 sessions), then, at the policies' mean action ā (a
static setting) and at ā with one stage replaced by the oracle's (and the oracle's whole setting):

    ΔQ   = mean over 100 fixed sessions' requests of Q_g(o_1, a) − Q_g(o_1, ā), in seconds (× reward_scale_s);
    Δtrue = usage per session of a − usage of ā, both on the evaluation's 1 000 users with common random numbers.

A critic whose ΔQ is small or of the wrong sign where Δtrue is large cannot lead the policies there: the policy
gradient and the action search both follow Q_g. Q_g is a discounted (γ = 0.9) return from one request, not a
session's usage, so only signs and relative sizes compare. Writes benchmarks/results/unex_rl_critic.md.
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
from actors.stages import STAGE_ACTION_HIGH, STAGES  # noqa: E402 (after sys.path: run as a script)
from benchmarks.common import init_ray_worker, machine, write_results  # noqa: E402
from benchmarks.learning_unex_rl import EVAL_SEED, WORLDS  # noqa: E402
from benchmarks.unex_rl_sensitivity import ORACLE  # noqa: E402
from rllib_policies.unex_rl import UnexRLConfig  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "unex_rl_critic.md")
OPTIONS = {  # label → learner options
    "defaults (16 updates an iteration, policies on every 2nd)": {},
    "critic fitted 4× as often (64 updates, policies on every 8th)": {"updates_per_iteration": 64, "policy_delay": 8},
}
ITERATIONS, EVAL_SESSIONS, Q_SESSIONS = 30, 1000, 100


def candidates(mean: dict) -> dict[str, dict]:
    """ā, ā with each stage at the oracle's setting, and the oracle's setting."""
    oracle = {s: np.asarray(v, np.float32) for s, v in ORACLE.items()}
    out = {"the policies' mean ā": mean}
    out.update({f"ā, {s} at the oracle's": {**mean, s: oracle[s]} for s in STAGES})
    out["the oracle's setting"] = oracle
    return out


def probe(job: tuple[str, dict, int]) -> dict:
    """Train one run, then the critic's and the world's view of each candidate."""
    import torch

    from rllib_policies.unex_rl.learner import CRITIC
    from rllib_policies.unex_rl.learning import build_learner, static_policies, usage_per_session
    from rllib_policies.unex_rl.sampler import sample_sessions

    label, options, seed = job
    t0 = time.perf_counter()
    algo = build_learner({"preset": "default", **WORLDS["small"]}, "unex_rl", seed, **options)
    try:
        for _ in range(ITERATIONS):
            algo.train()
        pipeline, scale = algo.pipeline, algo.config.reward_scale_s
        deployed = usage_per_session(pipeline, algo.deployed_policies, EVAL_SESSIONS, EVAL_SEED)
        batch, _ = sample_sessions(
            pipeline, algo.deployed_policies, Q_SESSIONS, np.random.default_rng(1), explore=False, users_seed=1
        )
        mean = {s: batch[f"act_{s}"].mean(axis=0) for s in STAGES}
        critic = algo.learner_group._learner.module[CRITIC].unwrapped()  # the local learner (num_learners=0)
        obs = torch.as_tensor(batch["obs_matching"])
        rows = {}
        for name, params in candidates(mean).items():
            scaled = np.concatenate([np.asarray(params[s], np.float32) / STAGE_ACTION_HIGH[s] for s in STAGES])
            with torch.no_grad():
                q = float(critic.value(obs, torch.as_tensor(scaled).expand(len(obs), -1), 0).mean()) * scale
            true = usage_per_session(pipeline, static_policies(params), EVAL_SESSIONS, EVAL_SEED)
            rows[name] = {"q_s": q, "usage_s": true}
    finally:
        algo.stop()
    return {
        "options": label,
        "seed": seed,
        "deployed_usage_s": deployed,
        "mean_action": {s: mean[s].round(3).tolist() for s in STAGES},
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }


def page(runs: list[dict], command: str, wall_s: float) -> str:
    lines = [
        "# UNEX-RL: what the global critic believes about the oracle's stage settings",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}. Command: `{command}` "
        f"({wall_s:.0f} s wall, runs two at a time). Each run is the learning test's (small world, default preset, "
        "starved matching start, 30 iterations of 64 sessions). Candidates: the trained policies' mean action ā as a "
        "static setting, ā with one stage at the oracle's setting, and the oracle's setting. ΔQ: the critic's mean "
        "Q_g(o_1, a) − Q_g(o_1, ā) over 100 fixed sessions' requests, in seconds (a discounted return from one "
        f"request, γ = {UnexRLConfig().gamma}: compare signs and relative sizes, not values). Δtrue: usage per "
        "session of a minus that "
        "of ā on the evaluation's 1 000 users with common random numbers.",
        "",
        "| learner options | seed | deployed usage s | candidate | ΔQ (s) | Δtrue usage (s / session) | signs agree |",
        "|---|---:|---:|---|---:|---:|:---:|",
    ]
    agree: dict[str, list[bool]] = {}
    for r in runs:
        base = r["rows"]["the policies' mean ā"]
        for name, v in r["rows"].items():
            if name == "the policies' mean ā":
                continue
            dq, dt = v["q_s"] - base["q_s"], v["usage_s"] - base["usage_s"]
            ok = (dq > 0) == (dt > 0)
            agree.setdefault(r["options"], []).append(ok)
            lines.append(
                f"| {r['options']} | {r['seed']} | {r['deployed_usage_s']:.1f} | {name} | {dq:+.2f} | {dt:+.2f} | "
                f"{'yes' if ok else 'no'} |"
            )
    lines += ["", "| learner options | candidates whose ΔQ has Δtrue's sign | mean deployed usage s | wall s per run |"]
    lines.append("|---|---:|---:|---:|")
    for label in agree:
        mine = [r for r in runs if r["options"] == label]
        lines.append(
            f"| {label} | {sum(agree[label])} / {len(agree[label])} | "
            f"{np.mean([r['deployed_usage_s'] for r in mine]):.1f} | {np.mean([r['wall_s'] for r in mine]):.0f} |"
        )
    lines += ["", "Mean actions after training:", "", "| learner options | seed | matching | pre-ranking | ranking |"]
    lines.append("|---|---:|---|---|---|")
    lines += [
        f"| {r['options']} | {r['seed']} | {r['mean_action']['matching']} | {r['mean_action']['pre_ranking']} | "
        f"{r['mean_action']['ranking']} |"
        for r in runs
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    started = time.time()
    jobs = [(label, options, seed) for label, options in OPTIONS.items() for seed in args.seeds]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=init_ray_worker) as pool:
        runs = []
        for r in pool.map(probe, jobs):
            runs.append(r)
            print(json.dumps(r, default=float), flush=True)
    command = "python benchmarks/unex_rl_critic.py" + (
        f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 2] else ""
    )
    text = page(runs, command, time.time() - started)
    print(text)
    write_results(RESULTS, [text], partial=False)


if __name__ == "__main__":
    main()
