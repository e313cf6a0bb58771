"""Offline RL for fusion ranking (issue 16): learner × dataset × seeds — true return, the critic's estimate, the
overestimation gap, the gap closed to the world's oracle, stability across seeds, and the off-policy gate's
decisions checked against the simulator.

    python benchmarks/offline_rl.py --jobs 2                                  # 9 learners × 5 datasets × 5 seeds
    python benchmarks/offline_rl.py --seeds 1 --iterations 2 --updates 20 --sessions-per-day 60 \
        --eval-sessions 100 --results-dir /tmp/offline_rl                     # a smoke run

Datasets (``rllib_policies.offline.data``): ``--days`` simulated days (2) of ``--sessions-per-day`` sessions
each, served by the behaviour policy, logged as served-item events, sessionised by the Ray Data job and flattened into
transitions. The expert of the imitation dataset is the oracle's best static weights per cohort. Every learner
gets the same gradient steps of the same batch size; every policy's true value is measured on the same users
with the same random numbers. Gap closed = (V(π) − V(worst)) / (V(oracle static) − V(worst)), V(worst) the
long-views-only weights' value (the world's worst static corner): uniformly random weights already sit within
~1 % of the oracle on this MDP, so a gap measured from them is noise. Where the behaviour is far from the oracle
(the misaligned dataset), the learning-tests measure applies too: the gap closed from the behaviour's value.
``--tag T`` writes offline_rl_T.md (and its PNG and runs JSON) beside the main page.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the Agg backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from actors.cascade import build_world  # noqa: E402 (after sys.path: run as a script)
from actors.world.metrics import mean_ci  # noqa: E402
from benchmarks.common import machine, write_results  # noqa: E402
from rllib_policies.offline.data import (  # noqa: E402
    DATASETS,
    LOGNORMAL_BEHAVIOURS,
    Expert,
    behaviour_value,
    eval_users,
    oracle_expert,
    support_ceiling,
    true_value,
    write_dataset,
)
from rllib_policies.offline.experiment import EXPLORING, LEARNERS, OfflineSpec, check_options, run_offline  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
FAR_FROM_ORACLE = 1.0  # session-return units: a behaviour this far below the oracle leaves a gap worth measuring


def _quiet() -> None:
    """Ray Data's progress lines and RLlib's new-stack notices off in the workers' output."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.rllib", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _worker_init() -> None:
    """One torch thread and a private local Ray, as ``init_ray_worker``, but with 2 logical CPUs: RLlib's offline
    pipeline (a pre-learner actor beside read tasks) and Ray Data jobs that ran before it hang on 1."""
    import ray
    import torch

    torch.set_num_threads(1)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-bench-")
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    _quiet()


def _run(job: tuple) -> dict:
    name, dataset, path, seed, spec = job
    return run_offline(name, dataset, path, seed, spec).row()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--updates", type=int, default=100, help="gradient steps per iteration")
    p.add_argument("--sessions-per-day", type=int, default=500, help="at most the world's users")
    p.add_argument("--days", type=int, default=2, help="simulated days of logs per dataset")
    p.add_argument("--eval-sessions", type=int, default=1000)
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="iterations between evaluations (each a checkpoint-selection candidate); default: a quarter of them",
    )
    p.add_argument("--oracle-sessions", type=int, default=1000)
    p.add_argument(
        "--exploration-rounds", type=int, default=2, help="the -EE learners' online rounds (at most iterations − 1)"
    )
    p.add_argument("--exploration-sessions", type=int, default=250, help="sessions an -EE learner serves per round")
    p.add_argument(
        "--exploration-noise",
        type=float,
        default=0.3,
        help="σ of the -EE learners' log-normal exploration around their policy",
    )
    p.add_argument(
        "--data-window",
        type=int,
        default=None,
        help="the row sets an -EE learner trains on after a round: the last N (the logs are the first); default all",
    )
    p.add_argument(
        "--options",
        type=json.loads,
        default={},
        help='learner → options (JSON), e.g. \'{"iql": {"beta": 30}}\'; an -EE learner takes its offline learner\'s',
    )
    p.add_argument(
        "--select-from",
        type=int,
        default=None,
        help="serve the iterate, among those evaluated from this many gradient steps on, with the highest gate lower "
        "bound (OPE-based checkpoint selection); default the last iterate",
    )
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="where the datasets go (default: a temporary folder)")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--tag", default=None, help="write offline_rl_<tag>.* instead of offline_rl.*")
    args = p.parse_args()
    try:
        check_options(args.options)
    except ValueError as e:
        p.error(f"--options: {e}")
    if args.eval_every is not None and args.eval_every < 1:
        p.error(f"--eval-every must be at least 1 iteration, got {args.eval_every}")
    t_start = time.time()
    _worker_init()
    spec = OfflineSpec(
        iterations=args.iterations,
        updates_per_iteration=args.updates,
        eval_every=args.eval_every if args.eval_every is not None else max(args.iterations // 4, 1),
        eval_sessions=args.eval_sessions,
        exploration_rounds=min(args.exploration_rounds, args.iterations - 1),  # each round needs training after it
        exploration_sessions=args.exploration_sessions,
        exploration_noise=args.exploration_noise,
        data_window=args.data_window,
        options=args.options,
        select_from=args.select_from,
    )
    try:
        for name in args.learners:
            spec.explore_after(name)
        spec.check_select_from()
    except ValueError as e:
        p.error(str(e))
    _, pipeline = build_world(spec.env_config)
    users = eval_users(pipeline, spec.eval_sessions, spec.eval_seed)
    t0 = time.time()
    expert = oracle_expert(pipeline, n_sessions=args.oracle_sessions)
    truth = {
        "oracle static": true_value(pipeline, expert.static_weights, users, spec.eval_seed),
        "oracle per cohort": true_value(pipeline, _cohort_policy(expert, pipeline), users, spec.eval_seed),
        "default (1, 1, 10)": true_value(pipeline, [1.0, 1.0, 10.0], users, spec.eval_seed),
        "long views only (0, 1, 0)": true_value(pipeline, [0.0, 1.0, 0.0], users, spec.eval_seed),
    }
    for kind in DATASETS:
        truth[f"behaviour: {kind}"] = behaviour_value(kind, pipeline, users, expert, spec.eval_seed)
    ceilings = {}
    for kind in (k for k in args.datasets if k in LOGNORMAL_BEHAVIOURS):
        ceiling = support_ceiling(kind, pipeline, users, spec.eval_seed)
        truth[f"support ceiling: {kind}"], ceilings[kind] = ceiling.value, ceiling.weights.tolist()
    oracle_s = time.time() - t0
    print(f"oracle and references in {oracle_s:.0f} s: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in truth.items()))

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="offline-rl-data-")
    paths, logged = {}, {}
    for kind in args.datasets:
        t0 = time.time()
        out = write_dataset(
            kind,
            spec.env_config,
            os.path.join(data_dir, kind),
            args.days,
            args.sessions_per_day,
            seed=0,
            expert=expert,
            engine="ray",
        )
        paths[kind], logged[kind] = out["path"], {**out, "seconds": time.time() - t0}
        seconds = time.time() - t0
        print(f"dataset {kind}: {out['sessions']} sessions, {out['transitions']} transitions ({seconds:.0f} s)")

    jobs = [(n, d, paths[d], s, spec) for n in args.learners for d in args.datasets for s in range(args.seeds)]
    jobs.sort(key=lambda j: not j[0].startswith("cql"))  # the slowest learners first: the pool ends together
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(  # fresh processes, each its own Ray: none of the datasets' Ray Data jobs is left
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
    ) as pool:
        futures = [(job, pool.submit(_run, job)) for job in jobs]
        runs, failed = [], []
        for (name, dataset, _, seed, _), future in futures:  # a failed run is reported; the others are kept
            try:
                runs.append(future.result())
            except Exception as e:  # noqa: BLE001 (any run's error: name it, keep the rest)
                failed.append(f"{name} {dataset} seed {seed}: {type(e).__name__}: {e}")
    train_wall = time.time() - t0
    if not runs:
        sys.exit("every run failed:\n" + "\n".join(failed))
    summary = {
        "args": vars(args),
        "spec": asdict(spec),
        "truth": {k: mean_ci(v) for k, v in truth.items()},
        "expert": {"cohort_weights": expert.cohort_weights.tolist(), "static_weights": expert.static_weights.tolist()},
        "support_ceiling_weights": ceilings,
        "datasets": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in logged.items()},
        "runs": runs,
        "wall_s": {"oracle": oracle_s, "training": train_wall, "total": time.time() - t_start},
        "machine": machine(),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, f"{_stem(args.tag)}_runs.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    write_page(summary, args.results_dir)
    if failed:
        sys.exit(f"{len(failed)} of {len(jobs)} runs failed (the page holds the rest):\n" + "\n".join(failed))


def _stem(tag: str | None) -> str:
    return f"offline_rl_{tag}" if tag else "offline_rl"


def _cohort_policy(expert: Expert, pipeline):
    """obs → the expert's cohort weights (the context's cohort one-hot, ``ObservationSpec.field``)."""
    return lambda obs: expert.cohort_weights[pipeline.spec.field(np.asarray(obs), "cohort").argmax(1)]


# ---------------------------------------------------------------------------------------------- the page
def _ci(values) -> str:
    m, h = mean_ci(np.asarray(values, np.float64))
    return f"{m:.2f} ± {h:.2f}"


def _share(true: np.ndarray, base: float, top: float) -> str:
    """(V − base) / (top − base) over seeds, as "m ± h %", where top is at least FAR_FROM_ORACLE above base."""
    return f"{_ci(100 * (true - base) / (top - base))} %" if top - base >= FAR_FROM_ORACLE else "—"


def write_page(summary: dict, results_dir: str) -> None:
    runs, truth, stem = summary["runs"], summary["truth"], _stem(summary["args"].get("tag"))
    v_oracle, v_worst = truth["oracle static"][0], truth["long views only (0, 1, 0)"][0]
    learners = list(dict.fromkeys(r["learner"] for r in runs))
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    rows = []
    for d in datasets:
        for n in learners:
            rs = [r for r in runs if r["learner"] == n and r["dataset"] == d]
            if not rs:
                continue
            true = np.array([r["final_true"] for r in rs])
            est = np.array([r["final_estimate"] for r in rs])
            gap = (true - v_worst) / (v_oracle - v_worst)
            live_truth = truth[f"behaviour: {d}"][0]
            from_behaviour = _share(true, live_truth, v_oracle)
            of_ceiling = _share(true, live_truth, truth.get(f"support ceiling: {d}", [np.nan])[0])
            promoted = [r for r in rs if r["gate"]["promote"]]
            false_promotions = sum(r["final_true"] < live_truth for r in promoted)
            worse = sum(r["final_true"] < live_truth for r in rs)
            rows.append(
                f"| {n} | {d} | {_ci(true)} | {'—' if np.isnan(est).all() else _ci(est)} | "
                f"{'—' if np.isnan(est).all() else _ci(est - true)} | {_ci(true - live_truth)} | "
                f"{_ci(v_oracle - true)} | {_ci(100 * gap)} % | {from_behaviour} | {of_ceiling} | "
                f"{true.std(ddof=1) if len(true) > 1 else 0:.2f} | {np.mean([r['support'] for r in rs]):.0%} | "
                f"{len(promoted)}/{len(rs)} ({false_promotions} false) | {worse}/{len(rs)} | "
                f"{np.mean([r['train_seconds'] for r in rs]):.0f} | "
                f"{np.mean([r.get('online_sessions', 0) for r in rs]):.0f} |"
            )
    spec, wall = summary["spec"], summary["wall_s"]
    updates = spec["iterations"] * spec["updates_per_iteration"]
    ref = "\n".join(f"| {k} | {m:.3f} ± {h:.3f} |" for k, (m, h) in truth.items())
    data = "\n".join(
        f"| {k} | {v['sessions']} | {v['transitions']} | {v['seconds']:.0f} |" for k, v in summary["datasets"].items()
    )
    sections = [
        f"# Offline RL for fusion ranking: {', '.join(learners)} on {len(datasets)} data regime(s)",
        "",
        f"Machine: {summary['machine']}. Command: `python benchmarks/offline_rl.py {_argv(summary['args'])}` — "
        f"{wall['total']:.0f} s wall in all ({wall['oracle']:.0f} s oracle and references, {wall['training']:.0f} s "
        f"training and gating, {summary['args']['jobs']} runs at a time).",
        "",
        "MDP: state = the request context, action = the ranking weights, reward = the slate's inner reward, "
        "V(π) = the inner reward summed over a session (γ = 1), measured on "
        f"{spec['eval_sessions']} simulated sessions with common random numbers. Budget: {updates} gradient steps "
        f"of {spec['batch_size']} transitions per run for every learner. vs behaviour = V(π) − V(the dataset's "
        "behaviour policy); regret = V(oracle static) − V(π); gap closed = (V(π) − V(worst)) / (V(oracle static) − "
        "V(worst)), V(worst) = the long-views-only weights' value (uniformly random weights are within ~1 % of the "
        "oracle on this MDP, so the range from them is noise). The critic's estimate = mean over the dataset's "
        "session starts of Q(s0, π(s0)) (BC has no critic). Support = the share of π's actions at those starts "
        "within 0.1 (unit-cube max-norm) of a logged action. Gate (`rllib_policies/offline/gate.py`): promote "
        "when FQE's lower bound beats the logged sessions' mean return; a false promotion is a promoted policy "
        "whose true value is below the behaviour policy's; 'worse' counts runs whose policy is below the "
        "behaviour policy's true value at all. Gap closed from behaviour = (V(π) − V(behaviour)) / (V(oracle static) − "
        f"V(behaviour)), given where the behaviour is at least {FAR_FROM_ORACLE:g} below the oracle. Support ceiling = "
        "the best static weights inside the behaviour's 95 % highest-density region (`support_ceiling`: what a "
        "learner that keeps to the logged actions can reach); of the in-support gain = (V(π) − V(behaviour)) / "
        "(V(support ceiling) − V(behaviour)), given where that gain is at least "
        f"{FAR_FROM_ORACLE:g} (above 100 %: the policy left the support and gained). Online sessions: "
        "what a learner served beyond the logs"
        + (
            f" (the -EE learners' exploration rounds, {spec.get('exploration_rounds', 0)} × "
            f"{spec.get('exploration_sessions', 0)} at σ {spec.get('exploration_noise', 0.3):g} after any warm "
            "start (`bc_steps`), trained on "
            + (f"the last {spec['data_window']} row sets" if spec.get("data_window") else "every row set")
            + "; their train s leave out that serving)"
            if set(EXPLORING) & set(learners)
            else ""
        )
        + "; every other learner sees the logs only.",
        "",
        "| learner | dataset | true V(π) (95 % CI over seeds) | critic's estimate | overestimation | vs behaviour | "
        "regret | gap closed | gap closed from behaviour | of the in-support gain | std over seeds | support | "
        "gate promoted | "
        "worse than behaviour | train s | online sessions |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *_selection_lines(runs, spec),
        "References (true values on the same sessions; ± the 95 % CI over sessions):",
        "",
        "| policy | V |",
        "|---|---:|",
        ref,
        "",
        f"Datasets ({summary['args'].get('days', 2)} simulated days each, through the telemetry path):",
        "",
        "| dataset | sessions | transitions | seconds |",
        "|---|---:|---:|---:|",
        data,
        "",
        f"![critic's estimate vs true value over training]({stem}.png)",
        "",
    ]
    write_results(os.path.join(results_dir, f"{stem}.md"), sections, partial=False)
    _plot(summary, results_dir, learners, datasets, stem)


def _selection_lines(runs: list[dict], spec: dict) -> list[str]:
    """With ``--select-from``: what each run served (the columns above are that iterate's) and the gate's lower
    bound at each evaluated iterate beside its true value."""
    if spec.get("select_from") is None:
        return []
    lines = [
        f"Served iterate (`--select-from {spec['select_from']}`): each run serves, among its iterates evaluated from "
        f"{spec['select_from']} gradient steps on, the one with the highest {spec['gate_by'].upper()} lower bound on "
        "the logs (checkpoint selection by the gate's estimate, no look at the true value); the columns above are "
        "that iterate's. Per run, at each evaluated step: the gate's lower bound / the true value.",
        "",
        "| learner | dataset | seed | served at | " + " | ".join(f"{u} steps" for u in runs[0]["updates"]) + " |",
        "|---|---|---:|---:|" + "---:|" * len(runs[0]["updates"]),
    ]
    for r in runs:
        cells = [
            ("—" if np.isnan(low) else f"{low:.2f}") + f" / {true:.2f}"
            for low, true in zip(r["gate_lows"], r["true_curve"])
        ]
        head = f"| {r['learner']} | {r['dataset']} | {r['seed']} | {r['selected_update']} | "
        lines.append(head + " | ".join(cells) + " |")
    return [*lines, ""]


def _argv(args: dict) -> str:
    skip = {"results_dir", "data_dir"}
    out = []
    for k, v in args.items():
        if k in skip or v is None or v == {}:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, dict):
            out.append(f"{flag} '{json.dumps(v)}'")
            continue
        out.append(f"{flag} {' '.join(map(str, v))}" if isinstance(v, list) else f"{flag} {v}")
    return " ".join(out)


def _plot(summary: dict, results_dir: str, learners: list[str], datasets: list[str], stem: str) -> None:
    """Per dataset (columns): the critic's estimate of its own policy's value beside that policy's true value
    (top, symlog: TD3's estimates run to 10³–10⁵), and the true values alone with the oracle and the behaviour
    (bottom, linear); means over seeds."""
    from matplotlib.ticker import ScalarFormatter

    runs, truth = summary["runs"], summary["truth"]
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.0 * len(datasets), 7.5), squeeze=False)
    colours = dict(zip(learners, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for col, d in enumerate(datasets):
        top, bottom = axes[0][col], axes[1][col]
        for n in learners:
            rs = [r for r in runs if r["learner"] == n and r["dataset"] == d]
            if not rs:
                continue
            x, true = rs[0]["updates"], np.mean([r["true_curve"] for r in rs], 0)
            est = np.array([r["estimate_curve"] for r in rs], np.float64)
            top.plot(x, true, color=colours[n], lw=2, label=f"{n}: true V(π)")
            if not np.isnan(est).all():
                top.plot(x, np.nanmean(est, 0), color=colours[n], ls="--", lw=1.2, label=f"{n}: critic's estimate")
            bottom.plot(x, true, color=colours[n], lw=2, marker="o", ms=3, label=n)
        for ax in (top, bottom):
            ax.axhline(truth["oracle static"][0], color="k", lw=0.8, ls=":", label="oracle static")
            ax.axhline(truth[f"behaviour: {d}"][0], color="grey", lw=0.8, ls="-.", label="behaviour")
            if f"support ceiling: {d}" in truth:
                ax.axhline(truth[f"support ceiling: {d}"][0], color="grey", lw=0.8, ls="--", label="support ceiling")
        top.set_yscale("symlog", linthresh=100)
        top.yaxis.set_major_formatter(ScalarFormatter())
        top.set_title(f"{d} data: estimate vs truth")
        bottom.set_title(f"{d} data: true value")
        bottom.set_xlabel("gradient steps")
        top.set_ylabel("session return")
        bottom.set_ylabel("true session return")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = os.path.join(results_dir, f"{stem}.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
