"""PRL-PUTS end to end: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m rllib_policies.train_utility_agent \\
        --config rllib_policies/configs/utility_agent.yaml

Steps, each with progress lines: exploration logs (uniform over the action grid, through the
telemetry sink; skipped when ``events_root`` names existing logs) → request rows (Ray Data) →
offline training of the two-head Q agent (RLlib learners, ``num_learners``) → λ sweep on held-out
logs and on the simulator → ``out_dir/frontier.json`` (versioned), ``frontier.png``, ``agent.pt``
(what the Serve app loads) and an RLlib checkpoint. Then, e.g.:

    curl -X PUT localhost:8000/operating-point -d '{"lambda": 0.4}'
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from rllib_policies.jobs import config_from_yaml, init_ray
from rllib_policies.utility_agent.study import StudyConfig, run_study


def summary(artifact: dict) -> str:
    meta = artifact["meta"]
    hv = meta.get("hypervolume_simulator") or meta["hypervolume_off_policy"]
    lines = [f"frontier v{artifact['version']}: {sum(p.get('non_dominated_off_policy', False) for p in artifact['points'])} "
             f"non-dominated of {len(artifact['points'])} λ points (off-policy)",
             "hypervolume " + ", ".join(f"{k} {v:.4f}" for k, v in hv.items() if k != "reference_point")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML with StudyConfig fields: {[f.name for f in fields(StudyConfig)]}")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (ignored under a job)")
    args = p.parse_args(argv)
    cfg = config_from_yaml(StudyConfig, args.config)
    init_ray(args.num_cpus)
    artifact = run_study(cfg)
    print(summary(artifact), flush=True)
    print(json.dumps({"frontier": f"{cfg.out_dir}/frontier.json", "agent": artifact["meta"]["agent"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
