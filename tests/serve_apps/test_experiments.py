"""The A/B split: config errors name the field, assignment is sticky and proportional, per-arm KPIs and
their user-clustered intervals are right on a table with a known answer."""

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from actors.telemetry import slates_events
from serve_apps.experiments import ArmSplit, arm_report, request_kpis

TWO_ARMS = {"name": "exp", "arms": {"control": {"share": 0.7}, "treatment": {"share": 0.3, "weights": [0, 0, 1]}}}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({**TWO_ARMS, "seed": 1}, "unknown experiment options"),
        ({**TWO_ARMS, "name": ""}, "experiment.name must be a non-empty string"),
        ({"name": "e", "arms": {}}, "experiment.arms must map at least one arm"),
        ({"name": "e", "arms": {"a": {"share": 1.5}}}, r"experiment.arms.a.share must be a number in \(0, 1\]"),
        ({"name": "e", "arms": {"a": {"share": 0.5}, "b": {"share": 0.4}}}, "shares must sum to 1, got 0.9"),
        ({"name": "e", "arms": {"a": {"share": 1, "policy": "oracle"}}}, "experiment.arms.a.policy must be one of"),
        ({"name": "e", "arms": {"a": {"share": 1, "weights": [1, -1, 0]}}}, "experiment.arms.a.weights must be 3"),
        ({"name": "e", "arms": {"a": {"share": 1, "weights": [0, 0, 0]}}}, "not all 0"),
        ({"name": "e", "arms": {"a": {"share": 1, "colour": 1}}}, "unknown experiment.arms.a options"),
    ],
)
def test_bad_experiment_config(config, match):
    with pytest.raises(ValueError, match=match):
        ArmSplit.from_config(config)


def test_assignment_is_sticky_proportional_and_salted():
    split = ArmSplit.from_config(TWO_ARMS)
    users = np.arange(20_000)
    arms = split.assign(users)
    np.testing.assert_array_equal(arms, split.assign(users))  # sticky: a pure function of (salt, user)
    np.testing.assert_array_equal(arms[::-1], split.assign(users[::-1]))  # whatever else is in the batch
    n_treat = int((arms == 1).sum())
    lo, hi = stats.binom.ppf([0.0005, 0.9995], len(users), 0.3)
    assert lo <= n_treat <= hi, n_treat
    other = ArmSplit.from_config({**TWO_ARMS, "salt": "another"}).assign(users)
    assert 0.3 < (other != arms).mean() < 0.55  # a new salt reshuffles (independent: 2·0.7·0.3 = 0.42)


AB = ArmSplit.from_config({"name": "exp", "arms": {"a": {"share": 0.5}, "b": {"share": 0.5}}})


def _events(arm: str, users: np.ndarray, clicks: np.ndarray, dwell: np.ndarray, version: int = 2) -> pa.Table:
    b, k = clicks.shape
    batch = slates_events(
        request_uids=np.arange(b, dtype=np.uint64) + (0 if arm == "a" else 10**6),
        ts_us=np.zeros(b, np.int64),
        user_ids=users,
        items=np.tile(np.arange(k), (b, 1)),
        clicked=clicks,
        dwell_s=dwell,
        skipped=np.zeros((b, k), bool),
        inner_reward=np.ones((b, k), np.float32),
        predictions={"p_click": np.zeros((b, k))},
        arm=f"exp/{arm}",
        arm_version=version,
    )
    return pa.Table.from_batches([batch])


def test_arm_report_means_and_clustered_intervals():
    rng = np.random.default_rng(0)
    n, k = 400, 4
    a = _events("a", rng.integers(0, 50, n), rng.random((n, k)) < 0.25, np.full((n, k), 20.0))
    b = _events("b", rng.integers(50, 100, n), rng.random((n, k)) < 0.5, np.full((n, k), 5.0))
    none = _events("a", np.zeros(3, np.int64), np.ones((3, k), bool), np.ones((3, k))).drop(["arm"])
    none = none.append_column("arm", pa.nulls(none.num_rows, pa.string()))  # events outside the experiment
    per_request = request_kpis(pa.concat_tables([a, b]))
    assert per_request.num_rows == 2 * n
    old = _events("a", rng.integers(0, 50, n), np.ones((n, k), bool), np.full((n, k), 20.0), version=1)
    other = _events("a", rng.integers(0, 50, n), np.ones((n, k), bool), np.full((n, k), 20.0))
    other = other.set_column(other.schema.get_field_index("arm"), "arm", pa.array(["old-exp/a"] * other.num_rows))
    report = arm_report(pa.concat_tables([a, b, old, other, none.select(a.column_names)]), AB, {"a": 2})
    assert set(report) == {"a", "b"} and report["a"]["requests"] == n and report["a"]["users"] <= 50
    ka, kb = report["a"]["kpis"], report["b"]["kpis"]
    assert ka["clicks"]["low"] < 1.0 < ka["clicks"]["high"]  # 4 · 0.25
    assert kb["clicks"]["low"] < 2.0 < kb["clicks"]["high"]
    assert ka["long_views"]["mean"] == ka["clicks"]["mean"] and kb["long_views"]["mean"] == 0  # dwell 20 vs 5 s
    assert ka["inner_reward"] == {"mean": 4.0, "low": 4.0, "high": 4.0}
    pooled = arm_report(pa.concat_tables([a, old]), AB)  # no version given: every version of the arm
    assert pooled["a"]["requests"] == 2 * n and "b" not in pooled
    one_user = arm_report(_events("a", np.zeros(5, np.int64), np.ones((5, k), bool), np.ones((5, k))), AB)
    assert one_user["a"]["kpis"]["clicks"] == {"mean": 4.0, "low": None, "high": None}  # one cluster: no interval
