"""The operator page's pure parts: the daily cycle's timeline from its day records, and the page's asset allowlist."""

import json

import pytest

from serve_apps.operator import ASSETS, asset, cycle_timeline


def _day(day, status, breach=False, shadow=None):
    return {
        "day": day,
        "candidate": {
            "status": status,
            "gate": {"passed": status == "promoted", "checks": {"kl": {"ok": False, "why": "too far"}}},
        },
        "monitor": {
            "breach": breach,
            "kl": 0.1 * day,
            "why": ["KL"] if breach else [],
            "rolled_back_to": {"version": 1} if breach else None,
        },
        "shadow": {"status": shadow} if shadow else None,
        "arms": {"control": {"requests": 10, "objective": {"mean": 0.5, "low": 0.4, "high": 0.6}}},
        "live": {"version": 2, "weights": [1, 1, 10]},
    }


def test_the_timeline_counts_each_fate_and_lists_an_unreadable_day(tmp_path):
    days = tmp_path / "days"
    days.mkdir()
    records = [_day(0, "training failed"), _day(1, "promoted"), _day(2, "rejected", breach=True), _day(3, "in shadow")]
    records.append(_day(4, "rejected", shadow="promoted after shadow"))
    for r in records:
        (days / f"day_{r['day']:03d}.json").write_text(json.dumps(r))
    (days / "day_005.json").write_text("{ half a reco")
    (days / "notes.txt").write_text("not a day")
    timeline = cycle_timeline(str(tmp_path))
    assert [d["day"] for d in timeline["days"]] == [0, 1, 2, 3, 4, 5]
    assert timeline["counts"] == {"promotions": 2, "rejections": 2, "rollbacks": 1, "training_failures": 1}
    assert timeline["days"][2]["gate_failed"] == ["kl: too far"] and timeline["days"][2]["breach"]
    assert "JSONDecodeError" in timeline["days"][5]["unreadable"]
    assert cycle_timeline(None) is None and cycle_timeline(str(tmp_path / "none"))["days"] == []


@pytest.mark.parametrize("name", ["index.html", "../recommend.py", "/etc/passwd", "operator.js/../../x", ""])
def test_only_the_page_files_are_served(name):
    assert asset(name) is None


def test_every_listed_asset_exists():
    assert all(asset(name)[0] for name in ASSETS)


@pytest.mark.parametrize(
    "args, match",
    [
        ({"operator": {"cycle": "/x"}}, r"unknown operator args: \['cycle'\]"),
        ({"operator": {"metrics_interval_s": -1}}, "metrics_interval_s must be a number ≥ 0"),
        ({"operator": {"metrics_interval_s": "often"}}, "metrics_interval_s must be a number ≥ 0"),
        ({"stage_replicas": 2}, "needs cascade 'composed'"),
        ({"cascade": "composed", "stage_replicas": 0}, r"stage_replicas \(≥ 1"),
        ({"micro_batch": 0}, "micro_batch must be an int ≥ 1"),
        ({"micro_batch": 2.5}, "micro_batch must be an int ≥ 1"),
        ({"cascade": "composed", "micro_batch": 8}, "> 1 only with cascade 'fused'"),
    ],
)
def test_bad_operator_and_replica_args_are_refused_naming_them(args, match):
    from serve_apps.recommend import app_builder

    with pytest.raises(ValueError, match=match):
        app_builder({"world": {"n_items": 500, "n_users": 50}, **args})
