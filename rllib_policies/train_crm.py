"""CRM end to end: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m rllib_policies.train_crm --config rllib_policies/configs/crm.yaml
    python -m rllib_policies.train_crm --config … --resume latest        # continue a run

Steps: Gaussian-logged sessions around the logging mean μ₀ through the telemetry sink (skipped when
``events_root`` holds logs) → request rows (Ray Data), users split train / validation → CRM on the training
rows (the shared job runner: one progress line per iteration, checkpoints under ``checkpoint_dir``) → do no
harm on the validation rows → ``out_dir/crm_policy.pt`` (the module's state dict) and ``out_dir/decision.json``
(which stochastic policy was certified, or q kept) → with ``serve_store_prefix``, the certified policy is
published to the recommend apps of that store prefix (``ranking_policy: crm``; nothing when q is kept).
``out_dir`` (default ``crm``) is under the storage root (``storage``, else $MORL_STORAGE, else ~/morl-runs; a
local path or URI, see rllib_policies.storage); with a URI the telemetry sink writes the simulated events to
their local mirror first, then they are copied there.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import pyarrow as pa
import ray
import torch

from rllib_policies import storage
from rllib_policies.crm import CRMConfig, logging_policy, request_dataset, simulate_gaussian_logs
from rllib_policies.crm.logs import DEFAULT_WEIGHTS, as_arrays, split_by_user
from rllib_policies.envs import SessionEnv
from rllib_policies.jobs import JobConfig, job_main


@dataclass
class CRMJob(JobConfig):
    out_dir: str = "crm"  # under the storage root
    env_config: dict = field(default_factory=lambda: {"world": {"n_items": 5000, "n_users": 4000}})
    events_root: str | None = None  # existing Gaussian-logged events; default: simulate into out_dir/events
    sessions: int = 5000
    logging_weights: tuple[float, float, float] = tuple(DEFAULT_WEIGHTS.tolist())
    logging_sigma: float = 2.0
    validation: float = 0.35
    crm: dict = field(default_factory=dict)  # CRMConfig.crm(...) options (offline_requests is set here)
    training: dict = field(default_factory=dict)  # AlgorithmConfig.training(...): lr, …
    serve_store_prefix: str | None = None  # publish the certified policy to this recommend app (ranking_policy crm)

    def __post_init__(self) -> None:
        if self.checkpoint_dir == JobConfig.checkpoint_dir:
            self.checkpoint_dir = storage.join(self.out_dir, "checkpoints")


def simulate_events(job: CRMJob, events: str) -> str:
    """Gaussian-logged sessions into ``events`` (via its local mirror when it is a URI: the telemetry
    sink writes local files); returns where to read them from."""
    local = storage.mirror(events)
    if storage.is_uri(events) and os.path.exists(local):
        shutil.rmtree(local)  # a stale mirror of an unfinished run
    info = simulate_gaussian_logs(job.env_config, local, job.sessions, job.logging_weights, job.logging_sigma, job.seed)
    if storage.is_uri(events):
        storage.copy_tree(local, events)
    print(f"logged {info['requests']} requests of {info['sessions']} sessions → {events}", flush=True)
    return local


def build(job: CRMJob):
    events = job.events_root or storage.join(job.out_dir, "events")
    source = events if storage.exists(events) else simulate_events(job, events)
    table = pa.concat_tables(ray.get(request_dataset(source).to_arrow_refs()))
    train, validation = split_by_user(table, (1 - job.validation,), job.seed)
    for name, part in (("train", train), ("validation", validation)):
        storage.write_parquet(part, storage.join(job.out_dir, name, "part-0.parquet"))
    print(f"request rows: {train.num_rows} train, {validation.num_rows} validation", flush=True)
    options = {"init_weights": tuple(job.logging_weights), "init_sigma": job.logging_sigma, **job.crm}
    return (
        CRMConfig()
        .environment(SessionEnv, env_config={**job.env_config, "seed": job.seed})
        .crm(offline_requests=storage.join(job.out_dir, "train"), **options)
        .training(**job.training)
        .debugging(seed=job.seed, log_level="ERROR")
        .build_algo()
    )


def progress(result: dict) -> str:
    r = result["crm"]
    return f"J {r['objective']:.4f} | V̂ {r['value']:.4f} | SE {r['se']:.4f} | ESS/n {r['ess_fraction']:.3f}"


def finish(algo, job: CRMJob) -> None:
    rows = as_arrays(storage.read_parquet(storage.join(job.out_dir, "validation")))
    if algo.columns is None:
        algo.load_rows()
    decision = algo.do_no_harm(rows, logging_policy(job.logging_weights, job.logging_sigma))
    path = storage.join(job.out_dir, "crm_policy.pt")
    buf = io.BytesIO()
    torch.save(algo.inference_module().state_dict(), buf)
    storage.write_bytes(path, buf.getvalue())
    out = {
        "deploy": decision.deploy,
        # what serving must draw from (CRM.deployed_policy): "mean" = N(m_θ(x) + c(x)·1, mean_jitter²·I),
        # "mean_h<h>" the same with jitter h, "policy" = π_θ shifted by c(x)·1, "logging" = q; c(x) =
        # logged_scale − mean_j m_θ(x)_j when align_scale (ranking is invariant to it), else 0
        "deployed": decision.deployed,
        "mean_jitter": algo.config.mean_jitter,
        "deployed_jitter": algo.jitters().get(decision.deployed),  # h of a learned-mean candidate, else None
        "align_scale": algo.config.align_scale,
        "logged_scale": algo.logged_scale,
        "logging_sigma": job.logging_sigma,
        "reason": decision.reason,
        "learned_estimate": [decision.learned.value, decision.learned.low, decision.learned.high],
        "logging_estimate": decision.logging.value,
        "policy": path,
        "logging_weights": list(job.logging_weights),
    }
    storage.write_json(storage.join(job.out_dir, "decision.json"), out)  # kept even if publishing fails
    if job.serve_store_prefix:  # do no harm decided: serve what it certified; q kept → the live policy untouched
        ack = algo.publish_to_serve(job.serve_store_prefix, decision)
        out["published_version"] = None if ack is None else ack["version"]
        storage.write_json(storage.join(job.out_dir, "decision.json"), out)
    print(json.dumps(out), flush=True)
    if job.serve_store_prefix:
        print(publish_line(job.serve_store_prefix, decision.deployed, ack), flush=True)


def publish_line(store_prefix: str, deployed: str, ack: dict | None) -> str:
    """What publishing did, in one line (a warning when no recommend replica follows the store)."""
    if ack is None:
        return f"CRM policy → serving ({store_prefix!r}): nothing certified, the live policy is untouched"
    line = f"CRM policy → serving ({store_prefix!r}): version {ack['version']}, the certified {deployed!r} policy"
    if not ack.get("readers_live"):
        line += (
            f"\nwarning: no recommend replica follows {store_prefix!r} on this cluster (a typo, or a job outside "
            "`ray job submit`?): published, but nothing serves it yet"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    return job_main(CRMJob, build, progress, argv, description=__doc__, after=finish)


if __name__ == "__main__":
    sys.exit(main())
