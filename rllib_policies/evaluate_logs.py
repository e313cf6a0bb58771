"""Off-policy estimates of candidate policies on logged-bandit Parquet: the CLI and `ray job submit` entrypoint.

    python -m rllib_policies.evaluate_logs --logs logs.parquet --policies policies.yaml \\
        --columns context=x0,x1,x2 action=action reward=reward propensity=propensity cluster=user
    python -m rllib_policies.evaluate_logs --preset events --logs /data/events --policies policies.yaml
    ray job submit --working-dir . -- python -m rllib_policies.evaluate_logs --logs /abs/path ... --json /abs/out.json

Prints one table, policy × estimator × reward: estimate, interval, ESS, n, abstained (reason); ``--json``
writes the same rows. Exit code 0; 2 with one line naming the column and the row on bad input (a missing
column, a null, a propensity ≤ 0 or > 1, a NaN reward, a ragged action column, a policy whose dimension
does not match the logged actions).

Presets:

- ``generic`` (default): one row per logged decision; ``--columns`` names context (scalar columns or one
  list column), action (an integer grid index, or a list column of utility weights), reward (one or more),
  propensity (π₀(a|x): a probability for grid actions, the density of a = log w for weight vectors) or
  log_propensity (its log), cluster (optional: rows of one cluster, e.g. a user, are correlated).
- ``events``: this project's telemetry event logs (``actors/telemetry/schema.py``), aggregated per request:
  rewards ``clicks`` / ``long_views`` (clicked items watched ≥ 18 s) / ``revenue`` / ``inner_reward`` summed
  over the slate, context and propensity from the request's first event, clusters = users. ``--action-space
  grid``: the utility weights matched to the utility agent's action grid, propensity = ``propensity`` (only
  exploration requests: propensity < 1, on the grid); ``weights``: a = log(utility_weights), density =
  exp(``weight_log_density``) (only Gaussian-logged requests). Dropped requests are counted on stdout.

Policies file (YAML, a list or ``{policies: [...]}``), weights in weight units (the CLI takes logs)::

    - {name: always_3, kind: grid, action: 3}                 # a fixed grid index
    - {name: live, kind: grid, weights: [1.0, 0.67, 13.3]}    # events preset: the grid action of a weight vector
    - {name: mix, kind: grid, probabilities: [0.1, 0.2, 0.7]} # π(·) for every context
    - {name: explore, kind: gaussian, mean: [1.0, 0.5, 10.0], std: 0.3}   # log w ~ N(log mean, std²)
    - {name: fixed, kind: deterministic, weights: [1.0, 0.5, 10.0], bandwidth: 0.1}   # KernelSNIPS, H = 0.1²I

Gaussian / deterministic policies may give ``low`` / ``high`` (weight units): the target's truncation box
(the events preset defaults to serving's box, [1e-3·high, high] with high = ``RANKING_ACTION_HIGH``; a zero
weight is lifted to 1e-3·high there, as serving does).

Reading: a single file is read with pyarrow (nothing to parallelise, no Ray start); a directory or several
files with Ray Data (``--reader`` overrides), in file order (``preserve_order``) so rows, error locations and
bootstrap draws are reproducible. The events preset aggregates per request inside Ray Data, hash-partitioned
by user, so only request rows (≈ 1/slate of the events) reach the driver; the estimators need the whole
table in the driver's memory either way.

Under ``ray job submit --working-dir .`` the command runs on the cluster with the uploaded working dir as its
cwd: relative paths resolve against that copy (``runs/`` and git-ignored files are not uploaded), and a
relative ``--json`` lands in a temporary directory. Pass absolute paths the head node can read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
import yaml

from actors.stages import LONG_VIEW_S, RANKING_ACTION_HIGH
from actors.telemetry import EVENT_SCHEMA, dedupe
from actors.telemetry.sessionise import map_user_partitions
from rllib_policies.jobs import init_ray
from rllib_policies.ope import (
    DM,
    DR,
    IPS,
    SNDR,
    SNIPS,
    AbstainRule,
    Bootstrap,
    DensityRatioIPS,
    DensityRatioSNIPS,
    EssCorrected,
    Estimate,
    GaussianPolicy,
    KernelSNIPS,
    LoggedBandit,
    Normal,
    SwitchDR,
)
from rllib_policies.utility_agent.exploration import DEFAULT_GRID, ActionGrid

WEIGHT_FLOOR = 1e-3  # serving lifts a zero weight to floor·high before the log
EVENT_REWARDS = ("clicks", "long_views", "revenue", "inner_reward")


class BadInput(ValueError):
    """Bad logs, columns or policies: the message names the column (or policy field) and the row."""


# ---------------------------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class Columns:
    """Which logged column is which. ``action_units``: a list action column holds weights (the CLI takes
    logs) or log-weights already."""

    context: tuple[str, ...] = ()
    action: str = "action"
    reward: tuple[str, ...] = ("reward",)
    propensity: str | None = "propensity"
    log_propensity: str | None = None
    cluster: str | None = None
    action_units: str = "weights"

    @classmethod
    def parse(cls, items: Sequence[str], base: Columns | None = None) -> Columns:
        """``key=value`` items (lists comma-separated; an empty value clears an optional column)."""
        out = base or cls()
        lists, optional = {"context", "reward"}, {"propensity", "log_propensity", "cluster"}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in {f for f in cls.__dataclass_fields__}:
                raise BadInput(f"--columns {item!r}: expected key=value with key in {sorted(cls.__dataclass_fields__)}")
            if key in lists:
                out = replace(out, **{key: tuple(v for v in value.split(",") if v)})
            elif key in optional:
                out = replace(out, **{key: value or None})
            else:
                out = replace(out, **{key: value})
        if out.propensity and out.log_propensity:
            raise BadInput("--columns: give propensity or log_propensity, not both")
        if not (out.propensity or out.log_propensity):
            raise BadInput("--columns: name a propensity or a log_propensity column")
        if out.action_units not in ("weights", "log"):
            raise BadInput(f"--columns action_units={out.action_units!r}: expected 'weights' or 'log'")
        if not out.reward:
            raise BadInput("--columns: name at least one reward column")
        return out

    def names(self) -> list[str]:
        opt = [c for c in (self.propensity, self.log_propensity, self.cluster) if c]
        return [*self.context, self.action, *self.reward, *opt]


@dataclass(frozen=True)
class Locator:
    """Row i of the evaluated table → where it came from: a file and its row, or a request id."""

    files: tuple[tuple[str, int], ...] = ()  # (path, rows) in read order
    ids: np.ndarray | None = None  # events preset: request_id per row

    def __call__(self, i: int) -> str:
        if self.ids is not None:
            return f"row {i} (request_id {self.ids[i]})"
        if len(self.files) > 1:
            ends = np.cumsum([rows for _, rows in self.files])
            f = int(np.searchsorted(ends, i, side="right"))
            return f"row {i} (file {self.files[f][0]} row {i - (ends[f - 1] if f else 0)})"
        return f"row {i}"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_table(table: pa.Table, columns: Columns, where: Locator, grid: bool | None = None) -> None:
    """Every bad input named by its logged column and row (before LoggedBandit's own checks, whose
    messages name its internal fields). ``grid``: the action kind, when known; else from the column type."""
    names = table.column_names
    for col in columns.names():
        if col not in names:
            raise BadInput(f"missing column {col!r} (the logs have {names})")
    for col in columns.names():
        values = table[col]
        if values.null_count:
            raise BadInput(f"column {col!r} {where(_first(np.asarray(values.is_null())))}: null")
    lists = {
        c for c in columns.names() if pa.types.is_list(table[c].type) or pa.types.is_fixed_size_list(table[c].type)
    }
    for col in lists:
        lengths = np.asarray(pc.list_value_length(table[col]).fill_null(0))
        if len(lengths) and (lengths != lengths[0]).any():
            i = _first(lengths != lengths[0])
            raise BadInput(f"column {col!r} {where(i)}: dimension {lengths[i]}, expected {lengths[0]} (as row 0)")
    if grid is None:
        grid = columns.action not in lists and pa.types.is_integer(table[columns.action].type)
    is_grid = grid
    for col in [*columns.context, *columns.reward, columns.propensity, columns.log_propensity]:
        if col:
            _check_finite(table, col, where)
    if not is_grid:
        _check_finite(table, columns.action, where)
        if columns.action_units == "weights":
            flat = _matrix(table[columns.action])
            if (flat <= 0).any():
                i = _first((flat <= 0).any(1))
                raise BadInput(
                    f"column {columns.action!r} {where(i)}: weights must be > 0 to take logs, got {flat[i].tolist()}"
                )
    if columns.propensity:
        p = _matrix(table[columns.propensity])[:, 0]
        bad = (p <= 0) | (p > 1) if is_grid else (p <= 0)
        if bad.any():
            i = _first(bad)
            want = "a probability in (0, 1]" if is_grid else "a density > 0"
            raise BadInput(f"column {columns.propensity!r} {where(i)}: must be {want}, got {p[i]}")
    elif is_grid:
        p = _matrix(table[columns.log_propensity])[:, 0]
        if (p > 0).any():
            i = _first(p > 0)
            raise BadInput(f"column {columns.log_propensity!r} {where(i)}: a log probability must be ≤ 0, got {p[i]}")


def _matrix(values) -> np.ndarray:
    """A numeric scalar or list column as float64 [n, k]."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), np.float64)
        return flat.reshape(len(values), -1)
    return np.asarray(values.to_numpy(zero_copy_only=False), np.float64).reshape(len(values), 1)


def _check_finite(table: pa.Table, col: str, where: Locator) -> None:
    try:
        values = _matrix(table[col])
    except (TypeError, ValueError, pa.ArrowInvalid) as e:
        raise BadInput(f"column {col!r}: not numeric ({table[col].type})") from e
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        i = _first(bad)
        raise BadInput(f"column {col!r} {where(i)}: value must be finite, got {values[i].tolist()}")


# ---------------------------------------------------------------------------------------------- reading


def parquet_files(paths: Sequence[str]) -> list[str]:
    """The Parquet files under ``paths`` (files, or directories searched recursively), in sorted order."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*.parquet"))
            if not found:
                raise BadInput(f"--logs {p!r}: no .parquet files under this directory")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise BadInput(f"--logs {p!r}: no such file or directory (cwd {os.getcwd()})")
    return files


def read_table(files: list[str], columns: list[str] | None, reader: str) -> pa.Table:
    """The rows of ``files`` in file order: pyarrow directly, or Ray Data (``preserve_order``)."""
    if reader == "pyarrow":
        return pads.dataset(files, format="parquet").to_table(columns=columns)
    init_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet(files, columns=columns, file_extensions=None)
    tables = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({c: [] for c in columns or []})


def request_table(events: pa.Table) -> pa.Table:
    """Telemetry events → one row per request (deduplicated): user_id, request_id, ts, the first event's
    context / utility_weights / propensity / weight_log_density, and the slate's summed rewards
    clicks, long_views (clicked and dwell ≥ LONG_VIEW_S), revenue, inner_reward."""
    events = dedupe(events)
    clicked = pc.fill_null(events["clicked"], False)
    long_view = pc.and_(clicked, pc.greater_equal(pc.fill_null(events["dwell_s"], 0.0), LONG_VIEW_S))
    rewards = pa.table(
        {
            "request_id": events["request_id"],
            "clicks": pc.cast(clicked, pa.int64()),
            "long_views": pc.cast(long_view, pa.int64()),
            "revenue": pc.fill_null(pc.cast(events["revenue"], pa.float64()), 0.0),
            "inner_reward": pc.fill_null(pc.cast(events["inner_reward"], pa.float64()), 0.0),
        }
    )
    sums = rewards.group_by("request_id").aggregate([(r, "sum") for r in EVENT_REWARDS])
    first = events.filter(pc.equal(events["position"], 0))
    idx = pc.index_in(first["request_id"], value_set=sums["request_id"])
    keep = ["user_id", "request_id", "ts", "context", "utility_weights", "propensity", "weight_log_density"]
    out = first.select(keep)
    for r in EVENT_REWARDS:
        out = out.append_column(r, pc.cast(pc.take(sums[f"{r}_sum"], idx), pa.float64()))
    return out


def read_requests(files: list[str], reader: str, num_partitions: int) -> pa.Table:
    """The events preset's request rows, sorted by (user, time, request) whichever way they were read."""
    schema = pads.dataset(files, format="parquet").schema
    missing = [f.name for f in EVENT_SCHEMA if f.name not in schema.names]
    if missing:
        raise BadInput(f"missing column {missing[0]!r}: not a telemetry event log (use --preset generic)")
    if reader == "pyarrow":
        requests = request_table(pads.dataset(files, format="parquet", schema=EVENT_SCHEMA).to_table())
    else:
        init_ray()
        ds = ray.data.read_parquet(files, schema=EVENT_SCHEMA, partitioning=None, file_extensions=None)
        parts = ray.get(map_user_partitions(ds, request_table, num_partitions).to_arrow_refs())
        requests = pa.concat_tables(parts) if parts else request_table(EVENT_SCHEMA.empty_table())
    return requests.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("request_id", "ascending")])


# ---------------------------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    """One candidate: ``kind`` grid (action | weights | probabilities), gaussian (mean, std), or
    deterministic (weights, bandwidth); weights in weight units, ``low``/``high`` its box."""

    name: str
    kind: str
    action: int | None = None
    probabilities: list[float] | None = None
    weights: list[float] | None = None
    mean: list[float] | None = None
    std: Any = None
    bandwidth: Any = 0.1
    low: Any = None
    high: Any = None


POLICY_FIELDS = {
    "grid": {"action", "weights", "probabilities"},
    "gaussian": {"mean", "std", "low", "high"},
    "deterministic": {"weights", "bandwidth", "low", "high"},
}


def load_policies(path: str) -> list[Policy]:
    """Parse and check the policies file; errors name the policy and the field."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise BadInput(f"--policies {path!r}: {e.strerror} (cwd {os.getcwd()})") from e
    except yaml.YAMLError as e:
        raise BadInput(f"--policies {path!r}: not YAML ({str(e).splitlines()[0]})") from e
    raw = raw.get("policies") if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise BadInput(f"--policies {path!r}: expected a non-empty list of policies (or {{policies: [...]}})")
    out, seen = [], set()
    for k, p in enumerate(raw):
        name = p.get("name", f"#{k}") if isinstance(p, dict) else f"#{k}"
        if not isinstance(p, dict) or p.get("kind") not in POLICY_FIELDS:
            raise BadInput(f"policy {name!r}: 'kind' must be one of {sorted(POLICY_FIELDS)}")
        unknown = set(p) - {"name", "kind"} - POLICY_FIELDS[p["kind"]]
        if unknown:
            raise BadInput(f"policy {name!r}: unknown field(s) {sorted(unknown)} for kind {p['kind']!r}")
        if name in seen:
            raise BadInput(f"policy {name!r}: duplicate name")
        seen.add(name)
        given = {"action", "weights", "probabilities"} & set(p) if p["kind"] == "grid" else None
        if given is not None and len(given) != 1:
            raise BadInput(f"policy {name!r}: a grid policy needs exactly one of action, weights, probabilities")
        needed = {"gaussian": ("mean", "std"), "deterministic": ("weights",)}.get(p["kind"], ())
        for f in needed:
            if f not in p:
                raise BadInput(f"policy {name!r}: field {f!r} is required for kind {p['kind']!r}")
        out.append(Policy(name=str(name), **{f: v for f, v in p.items() if f != "name"}))
    return out


def _log_weights(policy: Policy, field_name: str, values, k: int, box: tuple | None) -> np.ndarray:
    """Weight units → log-weights [k] (a zero lifted to the box's floor when there is one)."""
    w = np.asarray(values, np.float64).reshape(-1)
    if w.shape != (k,):
        raise BadInput(
            f"policy {policy.name!r}: field {field_name!r} has {w.size} weights, the logged actions have {k}"
            " (column action, row 0)"
        )
    if box is not None:
        w = np.maximum(w, np.exp(box[0]))
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise BadInput(f"policy {policy.name!r}: field {field_name!r} must be finite weights > 0, got {w.tolist()}")
    return np.log(w)


def _box(policy: Policy, k: int, default: tuple | None) -> tuple | None:
    if policy.low is None and policy.high is None:
        return default
    with np.errstate(divide="ignore"):  # low 0 → log −inf: open below
        low = np.log(np.broadcast_to(np.asarray(policy.low if policy.low is not None else 0.0, np.float64), (k,)))
    high = np.log(np.broadcast_to(np.asarray(policy.high if policy.high is not None else np.inf, np.float64), (k,)))
    if np.isnan(low).any() or np.isnan(high).any() or (low >= high).any():
        raise BadInput(f"policy {policy.name!r}: fields 'low'/'high' must be weights with 0 ≤ low < high")
    return low, high


def policy_target(policy: Policy, data: LoggedBandit, grid: ActionGrid | None, box: tuple | None):
    """The estimators' target for a policy on ``data``: [n, A] probabilities, a GaussianPolicy, or [n, k] actions."""
    n = len(data)
    if policy.kind == "grid":
        if data.continuous:
            raise BadInput(f"policy {policy.name!r} is a grid policy, but the logged actions are weight vectors")
        a = data.n_actions
        if policy.probabilities is not None:
            pi = np.asarray(policy.probabilities, np.float64).reshape(-1)
            if pi.shape != (a,) or not np.isfinite(pi).all() or (pi < 0).any() or abs(pi.sum() - 1) > 1e-6:
                raise BadInput(
                    f"policy {policy.name!r}: field 'probabilities' must be {a} probabilities summing to 1"
                    f" (the logs have {a} actions), got {pi.tolist()}"
                )
            return np.broadcast_to(pi, (n, a))
        if policy.weights is not None:
            if grid is None:
                raise BadInput(f"policy {policy.name!r}: field 'weights' needs --preset events --action-space grid")
            try:
                index = int(grid.index_of(np.asarray(policy.weights, np.float64))[0])
            except ValueError as e:
                raise BadInput(f"policy {policy.name!r}: field 'weights': {e}") from e
        else:
            index = policy.action
        if not isinstance(index, int) or not 0 <= index < a:
            raise BadInput(f"policy {policy.name!r}: field 'action' must be a grid index in [0, {a}), got {index!r}")
        return np.full(n, index, np.int64)
    if not data.continuous:
        raise BadInput(
            f"policy {policy.name!r} is a {policy.kind} weight policy, but the logged actions are grid indices"
        )
    k = data.action_dim
    box = _box(policy, k, box)
    if policy.kind == "gaussian":
        mean = _log_weights(policy, "mean", policy.mean, k, box)
        std = np.broadcast_to(np.asarray(policy.std, np.float64), (k,)) if np.ndim(policy.std) < 2 else None
        if std is None or not (np.isfinite(std).all() and (std > 0).all()):
            raise BadInput(f"policy {policy.name!r}: field 'std' must be one or {k} standard deviations > 0 (of log w)")
        low, high = box if box is not None else (None, None)
        return GaussianPolicy(mean, std.copy(), low, high)
    a = _log_weights(policy, "weights", policy.weights, k, box)
    if box is not None:
        a = np.clip(a, *box)
    return np.broadcast_to(a, (n, k))


# ---------------------------------------------------------------------------------------------- estimators

GRID_ESTIMATORS = {"ips": IPS, "snips": SNIPS, "dm": DM, "dr": DR, "sndr": SNDR, "switch_dr": SwitchDR}
# weight-vector policies: IPS / SNIPS become their density-ratio (Gaussian) or kernel (deterministic) forms
GAUSSIAN_ESTIMATORS = {"ips": DensityRatioIPS, "snips": DensityRatioSNIPS}
DETERMINISTIC_ESTIMATORS = {"snips": KernelSNIPS, "kernel_snips": KernelSNIPS}
ESTIMATOR_NAMES = sorted({*GRID_ESTIMATORS, *GAUSSIAN_ESTIMATORS, *DETERMINISTIC_ESTIMATORS})


def estimators_for(policy: Policy, names: Sequence[str], interval, abstain: AbstainRule, tau: float) -> list:
    """The requested estimators that apply to this policy's kind (in ``names`` order, no repeats)."""
    table = {"grid": GRID_ESTIMATORS, "gaussian": GAUSSIAN_ESTIMATORS, "deterministic": DETERMINISTIC_ESTIMATORS}
    out, seen = [], set()
    for name in names:
        cls = table[policy.kind].get(name)
        if cls is None or cls in seen:
            continue
        seen.add(cls)
        kw: dict[str, Any] = {"interval": interval, "abstain": abstain}
        if cls is SwitchDR:
            kw["tau"] = tau
        if cls is KernelSNIPS:
            kw["bandwidth"] = policy.bandwidth
        out.append(cls(**kw))
    return out


def make_interval(kind: str, level: float, n_boot: int, seed: int):
    return {
        "normal": lambda: Normal(level),
        "bootstrap": lambda: Bootstrap(level, n_boot, seed),
        "ess": lambda: EssCorrected(level),
    }[kind]()


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class Evaluation:
    """Loaded logs and what was dropped on the way."""

    data: LoggedBandit
    where: Locator
    grid: ActionGrid | None = None
    box: tuple | None = None
    notes: list[str] = field(default_factory=list)


def _wrap_row(e: ValueError, where: Locator) -> BadInput:
    """LoggedBandit's ``row i`` → our locator (file and row, or request id)."""
    return BadInput(re.sub(r"\brow (\d+)\b", lambda m: where(int(m.group(1))), str(e), count=1))


def load_generic(files: list[str], columns: Columns, reader: str, n_actions: int | None) -> Evaluation:
    schema = pads.dataset(files, format="parquet").schema
    for col in columns.names():
        if col not in schema.names:
            raise BadInput(f"missing column {col!r} (the logs have {schema.names})")
    table = read_table(files, list(dict.fromkeys(columns.names())), reader)
    where = Locator(tuple((f, pq.ParquetFile(f).metadata.num_rows) for f in files))
    check_table(table, columns, where)
    return Evaluation(_bandit(table, columns, where, n_actions), where)


def _bandit(table: pa.Table, columns: Columns, where: Locator, n_actions: int | None) -> LoggedBandit:
    """LoggedBandit from a checked table: continuous actions to log-weights, log propensities to densities."""
    action = table[columns.action]
    is_list = pa.types.is_list(action.type) or pa.types.is_fixed_size_list(action.type)
    if is_list or pa.types.is_floating(action.type):
        a = _matrix(action)
        action_values = np.log(a) if columns.action_units == "weights" else a
    else:
        action_values = np.asarray(action.to_numpy(), np.int64)
    p_col = columns.propensity or columns.log_propensity
    p = _matrix(table[p_col])[:, 0]
    if columns.log_propensity:
        p = np.exp(p)
        if (p <= 0).any():
            i = _first(p <= 0)
            raise BadInput(
                f"column {p_col!r} {where(i)}: density exp({np.log(p[i]) if p[i] else '-inf'}) underflows to 0"
            )
    cols = {"action": action_values, "propensity": p, **{r: _matrix(table[r])[:, 0] for r in columns.reward}}
    for c in columns.context:
        cols[f"context:{c}"] = _matrix(table[c])
    context = np.concatenate([cols[f"context:{c}"] for c in columns.context], axis=1) if columns.context else None
    try:
        return LoggedBandit(
            context=context if context is not None else np.zeros((len(p), 0)),
            action=action_values,
            reward=np.column_stack([cols[r] for r in columns.reward]),
            propensity=p,
            clusters=np.asarray(table[columns.cluster].to_numpy(zero_copy_only=False)) if columns.cluster else None,
            reward_names=columns.reward,
            n_actions=n_actions,
            sources={
                "action": columns.action,
                "propensity": p_col,
                **({"context": ", ".join(columns.context)} if columns.context else {}),
                **({"clusters": columns.cluster} if columns.cluster else {}),
            },
        )
    except ValueError as e:
        raise _wrap_row(e, where) from e


def load_events(
    files: list[str], columns: Columns, action_space: str, reader: str, num_partitions: int, grid: ActionGrid
) -> Evaluation:
    requests = read_requests(files, reader, num_partitions)
    notes = []
    if action_space == "grid":
        p = requests["propensity"]
        explore = pc.and_(pc.is_valid(p), pc.less(pc.fill_null(p, 1.0), 1.0))
        weights = _matrix(
            pc.fill_null(requests["utility_weights"], pa.scalar([0.0] * 3, requests["utility_weights"].type))
        )
        index, on_grid = grid.match(weights)
        keep = pc.and_(explore, pa.array(on_grid))
        requests = requests.append_column("grid_action", pa.array(index.astype(np.int64)))
        cols = replace(columns, action="grid_action", propensity="propensity", log_propensity=None)
        what = "exploration requests (propensity < 1, weights on the grid)"
    else:
        keep = pc.is_valid(requests["weight_log_density"])
        cols = replace(
            columns,
            action="utility_weights",
            propensity=None,
            log_propensity="weight_log_density",
            action_units="weights",
        )
        what = "Gaussian-logged requests (weight_log_density set)"
    dropped = requests.num_rows - pc.sum(pc.cast(keep, pa.int64())).as_py() if requests.num_rows else 0
    requests = requests.filter(keep)
    notes.append(f"{requests.num_rows} {what} from {len(files)} file(s); {dropped} other requests dropped")
    if requests.num_rows == 0:
        raise BadInput(f"no {what} in the logs ({dropped} requests dropped)")
    where = Locator(ids=np.asarray(requests["request_id"].to_pylist(), object))
    check_table(requests, cols, where, grid=action_space == "grid")
    n_actions = grid.size if action_space == "grid" else None
    box = None
    if action_space == "weights":
        high = np.log(np.asarray(RANKING_ACTION_HIGH, np.float64))
        box = (high + np.log(WEIGHT_FLOOR), high)
    return Evaluation(
        _bandit(requests, cols, where, n_actions), where, grid if action_space == "grid" else None, box, notes
    )


def evaluate(
    ev: Evaluation, policies: list[Policy], names: Sequence[str], interval, abstain: AbstainRule, tau: float
) -> list[dict]:
    """One row per policy × estimator × reward."""
    rows = []
    for policy in policies:
        target = policy_target(policy, ev.data, ev.grid, ev.box)
        ests = estimators_for(policy, names, interval, abstain, tau)
        if not ests:
            raise BadInput(
                f"policy {policy.name!r}: none of --estimators {','.join(names)} applies to kind {policy.kind!r}"
            )
        for est in ests:
            try:
                results = est.estimate_all(ev.data, target)
            except ValueError as e:
                raise BadInput(f"policy {policy.name!r}, {est.name}: {_wrap_row(e, ev.where)}") from e
            rows += [_row(policy.name, e) for e in results.values()]
    return rows


def _row(policy: str, e: Estimate) -> dict:
    return {
        "policy": policy,
        "estimator": e.method,
        "reward": e.reward,
        "estimate": None if e.abstained else e.value,
        "low": None if e.abstained else e.low,
        "high": None if e.abstained else e.high,
        "interval": e.interval,
        "level": e.level,
        "ess": e.ess,
        "n": e.n,
        "abstained": e.abstained,
        "reason": e.reason,
        **({"info": dict(e.info)} if e.info else {}),
    }


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of the result rows."""
    head = ["policy", "estimator", "reward", "estimate", "interval", "ESS", "n", "abstained"]

    def num(x: float | None) -> str:
        return "-" if x is None or not np.isfinite(x) else f"{x:.4g}"

    body = [
        [
            r["policy"],
            r["estimator"],
            r["reward"],
            num(r["estimate"]),
            "-" if r["abstained"] else f"[{num(r['low'])}, {num(r['high'])}]",
            f"{r['ess']:.1f}",
            str(r["n"]),
            f"yes: {r['reason']}" if r["abstained"] else "no",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rllib_policies.evaluate_logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--logs", nargs="+", required=True, help="Parquet file(s) or directories")
    p.add_argument("--policies", required=True, help="YAML file of candidate policies")
    p.add_argument("--preset", choices=("generic", "events"), default="generic")
    p.add_argument(
        "--columns",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="context, action, reward, propensity, log_propensity, cluster, action_units",
    )
    p.add_argument(
        "--action-space", choices=("grid", "weights"), default="grid", help="events preset: grid index or log-weights"
    )
    p.add_argument(
        "--grid", type=int, default=DEFAULT_GRID.n, help="events preset: the action grid's values per weight"
    )
    p.add_argument("--n-actions", type=int, default=None, help="generic grid logs: |A| (default: max logged index + 1)")
    p.add_argument("--estimators", default="snips,dr", help=f"comma-separated, of {ESTIMATOR_NAMES}")
    p.add_argument("--interval", choices=("normal", "bootstrap", "ess"), default="ess")
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--min-ess", type=float, default=AbstainRule.min_ess)
    p.add_argument("--min-ess-fraction", type=float, default=AbstainRule.min_ess_fraction)
    p.add_argument("--tau", type=float, default=float("inf"), help="switch_dr's weight threshold")
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--reader", choices=("auto", "pyarrow", "ray"), default="auto", help="auto: pyarrow for one file, else Ray Data"
    )
    p.add_argument("--num-partitions", type=int, default=8, help="events preset under Ray Data: user partitions")
    p.add_argument("--json", default=None, help="also write the rows here (an absolute path under `ray job submit`)")
    return p


def run(args: argparse.Namespace, log: Callable[[str], Any] = print) -> list[dict]:
    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    unknown = [n for n in names if n not in ESTIMATOR_NAMES]
    if unknown or not names:
        raise BadInput(f"--estimators: unknown {unknown or names} (known: {ESTIMATOR_NAMES})")
    if not 0 < args.level < 1:
        raise BadInput(f"--level {args.level}: must be in (0, 1)")
    policies = load_policies(args.policies)
    files = parquet_files(args.logs)
    reader = args.reader if args.reader != "auto" else ("pyarrow" if len(files) == 1 else "ray")
    if args.preset == "events":
        base = Columns(context=("context",), reward=("clicks", "long_views"), cluster="user_id")
        columns = Columns.parse(args.columns, base)
        bad = [r for r in columns.reward if r not in EVENT_REWARDS]
        if bad:
            raise BadInput(
                f"--columns reward: {bad[0]!r} is not a per-request reward (events preset: {list(EVENT_REWARDS)})"
            )
        grid = ActionGrid(args.grid, DEFAULT_GRID.high)
        ev = load_events(files, columns, args.action_space, reader, args.num_partitions, grid)
    else:
        ev = load_generic(files, Columns.parse(args.columns), reader, args.n_actions)
    for note in ev.notes:
        log(note)
    interval = make_interval(args.interval, args.level, args.n_boot, args.seed)
    abstain = AbstainRule(args.min_ess, args.min_ess_fraction)
    rows = evaluate(ev, policies, names, interval, abstain, args.tau)
    log(
        f"{len(ev.data)} rows; {interval.name} intervals at level {interval.level:g}; abstain when ESS < "
        f"{abstain.min_ess:g} or ESS/n < {abstain.min_ess_fraction:g}"
    )
    log(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        log(f"wrote {os.path.abspath(args.json)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args, lambda line: print(line, flush=True))
    except BadInput as e:
        print(f"evaluate_logs: error: {e}", file=sys.stderr)
        return 2
    except (OSError, pa.ArrowInvalid) as e:  # unreadable or corrupt Parquet: one line, not a traceback
        print(f"evaluate_logs: error: cannot read the logs: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
