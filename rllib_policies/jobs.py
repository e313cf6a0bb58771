"""What every `ray job submit` entrypoint shares: a typed config from YAML, and joining Ray."""

from __future__ import annotations

import os

import yaml


def config_from_yaml(cls, path: str):
    """A dataclass from a YAML mapping of its fields; unknown keys are an error naming them."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(raw).__name__}")
    unknown = set(raw) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
    return cls(**raw)


def init_ray(num_cpus: int | None = None) -> None:
    """Inside `ray job submit` (RAY_ADDRESS set) join the job's cluster; otherwise start a local Ray
    (never attach to some other cluster on the machine)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
