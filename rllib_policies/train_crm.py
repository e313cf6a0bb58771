"""CRM end to end: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m rllib_policies.train_crm --config rllib_policies/configs/crm.yaml
    python -m rllib_policies.train_crm --config … --resume latest        # continue a run

Steps: Gaussian-logged sessions around the logging mean μ₀ through the telemetry sink (skipped when
``events_root`` holds logs) → request rows (Ray Data), users split train / validation → CRM on the training
rows (the shared job runner: one progress line per iteration, checkpoints under ``checkpoint_dir``) → do no
harm on the validation rows → ``out_dir/crm_policy.pt`` (the module's state dict) and ``out_dir/decision.json``
(deploy π_θ's mean weights, or keep μ₀).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from rllib_policies.crm import CRMConfig, logging_policy, request_dataset, simulate_gaussian_logs
from rllib_policies.crm.logs import DEFAULT_WEIGHTS, as_arrays, split_by_user
from rllib_policies.envs import SessionEnv
from rllib_policies.jobs import JobConfig, job_main


@dataclass
class CRMJob(JobConfig):
    out_dir: str = "runs/crm"
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 4000}})
    events_root: str | None = None  # existing Gaussian-logged events; default: simulate into out_dir/events
    sessions: int = 5000
    logging_weights: tuple[float, float, float] = tuple(DEFAULT_WEIGHTS.tolist())
    logging_sigma: float = 2.0
    validation: float = 0.35
    crm: dict = field(default_factory=dict)  # CRMConfig.crm(...) options (offline_requests is set here)
    training: dict = field(default_factory=dict)  # AlgorithmConfig.training(...): lr, …

    def __post_init__(self) -> None:
        if self.checkpoint_dir == JobConfig.checkpoint_dir:
            self.checkpoint_dir = os.path.join(self.out_dir, "checkpoints")


def build(job: CRMJob):
    events = job.events_root or os.path.join(job.out_dir, "events")
    if not os.path.isdir(events):
        info = simulate_gaussian_logs(
            job.env_config, events, job.sessions, job.logging_weights, job.logging_sigma, job.seed
        )
        print(f"logged {info['requests']} requests of {info['sessions']} sessions → {events}", flush=True)
    table = pa.concat_tables(ray.get(request_dataset(events).to_arrow_refs()))
    train, validation = split_by_user(table, (1 - job.validation,), job.seed)
    for name, part in (("train", train), ("validation", validation)):
        os.makedirs(os.path.join(job.out_dir, name), exist_ok=True)
        pq.write_table(part, os.path.join(job.out_dir, name, "part-0.parquet"))
    print(f"request rows: {train.num_rows} train, {validation.num_rows} validation", flush=True)
    options = {"init_weights": tuple(job.logging_weights), "init_sigma": job.logging_sigma, **job.crm}
    return (
        CRMConfig()
        .environment(SessionEnv, env_config={**job.env_config, "seed": job.seed})
        .crm(offline_requests=os.path.join(job.out_dir, "train"), **options)
        .training(**job.training)
        .debugging(seed=job.seed, log_level="ERROR")
        .build_algo()
    )


def progress(result: dict) -> str:
    r = result["crm"]
    return f"J {r['objective']:.4f} | V̂ {r['value']:.4f} | SE {r['se']:.4f} | ESS/n {r['ess_fraction']:.3f}"


def finish(algo, job: CRMJob) -> None:
    rows = as_arrays(pq.read_table(os.path.join(job.out_dir, "validation")))
    if algo.columns is None:
        algo.load_rows()
    decision = algo.do_no_harm(rows, logging_policy(job.logging_weights, job.logging_sigma))
    path = os.path.join(job.out_dir, "crm_policy.pt")
    torch.save(algo.inference_module().state_dict(), path)
    out = {
        "deploy": decision.deploy,
        # what serving must draw from: "mean" = N(m_θ(x), mean_jitter²·I), "policy" = π_θ, "logging" = q
        "deployed": decision.deployed,
        "mean_jitter": algo.config.mean_jitter,
        "logging_sigma": job.logging_sigma,
        "reason": decision.reason,
        "learned_estimate": [decision.learned.value, decision.learned.low, decision.learned.high],
        "logging_estimate": decision.logging.value,
        "policy": path,
        "logging_weights": list(job.logging_weights),
    }
    with open(os.path.join(job.out_dir, "decision.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    return job_main(CRMJob, build, progress, argv, description=__doc__, after=finish)


if __name__ == "__main__":
    sys.exit(main())
