"""PRL-PUTS end to end: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m rllib_policies.train_utility_agent \\
        --config rllib_policies/configs/utility_agent.yaml
    python -m rllib_policies.train_utility_agent --config … --resume latest   # continue a run

Steps, each with progress lines: exploration logs (uniform over the action grid, through the
telemetry sink; skipped when ``events_root`` names existing logs) → request rows (Ray Data) →
offline training of the two-head Q agent (RLlib learners, ``num_learners``; the shared job runner:
one line per pass, checkpoints under ``checkpoint_dir``, default ``out_dir/checkpoints``) → λ sweep
on held-out logs and on the simulator → do no harm per λ (π_λ only where held-out logs show it beats
the best global vector g_λ) → ``out_dir/frontier.json`` (versioned), ``frontier.png``, ``agent.pt``
(what the Serve app loads, with the per-λ choice). Then, e.g.:

    curl -X PUT localhost:8000/operating-point -d '{"lambda": 0.4}'

``out_dir`` (``utility_agent`` in configs/utility_agent.yaml) is under the storage root (``storage``, else
$MORL_STORAGE, else ~/morl-runs; see rllib_policies.storage). The study works on local files, so with a URI
``out_dir`` it runs in the URI's local mirror (``storage.mirror``): its inputs are fetched from the URI
first (``PULLED``), and what each step wrote is copied back after it; checkpoints go to the URI directly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from rllib_policies import storage
from rllib_policies.jobs import job_main
from rllib_policies.utility_agent.study import StudyConfig, UtilityStudy

PULLED = ("exploration.json", "events", "requests", "ground_truth.parquet", "frontier.json")  # the study's inputs
FINISHED = ("agent.pt", "frontier.json", "frontier.png", "frontier_cohorts.png", "checkpoints")  # finish's outputs


def summary(artifact: dict) -> str:
    meta = artifact["meta"]
    hv = meta.get("hypervolume_simulator") or meta["hypervolume_off_policy"]
    n_nd = sum(p.get("non_dominated_off_policy", False) for p in artifact["points"])
    lines = [
        f"frontier v{artifact['version']}: {n_nd} non-dominated of {len(artifact['points'])} λ points (off-policy)",
        "hypervolume " + ", ".join(f"{k} {v:.4f}" for k, v in hv.items() if k != "reference_point"),
        f"do no harm: π_λ deployed at {len(meta['do_no_harm']['personalised_lambdas'])} of "
        f"{len(artifact['points'])} λ, the best global vector g_λ elsewhere",
    ]
    return "\n".join(lines)


def pull(cfg: StudyConfig) -> None:
    """A URI ``out_dir``: fetch the study's inputs (``PULLED``) that exist there into its local mirror
    (once, before building or restoring: a resumed job on another node needs its request rows)."""
    if storage.is_uri(cfg.out_dir):
        for name in PULLED:
            if storage.exists(storage.join(cfg.out_dir, name)):
                storage.copy_tree(storage.join(cfg.out_dir, name), os.path.join(storage.mirror(cfg.out_dir), name))


def staged(step: Callable[[StudyConfig], Any], cfg: StudyConfig, outputs: tuple[str, ...] | None = None) -> Any:
    """``step(cfg)`` with ``cfg.out_dir`` local: for a URI its mirror during the step, then what the step
    wrote (``outputs``, default everything there) is copied to the URI."""
    remote = cfg.out_dir
    if not storage.is_uri(remote):
        return step(cfg)
    local = storage.mirror(remote)
    cfg.out_dir = local
    try:
        out = step(cfg)
    finally:
        cfg.out_dir = remote
    for name in outputs or sorted(os.listdir(local)):
        if os.path.exists(os.path.join(local, name)):
            storage.copy_tree(os.path.join(local, name), storage.join(remote, name))
    return out


def main(argv: list[str] | None = None) -> int:
    study = UtilityStudy()

    def after(algo, cfg: StudyConfig) -> None:
        remote = cfg.out_dir

        def step(local_cfg: StudyConfig) -> dict:
            artifact = study.finish(algo, local_cfg)
            if local_cfg.out_dir != remote:  # name the artifacts where they are kept, not the mirror
                path = os.path.join(local_cfg.out_dir, "frontier.json")
                written = storage.read_json(path)
                for meta in (artifact["meta"], written["meta"]):
                    meta["agent"] = storage.join(remote, "agent.pt")
                    meta["config"]["out_dir"] = remote
                    meta["config"]["checkpoint_dir"] = cfg.checkpoint_dir
                storage.write_json(path, written, allow_nan=False)
            return artifact

        artifact = staged(step, cfg, FINISHED)
        print(summary(artifact), flush=True)
        frontier = storage.join(cfg.out_dir, "frontier.json")
        print(json.dumps({"frontier": frontier, "agent": artifact["meta"]["agent"]}), flush=True)

    return job_main(
        StudyConfig,
        lambda cfg: staged(study.build, cfg),
        study.progress,
        argv,
        description=__doc__,
        after=after,
        prepare=pull,
    )


if __name__ == "__main__":
    sys.exit(main())
