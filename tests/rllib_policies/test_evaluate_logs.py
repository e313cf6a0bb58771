"""The OPE CLI end to end (rllib_policies.evaluate_logs): synthetic logged-bandit Parquet with known values,
the four bad inputs (exit 2, one line naming the column and the row), abstention, the events preset."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from actors.telemetry import slates_events
from rllib_policies.evaluate_logs import main
from rllib_policies.utility_agent.exploration import DEFAULT_GRID
from tests.ray_jobs import submit

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from make_ope_example import main as make_example  # noqa: E402


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("ope")
    return out, make_example(str(out))


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


GRID_COLUMNS = ["--columns", "context=x0,x1,x2", "cluster=user"]
WEIGHT_COLUMNS = ["--columns", "context=x0,x1", "action=weights", "propensity=density", "cluster=user"]


def test_grid_logs_cover_the_true_values(example, capsys, tmp_path):
    out, truth = example
    rc, stdout, _ = cli(
        capsys,
        "--logs", out / "grid_logs.parquet", "--policies", out / "grid_policies.yaml", *GRID_COLUMNS,
        "--estimators", "snips,dr", "--json", tmp_path / "rows.json",
    )  # fmt: skip
    assert rc == 0, stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(r["policy"], r["estimator"]) for r in rows} == {
        (p, e) for p in ("uniform", "mostly_4", "always_4") for e in ("snips", "dr")
    }
    near = next(r for r in rows if r["policy"] == "uniform" and r["estimator"] == "snips")
    assert not near["abstained"] and near["low"] <= truth["grid"]["uniform"] <= near["high"]
    assert near["n"] == 4000 and 2000 < near["ess"] < 4000
    for line in ("policy", "uniform", "snips", "dr", "[", "ess_corrected intervals at level 0.95"):
        assert line in stdout


def test_weight_logs_cover_near_and_abstain_far(example, capsys):
    out, truth = example
    rc, stdout, _ = cli(
        capsys,
        "--logs", out / "weight_logs.parquet", "--policies", out / "weight_policies.yaml", *WEIGHT_COLUMNS,
        "--estimators", "snips", "--interval", "normal",
    )  # fmt: skip
    assert rc == 0
    lines = {(ln.split()[0], ln.split()[1]): ln for ln in stdout.splitlines()[3:]}
    near = lines["near", "density_ratio_snips"]
    low, high = (float(x) for x in near.split("[")[1].split("]")[0].split(","))
    assert low <= truth["weights"]["near"] <= high and near.rstrip().endswith("no")
    assert "yes: ESS" in lines["far", "density_ratio_snips"] and "< min_ess 100" in lines["far", "density_ratio_snips"]
    assert "kernel_snips" in lines["fixed", "kernel_snips"]


def _grid_table(n=50):
    rng = np.random.default_rng(1)
    return {
        "x0": rng.standard_normal(n),
        "action": rng.integers(0, 3, n),
        "reward": rng.random(n),
        "propensity": np.full(n, 1 / 3),
    }


def _bad(table, column, row, value):
    table = {k: (list(v) if not isinstance(v, list) else v) for k, v in table.items()}
    if value is _bad:
        del table[column]
    else:
        table[column][row] = value
    return table


RAGGED = [[1.0, 2.0]] * 50


@pytest.mark.parametrize(
    "edit, policy, match",
    [
        (lambda t: _bad(t, "propensity", 0, _bad), None, r"missing column 'propensity'"),
        (
            lambda t: _bad(t, "propensity", 7, 0.0),
            None,
            r"column 'propensity' row 7: must be a probability in \(0, 1\]",
        ),
        (lambda t: _bad(t, "propensity", 9, 1.5), None, r"column 'propensity' row 9: .*got 1.5"),
        (lambda t: _bad(t, "reward", 11, float("nan")), None, r"column 'reward' row 11: value must be finite"),
        (lambda t: _bad(t, "reward", 12, None), None, r"column 'reward' row 12: null"),
        (
            lambda t: {**t, "action": [[1.0, 2.0]] * 13 + [[1.0, 2.0, 3.0]] + [[1.0, 2.0]] * 36},
            None,
            r"column 'action' row 13: dimension 3, expected 2",
        ),
        (
            lambda t: {**t, "action": RAGGED},
            {"name": "g", "kind": "gaussian", "mean": [1.0, 1.0, 1.0], "std": 0.3},
            r"policy 'g': field 'mean' has 3 weights, the logged actions have 2 \(column action, row 0\)",
        ),
    ],
    ids=["missing", "propensity0", "propensity>1", "nan_reward", "null_reward", "ragged_action", "policy_dim"],
)
def test_bad_input_exits_2_naming_column_and_row(tmp_path, capsys, edit, policy, match):
    pq.write_table(pa.table(edit(_grid_table())), tmp_path / "logs.parquet")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump([policy or {"name": "a0", "kind": "grid", "action": 0}]))
    rc, stdout, stderr = cli(capsys, "--logs", tmp_path / "logs.parquet", "--policies", tmp_path / "p.yaml")
    assert rc == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("evaluate_logs: error: ")
    assert re.search(match, stderr), stderr


def test_errors_name_the_users_columns_and_a_corrupt_file_exits_2(tmp_path, capsys):
    """Renamed columns: the checks past the CLI's own name the logged column ('arm'), not the field."""
    t = _grid_table()
    t["arm"] = t.pop("action")
    t["arm"][3] = 5
    pq.write_table(pa.table(t), tmp_path / "logs.parquet")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump([{"name": "a0", "kind": "grid", "action": 0}]))
    args = ("--policies", tmp_path / "p.yaml", "--columns", "action=arm", "--n-actions", "3")
    rc, _, stderr = cli(capsys, "--logs", tmp_path / "logs.parquet", *args)
    assert rc == 2 and "column 'arm' row 3: grid index 5" in stderr, stderr
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not a parquet file")
    rc, _, stderr = cli(capsys, "--logs", tmp_path / "corrupt.parquet", *args)
    assert rc == 2 and stderr.startswith("evaluate_logs: error: ") and len(stderr.strip().splitlines()) == 1


def test_row_of_a_bad_value_names_its_file(tmp_path, capsys):
    """Several files: the row is located in its file (read in sorted file order)."""
    (tmp_path / "logs").mkdir()
    t = _grid_table(20)
    pq.write_table(pa.table(t), tmp_path / "logs" / "a.parquet")
    pq.write_table(pa.table(_bad(t, "propensity", 3, -0.1)), tmp_path / "logs" / "b.parquet")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"policies": [{"name": "a0", "kind": "grid", "action": 0}]}))
    rc, _, stderr = cli(capsys, "--logs", tmp_path / "logs", "--policies", tmp_path / "p.yaml", "--reader", "pyarrow")
    assert rc == 2
    assert f"column 'propensity' row 23 (file {tmp_path}/logs/b.parquet row 3): must be a probability" in stderr


@pytest.mark.parametrize(
    "policy, match",
    [
        ({"name": "x", "kind": "grid"}, r"policy 'x': a grid policy needs exactly one of"),
        ({"name": "x", "kind": "grid", "action": 5}, r"policy 'x': field 'action' must be a grid index in \[0, 3\)"),
        ({"name": "x", "kind": "grid", "probabilities": [0.5, 0.5]}, r"policy 'x': field 'probabilities' must be 3"),
        ({"name": "x", "kind": "grid", "action": 0, "std": 1}, r"policy 'x': unknown field\(s\) \['std'\]"),
        ({"name": "x", "kind": "gaussian", "mean": [1.0], "std": 0.3}, r"policy 'x' is a gaussian weight policy, but"),
        ({"name": "x", "kind": "beta"}, r"policy 'x': 'kind' must be one of"),
    ],
)
def test_bad_policies_exit_2_naming_policy_and_field(tmp_path, capsys, policy, match):
    pq.write_table(pa.table(_grid_table()), tmp_path / "logs.parquet")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump([policy]))
    rc, _, stderr = cli(capsys, "--logs", tmp_path / "logs.parquet", "--policies", tmp_path / "p.yaml")
    assert rc == 2 and re.search(match, stderr), stderr


def test_events_preset_aggregates_requests(tmp_path, capsys):
    """Telemetry events: grid exploration (propensity 1/49) plus greedy requests (propensity 1, dropped);
    clicks per request have a known mean for each grid action."""
    rng = np.random.default_rng(0)
    b, k, d = 3000, 4, 3
    grid = DEFAULT_GRID.weights
    action = rng.integers(0, len(grid), b)
    explore = np.arange(b) % 10 != 0
    action[~explore] = 0
    p_click = np.where(action == 10, 0.5, 0.1)
    clicked = rng.random((b, k)) < p_click[:, None]
    batch = slates_events(
        request_uids=np.arange(1, b + 1, dtype=np.uint64),
        ts_us=1_700_000_000_000_000 + np.arange(b) * 10**6,
        user_ids=np.arange(b) % 97,
        items=rng.integers(0, 1000, (b, k)),
        clicked=clicked,
        dwell_s=np.where(clicked, 30.0, 0.0),
        skipped=~clicked,
        inner_reward=rng.random((b, k)),
        predictions={"p_click": rng.random((b, k))},
        utility_weights=grid[action],
        propensity=np.where(explore, 1 / len(grid), 1.0),
        context=rng.standard_normal((b, d)),
    )
    table = pa.Table.from_batches([batch])
    pq.write_table(pa.concat_tables([table, table.slice(0, 40)]), tmp_path / "events.parquet")  # duplicates
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            [
                {"name": "a10", "kind": "grid", "action": 10},
                {"name": "live", "kind": "grid", "weights": grid[3].tolist()},
            ]
        )
    )
    rc, stdout, stderr = cli(
        capsys, "--preset", "events", "--logs", tmp_path / "events.parquet", "--policies", tmp_path / "p.yaml",
        "--estimators", "snips", "--level", 0.99, "--min-ess", 10, "--json", tmp_path / "rows.json",
    )  # fmt: skip
    assert rc == 0, stderr
    assert (
        f"{int(explore.sum())} exploration requests" in stdout
        and f"{b - int(explore.sum())} other requests dropped" in stdout
    )
    rows = {(r["policy"], r["reward"]): r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {(p, r) for p in ("a10", "live") for r in ("clicks", "long_views")}
    assert rows["a10", "clicks"]["low"] <= 0.5 * k <= rows["a10", "clicks"]["high"]
    assert rows["live", "clicks"]["low"] <= 0.1 * k <= rows["live", "clicks"]["high"]
    # every click here is a long view (dwell 30 s ≥ 18 s)
    assert rows["a10", "long_views"]["estimate"] == pytest.approx(rows["a10", "clicks"]["estimate"])


@pytest.mark.slow  # the same main runs in process above; `ray job submit` itself in test_train_job
@pytest.mark.ray
def test_ray_job_submit(example, ray_head, tmp_path):
    """A real `ray job submit --working-dir .` of the CLI against a local head (absolute paths in and out)."""
    env, address, _ = ray_head
    out, truth = example
    argv = ["--logs", out / "grid_logs.parquet", "--policies", out / "grid_policies.yaml", *GRID_COLUMNS]
    json_out = ["--json", str(tmp_path / "rows.json")]
    logs = submit(env, address, "python", "-m", "rllib_policies.evaluate_logs", *map(str, argv), *json_out)
    assert "uniform" in logs and "ess_corrected intervals" in logs
    rows = json.loads((tmp_path / "rows.json").read_text())
    near = next(r for r in rows if r["policy"] == "uniform" and r["estimator"] == "snips")
    assert near["low"] <= truth["grid"]["uniform"] <= near["high"]
