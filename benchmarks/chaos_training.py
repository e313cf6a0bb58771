"""Chaos in training (issue 18, part 3): a worker node killed while a training job runs.

    python benchmarks/chaos_training.py            # ~3 min; writes its section of benchmarks/results/chaos.md
                                                   # and benchmarks/results/chaos_training.{png,json}
    python benchmarks/chaos_training.py --quick    # the learner's node only, no files

A multi-node Ray on this machine with Ray's own tool (`ray.cluster_utils.Cluster`): a head without CPUs (the
driver's node, as on the KubeRay clusters in cluster/, head num-cpus 0) and four worker nodes of 1 CPU, each a real
raylet with its own object store. The outer controller's training job (`python -m
rllib_policies.train_outer_controller --resume latest`, the RayJob's entrypoint) runs as its own driver with 2 env
runners and 1 learner, one per node, the fourth node spare, checkpointing every iteration. Once iteration
``--kill-after`` is checkpointed, the node that holds the victim (the learner, or an env runner) is killed outright
(`Cluster.remove_node(allow_graceful=False)`: its raylet, object store and workers die) while the next iteration
runs.

Measured per victim: whether the job finished its plan, how it recovered (rllib_policies.jobs restores the latest
checkpoint on the surviving nodes: ``max_failures``; RLlib restarts a lost env runner itself), the iteration and
env steps it resumed at against those the checkpoint recorded, whether the checkpoints written before the kill are
byte for byte the same after the job, the iterations trained again, and the time from the kill to the next
finished iteration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import machine, save_plot, write_marked_section  # noqa: E402

JOB = """
env_config: {{world: {{n_items: 2000, n_users: 300}}, pipeline: {{k_matching: 100, k_pre_ranking: 20, k_slate: 6}}}}
outer_controller: {{sessions_per_iteration: 16, min_sessions_for_kpi: 32, kl_rollback_threshold: null}}
env_runners: {{num_env_runners: 2, num_envs_per_env_runner: 2}}
learners: {{num_learners: 1}}
iterations: {iterations}
checkpoint_every: 1
checkpoint_dir: {checkpoint_dir}
"""
# victim → the class of the actor whose node is killed (a remote learner runs in a Ray Train worker actor)
VICTIMS = {
    "learner": "_WrappedExecutable",
    "env runner": "EnvRunner",
}
ITER = re.compile(r"^iter\s+(\d+) \|")
CHECKPOINT = re.compile(r"^checkpoint (\S+)/iter_(\d{6}) \((\d+) env steps\)")
RESUMED = re.compile(r"^resumed from \S+/iter_(\d{6}) at iteration (\d+) \((\d+) env steps")


def tree_digest(path: str) -> str:
    """sha256 over every file under ``path`` (relative name and bytes, in sorted order)."""
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(folder, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def victim_node(cluster, class_part: str):
    """The cluster's worker node holding a live actor whose class name contains ``class_part``."""
    import ray

    nodes = {
        a["Address"]["NodeID"]
        for a in ray._private.state.actors().values()  # the GCS actor table: no dashboard needed
        if a["State"] == "ALIVE" and class_part in a["ActorClassName"]
    }
    for node in cluster.worker_nodes:
        if node.node_id in nodes:
            return node
    alive = sorted({a["ActorClassName"] for a in ray._private.state.actors().values() if a["State"] == "ALIVE"})
    raise RuntimeError(f"no live {class_part} actor on a worker node (found on {nodes}); live actor classes: {alive}")


def run(victim: str, iterations: int, kill_after: int, kill_delay_s: float, log) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="morl-nk-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(4):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ckpt = os.path.join(tmp, "checkpoints")
    cfg = os.path.join(tmp, "job.yaml")
    with open(cfg, "w") as f:
        f.write(JOB.format(iterations=iterations, checkpoint_dir=ckpt))
    env.update(RAY_ADDRESS=cluster.address, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rllib_policies.train_outer_controller", "--config", cfg, "--resume", "latest"]
    t0 = time.monotonic()
    job = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    checkpointed = threading.Event()

    def read() -> None:
        for line in job.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))
            m = CHECKPOINT.match(line)
            if m and int(m.group(2)) == kill_after:
                checkpointed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    row: dict = {"victim": victim, "iterations": iterations, "kill_after": kill_after}
    try:
        if not checkpointed.wait(timeout=300):
            raise RuntimeError("the job never wrote its checkpoint:\n" + "\n".join(line for _, line in lines[-30:]))
        before = {name: tree_digest(os.path.join(ckpt, name)) for name in sorted(os.listdir(ckpt)) if "iter_" in name}
        node = victim_node(cluster, VICTIMS[victim])
        time.sleep(kill_delay_s)  # into the next iteration
        t_kill = time.monotonic() - t0
        cluster.remove_node(node, allow_graceful=False)
        log(f"{victim}: killed node {node.node_id[:8]} at {t_kill:.1f} s (after checkpoint {kill_after})")
        job.wait(timeout=600)
        reader.join(timeout=10)
        after = {name: tree_digest(os.path.join(ckpt, name)) for name in before}
    finally:
        if job.poll() is None:
            job.kill()
        ray.shutdown()
        cluster.shutdown()
    text = [line for _, line in lines]
    steps_at = {int(m.group(2)): int(m.group(3)) for m in map(CHECKPOINT.match, text) if m}
    resumed = [(int(m.group(2)), int(m.group(3))) for m in map(RESUMED.match, text) if m]
    finished = [(t, int(m.group(1))) for t, line in lines if (m := ITER.match(line))]
    in_flight = max((it for t, it in finished if t < t_kill), default=0) + 1
    after_kill = [(t, it) for t, it in finished if t > t_kill]
    row.update(
        returncode=job.returncode,
        t_kill_s=t_kill,
        in_flight=in_flight,
        last_iteration=max((it for _, it in finished), default=0),
        restored=bool(resumed),
        resumed_iteration=resumed[0][0] if resumed else None,
        resumed_env_steps=resumed[0][1] if resumed else None,
        checkpoint_env_steps=steps_at.get(resumed[0][0]) if resumed else steps_at.get(kill_after),
        checkpoints_unchanged=before == after,
        checkpoints_before=len(before),
        redone=in_flight - resumed[0][0] if resumed else 0,
        next_iteration_s=(after_kill[0][0] - t_kill) if after_kill else None,
        lost_s=next((t - t_kill for t, line in lines if t > t_kill and line.startswith("lost a worker")), None),
        resumed_s=next((t - t_kill for t, line in lines if t > t_kill and RESUMED.match(line)), None),
        lost_lines=[line for line in text if line.startswith("lost a worker")],
        timeline=finished,
        log_tail=text[-12:],
    )
    return row


def markdown(rows: list[dict], wall: float) -> str:
    lines = [
        "## A worker node killed mid-training",
        "",
        f"`benchmarks/chaos_training.py` — {machine()}; one run, {wall:.0f} s. `ray.cluster_utils.Cluster`: a head "
        "without CPUs and 4 worker nodes of 1 CPU (real raylets on this machine). The outer controller's training "
        "job (`python -m rllib_policies.train_outer_controller --resume latest`, its own driver) with 2 env runners "
        "and 1 learner, one per node, the 4th node spare, a checkpoint every iteration. Once iteration "
        f"{rows[0]['kill_after']} is checkpointed, the victim's node is killed outright "
        "(`remove_node(allow_graceful=False)`) while the next one runs.",
        "",
        "| node killed | job | iterations | in flight at the kill | recovered by | resumed at | env steps: "
        "checkpoint / resumed | checkpoints before the kill unchanged | iterations trained again | kill → loss "
        "seen s | kill → restored s | kill → next iteration s |",
        "|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        job = "finished" if r["returncode"] == 0 else f"exit {r['returncode']}"
        if r["returncode"] != 0:
            how = "not recovered"
        elif r["restored"]:
            how = "restoring the latest checkpoint (jobs.py)"
        else:
            how = "RLlib restarting the env runner"
        at = r["resumed_iteration"] if r["restored"] else "—"
        steps = (
            f"{r['checkpoint_env_steps']} / {r['resumed_env_steps']}"
            if r["restored"]
            else f"{r['checkpoint_env_steps']} / (not restored)"
        )
        same = f"yes ({r['checkpoints_before']})" if r["checkpoints_unchanged"] else "**no**"
        secs = [("—" if r[k] is None else f"{r[k]:.1f}") for k in ("lost_s", "resumed_s", "next_iteration_s")]
        lines.append(
            f"| {r['victim']} | {job} | {r['last_iteration']} of {r['iterations']} | {r['in_flight']} | {how} | "
            f"{at} | {steps} | {same} | {r['redone']} | {' | '.join(secs)} |"
        )
    lines += [""] + [f"- {r['victim']}: `{line}`" for r in rows for line in r["lost_lines"]]
    lines += ["", "![iterations over time around the kill](chaos_training.png)"]
    return "\n".join(lines)


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        t, it = zip(*r["timeline"], strict=True) if r["timeline"] else ((), ())
        ax.plot(t, it, "o-", ms=3)
        ax.axvline(r["t_kill_s"], color="red", ls="--", label="node killed")
        ax.set(title=f"{r['victim']}'s node killed", xlabel="s since the job started", ylabel="iteration finished")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--kill-after", type=int, default=3, help="kill once this iteration is checkpointed")
    parser.add_argument("--kill-delay", type=float, default=0.1, help="s after that checkpoint (into the next one)")
    parser.add_argument("--victims", nargs="*", default=list(VICTIMS), choices=list(VICTIMS))
    parser.add_argument("--quick", action="store_true", help="the learner's node only; no files written")
    args = parser.parse_args(argv)
    victims = args.victims[:1] if args.quick else args.victims
    started = time.time()
    rows = [run(v, args.iterations, args.kill_after, args.kill_delay, lambda s: print(s, flush=True)) for v in victims]
    section = markdown(rows, time.time() - started)
    print(section)
    for r in rows:
        print(f"{r['victim']}: log tail\n  " + "\n  ".join(r["log_tail"]))
    if args.quick:
        return
    results = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(results, "chaos_training.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_marked_section(os.path.join(results, "chaos.md"), "training_kill", section, "Chaos under load")
    save_plot(os.path.join(results, "chaos_training.png"), plot, rows)


if __name__ == "__main__":
    main()
