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
"""

from __future__ import annotations

import json
import sys

from rllib_policies.jobs import job_main
from rllib_policies.utility_agent.study import StudyConfig, UtilityStudy


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


def main(argv: list[str] | None = None) -> int:
    study = UtilityStudy()

    def finish(algo, cfg: StudyConfig) -> None:
        artifact = study.finish(algo, cfg)
        print(summary(artifact), flush=True)
        print(json.dumps({"frontier": f"{cfg.out_dir}/frontier.json", "agent": artifact["meta"]["agent"]}), flush=True)

    return job_main(StudyConfig, study.build, study.progress, argv, description=__doc__, after=finish)


if __name__ == "__main__":
    sys.exit(main())
