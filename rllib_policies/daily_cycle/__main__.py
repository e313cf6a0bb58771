"""``python -m rllib_policies.daily_cycle --config …``: the daily cycle as one `ray job submit` entrypoint.

Inside a Ray job (RAY_ADDRESS set) it joins the job's cluster and deploys the apps there; otherwise it starts
a private local Ray. One line per day; the per-day records and the state go under the config's ``storage``.
``--fresh`` starts over (the old storage is moved aside, never deleted); otherwise an existing state resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
import warnings

import ray

from rllib_policies import storage
from rllib_policies.jobs import arm_sigterm, stops_cleanly

from .config import DailyCycleConfig
from .cycle import DailyCycle


def start_ray() -> None:
    """Join the job's cluster under `ray job submit` (RAY_ADDRESS set), else a private local Ray; the workers'
    and replicas' logs stay in Ray's log files (the cycle prints one line per day)."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    arm_sigterm()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with DailyCycleConfig fields")
    p.add_argument("--fresh", action="store_true", help="start over (moves the old storage aside)")
    p.add_argument("--days", type=int, default=None, help="override the config's days")
    args = p.parse_args(argv)
    cfg = DailyCycleConfig.from_yaml(args.config)
    if args.days is not None:
        cfg = dataclasses.replace(cfg, days=args.days)  # validated again
    root = storage.resolve(cfg.storage)
    if args.fresh and os.path.exists(root):
        aside = f"{root}.{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(root, aside)
        print(f"--fresh: the previous run moved to {aside}", flush=True)
    for name in ("ray", "ray.serve", "ray.data", "ray.rllib", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*already in registry.*")

    def log(line: str) -> None:
        print(line, flush=True)

    with stops_cleanly(log):  # SIGTERM: the day in progress is dropped; state.json holds the last finished one
        start_ray()
        cycle = DailyCycle(cfg, log)
        first = cycle.state["next_day"]
        log(
            f"daily cycle {cfg.experiment!r}: days {first}..{cfg.days - 1} of {cfg.days}, storage {root}"
            + (f" (resumed after day {first - 1})" if first else "")
        )
        cycle.deploy()
        records = cycle.run()
    promoted = sum(r["candidate"].get("status") == "promoted" for r in records)
    rejected = sum(r["candidate"].get("status") == "rejected" for r in records)
    rollbacks = sum(bool(r["monitor"].get("rolled_back_to")) for r in records)
    log(
        f"done: {len(records)} day(s), {promoted} promotion(s), {rejected} rejection(s), {rollbacks} rollback(s); "
        f"live treatment weights {cycle.state['live']['weights']} (v{cycle.state['live']['version']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
