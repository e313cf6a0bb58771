"""Render one KubeRay RayJob per training entrypoint from the training cluster's spec.

    python scripts/render_cluster.py           # writes cluster/rayjob-*.yaml
    python scripts/render_cluster.py --check   # exit 1 if a committed manifest differs from its rendering (CI)

Every RayJob gets its own cluster, ``cluster/raycluster-training.yaml``'s spec (one source for the pods,
autoscaling, token auth and the shared volume), torn down when the job ends (``shutdownAfterJobFinishes``).
A retried attempt (``backoffLimit``) runs the same entrypoint on a new cluster; ``--resume latest`` makes it
continue from the last checkpoint on the shared volume instead of starting over.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")
CONFIGS_IN_IMAGE = "/opt/morl/configs"  # cluster/Dockerfile copies rllib_policies/configs here

# RayJob name → (entrypoint module, config file under rllib_policies/configs, extra arguments, deadline in hours)
JOBS: dict[str, tuple[str, str, str, int]] = {
    "train-outer-controller": ("rllib_policies.train_outer_controller", "outer_controller.yaml", "--resume latest", 6),
    "train-utility-agent": ("rllib_policies.train_utility_agent", "utility_agent.yaml", "--resume latest", 6),
    "train-unex-rl": ("rllib_policies.train_unex_rl", "unex_rl.yaml", "--resume latest", 6),
    "train-offline-cql": ("rllib_policies.train_offline", "offline_cql.yaml", "--resume latest", 6),
    "train-crm": ("rllib_policies.train_crm", "crm.yaml", "--resume latest", 6),
    # the closed loop: serves both arms, logs, learns, gates, promotes, monitors; resumes its state.json by default
    "daily-cycle": ("rllib_policies.daily_cycle", "daily_cycle.yaml", "", 24),
}

# RAY_JOB_STOP_WAIT_TIME_S: how long `ray job stop` (and KubeRay deleting the job) waits after SIGTERM before SIGKILL
# (Ray's default, 3 s, is shorter than an algorithm's clean stop: rllib_policies.jobs.stops_cleanly)
RUNTIME_ENV = {"env_vars": {"MORL_STORAGE": "/mnt/morl", "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "30"}}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the embedded runtime env), as a person would write them."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def rayjob(name: str, cluster_spec: dict) -> dict:
    module, config, extra, hours = JOBS[name]
    entrypoint = f"python -m {module} --config {CONFIGS_IN_IMAGE}/{config}" + (f" {extra}" if extra else "")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "morl-recsys", "app.kubernetes.io/component": name},
        },
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": yaml.dump(RUNTIME_ENV, Dumper=_Dumper, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,  # keep the finished cluster 10 min for its logs
            "backoffLimit": 2,
            "activeDeadlineSeconds": hours * 3600,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": cluster_spec,
        },
    }


def render() -> dict[str, str]:
    """{file path: text} of every RayJob manifest."""
    with open(os.path.join(CLUSTER, "raycluster-training.yaml")) as f:
        spec = yaml.safe_load(f)["spec"]
    out = {}
    for name in JOBS:
        header = (
            f"# KubeRay RayJob: {JOBS[name][0]} on its own autoscaled cluster, torn down when it ends.\n"
            "# Rendered by scripts/render_cluster.py from cluster/raycluster-training.yaml: edit those, then rerun.\n"
            f"#   kubectl apply -f cluster/storage.yaml -f cluster/rayjob-{name}.yaml\n"
        )
        out[os.path.join(CLUSTER, f"rayjob-{name}.yaml")] = header + yaml.dump(
            rayjob(name, spec), Dumper=_Dumper, sort_keys=False, width=120
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = p.parse_args(argv)
    stale = []
    for path, text in render().items():
        if args.check:
            current = open(path).read() if os.path.exists(path) else None
            if current != text:
                stale.append(os.path.relpath(path, ROOT))
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {os.path.relpath(path, ROOT)}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/render_cluster.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
