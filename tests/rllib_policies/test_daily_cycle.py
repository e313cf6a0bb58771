"""The daily cycle: its config, the gate and the monitor on synthetic logs with a known best action (no Ray),
and a two-day cycle through the real Serve apps with every fault injected (Ray, Serve)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.telemetry.sinks import read_event_files
from rllib_policies.crm.logs import LOG_HIGH, LOG_LOW
from rllib_policies.daily_cycle import DailyCycleConfig, gate, kl_to, monitor, trust_region
from rllib_policies.daily_cycle.gate import scale_free, served_policy
from rllib_policies.ope import LoggedBandit
from tests.conftest import free_port
from tests.ray_jobs import delete_serve_apps, submit

SIGMA = 0.3
LIVE = np.array([1.0, 1.0, 10.0])
BEST = np.log(LIVE) + np.array([0.6, -0.3, 0.3])  # the reward peaks here, in log space


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("days", 0, "days must be ≥ 1"),
        ("sessions_per_day", 1, "sessions_per_day must be ≥ 2"),
        ("start_weights", (1.0, 0.0, 1.0), "start_weights must be 3 weights > 0"),
        ("treatment_share", 1.0, r"treatment_share must be in \(0, 1\)"),
        ("weight_std", 0.0, "weight_std must be > 0"),
        ("lam", 1.5, r"lam must be in \[0, 1\]"),
        ("validation", 0.0, r"validation must be in \(0, 1\)"),
        ("gate", {"level": 0.4}, r"gate.level must be in \(0.5, 1\)"),
        ("monitor", {"kl_bound": 0}, "monitor.kl_bound must be > 0"),
        ("inject", {"meteor_day": 3}, "inject keys must be among"),
        ("apps", {"recommend": "x:y"}, "apps must name"),
        ("sessions_per_day", 500, "exceeds the world's 400 users"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        DailyCycleConfig(**{"env_config": {"world": {"n_users": 400}}, "days": 2, field: value})


def test_config_from_yaml_rejects_unknown_keys(tmp_path):
    path = tmp_path / "cycle.yaml"
    path.write_text("days: 2\nsessions_per_dya: 10\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sessions_per_dya'\]"):
        DailyCycleConfig.from_yaml(str(path))


def test_the_shipped_config_loads():
    cfg = DailyCycleConfig.from_yaml(str(Path(__file__).parents[2] / "rllib_policies/configs/daily_cycle.yaml"))
    assert cfg.days == 14 and cfg.storage == "daily_cycle"


def test_scale_free_removes_the_common_log_scale_of_the_step():
    step = scale_free(LIVE, LIVE * np.exp([0.5, 0.2, 0.2]))
    assert np.allclose(np.log(step / LIVE), [0.2, -0.1, -0.1])
    assert np.allclose(scale_free(LIVE, 3 * LIVE), LIVE), "a pure rescaling changes nothing served"


def test_trust_region_moves_toward_the_proposal_at_most_the_bound():
    far = np.exp(np.log(LIVE) + np.array([0.6, 0.6, -0.6]))  # inside the box
    step = trust_region(LIVE, far, SIGMA, 0.5)
    assert kl_to(LIVE, step, SIGMA) == pytest.approx(0.5)
    direction = np.log(step) - np.log(LIVE)
    assert np.allclose(direction / np.linalg.norm(direction), np.array([1, 1, -1]) / np.sqrt(3))
    near = np.exp(np.log(LIVE) + 0.01)
    assert np.allclose(trust_region(LIVE, near, SIGMA, 0.5), near)


def synthetic_logs(n: int, seed: int = 0) -> LoggedBandit:
    """Requests logged by the live policy; reward = exp(−‖a − BEST‖²/2) + noise, 1 request per user."""
    rng = np.random.default_rng(seed)
    action = served_policy(LIVE, SIGMA, n).sample(rng)
    reward = np.exp(-0.5 * ((action - BEST) ** 2).sum(1)) + 0.05 * rng.standard_normal(n)
    density = np.exp(served_policy(LIVE, SIGMA, n).log_density(action))
    return LoggedBandit(
        context=np.zeros((n, 1)), action=action, reward=reward[:, None], propensity=density, clusters=np.arange(n)
    )


def test_gate_promotes_a_step_toward_the_optimum_and_rejects_the_reverse():
    data = synthetic_logs(4000)
    toward = np.exp(np.log(LIVE) + 0.5 * SIGMA * (BEST - np.log(LIVE)) / np.linalg.norm(BEST - np.log(LIVE)))
    away = np.exp(2 * np.log(LIVE) - np.log(toward))
    good, bad = gate(toward, LIVE, data, SIGMA), gate(away, LIVE, data, SIGMA)
    assert good.passed, good.reason
    assert not bad.passed and not bad.checks["ope"].ok and bad.checks["kl"].ok, bad.reason
    assert good.checks["ope"].value > 0 > bad.checks["ope"].value


@pytest.mark.parametrize(
    "candidate, failed, match",
    [
        ([1.0, np.nan, 10.0], "bounds", "outside the box"),
        ([1.0, 1.0, 80.0], "bounds", "outside the box"),
        ([1.0, 1e-5, 10.0], "bounds", "outside the box"),
        ([1.0, 1.0], "bounds", "outside the box"),
        ([2.0, 0.3, 40.0], "kl", r"KL\(live ‖ candidate\) .* > 1"),
    ],
)
def test_gate_rejects_out_of_bounds_and_too_far_naming_the_check(candidate, failed, match):
    decision = gate(candidate, LIVE, synthetic_logs(500), SIGMA)
    assert not decision.passed and not decision.checks[failed].ok
    assert "FAILED" in decision.reason
    assert re.search(match, decision.checks[failed].why), decision.checks[failed].why


def test_monitor_breaches_on_drift_and_on_a_significantly_worse_treatment():
    rng = np.random.default_rng(0)
    users = np.arange(600)
    same = rng.normal(1.0, 0.3, 600)
    served = np.tile(LIVE, (600, 1))
    ok = monitor(same, users, rng.normal(1.0, 0.3, 600), users + 600, served, LIVE, SIGMA)
    assert not ok["breach"] and ok["kl"] == pytest.approx(0, abs=1e-12)
    drifted = np.tile(np.exp(np.log(LIVE) + SIGMA * np.array([0.8, -0.8, -0.8])), (600, 1))
    kl = monitor(same, users, same, users + 600, drifted, LIVE, SIGMA)
    assert kl["breach"] and "KL(promoted ‖ served) 0.960 > 0.5" in kl["why"][0]
    worse = monitor(same - 0.2, users, same, users + 600, served, LIVE, SIGMA)
    assert worse["breach"] and "treatment − control" in worse["why"][0] and worse["difference_high"] < 0


def test_kl_to_is_half_the_squared_log_distance_over_sigma_squared():
    assert kl_to([1, 1, 1], np.exp([0.3, 0, 0]), 0.3) == pytest.approx(0.5)
    assert np.all(np.exp(LOG_LOW) < LIVE) and np.all(LIVE < np.exp(LOG_HIGH))


# ---------------------------------------------------------------------------------------------- the cycle on Serve
TINY = {"world": {"n_items": 1500, "n_users": 400}, "pipeline": {"k_matching": 150, "k_pre_ranking": 30}}


@pytest.mark.ray
@pytest.mark.serve
def test_two_days_through_serve_with_every_fault(serve_url, tmp_path):
    """Day 0: the nightly training fails (live untouched). A crash half-way through day 1's traffic; a
    cycle rebuilt from storage resumes at day 1 (the aborted requests counted nowhere). Before day 1: a
    garbage and a truncated event file (skipped, counted), an out-of-band drift of the treatment's weights
    (the monitor rolls it back), and a deliberately bad candidate (the gate rejects it). Day 0's sessions
    get their next-day return from day 1's traffic, written once."""
    from rllib_policies.daily_cycle import DailyCycle

    port = int(serve_url.rsplit(":", 1)[1])
    cfg = DailyCycleConfig(
        storage=str(tmp_path / "cycle"),
        experiment="ci-cycle",
        days=2,
        sessions_per_day=30,
        env_config=TINY,
        http={"host": "127.0.0.1", "port": port, "concurrency": 8},
        crm={"iterations": 1, "steps_per_iteration": 10},
        inject={"training_failure_day": 0, "drift_day": 1, "bad_candidate_day": 1},
    )
    cycle = DailyCycle(cfg, log=lambda line: None)
    cycle.deploy()
    try:
        _two_days_with_every_fault(cycle, cfg, tmp_path)
    finally:
        cycle.undeploy()


def _two_days_with_every_fault(cycle, cfg, tmp_path):
    from rllib_policies.daily_cycle import DailyCycle, day_traffic

    before = cycle._treatment()
    day0 = cycle.run_day(0)
    assert day0["candidate"]["status"] == "training failed" and "injected" in day0["candidate"]["error"]
    assert cycle._treatment()["version"] == before["version"], "a failed training must not touch the live arm"
    assert day0["traffic"]["requests"] > 30 and not day0["monitor"]["breach"]

    doomed_users = cycle._users(1)  # the crash: half of day 1's traffic, then the cycle is gone
    aborted = day_traffic(cycle.world, cycle.url, doomed_users[:10], np.random.default_rng(1))
    assert aborted.requests > 0
    (Path(cycle.events_root) / "user_bucket=0").mkdir(parents=True, exist_ok=True)
    (Path(cycle.events_root) / "user_bucket=0" / "part-garbage.parquet").write_bytes(b"PAR1 not parquet")
    real = next(p for p in Path(cycle.events_root).rglob("part-*.parquet") if "garbage" not in p.name)
    (Path(cycle.events_root) / "user_bucket=0" / "part-truncated.parquet").write_bytes(real.read_bytes()[:200])

    lines = []
    resumed = DailyCycle(cfg, log=lines.append)
    assert resumed.state["next_day"] == 1
    resumed.deploy()
    assert any("still running; reused" in line for line in lines), "serving outlived the crash: not redeployed"
    # a candidate in shadow for day 1: the live weights themselves (so its paired difference is exactly 0)
    shadow = resumed._call("PUT", "/experiments/shadow/weights", {"weights": list(cfg.start_weights)})
    resumed.state["shadow"] = {"weights": list(cfg.start_weights), "day": 0, "version": shadow["version"]}
    day1 = resumed.run_day(1)
    assert sorted(os.path.basename(p) for p in day1["skipped_files"]) == [
        "part-garbage.parquet",
        "part-truncated.parquet",
    ]
    rows1 = pq.read_table(tmp_path / "cycle" / "rows" / "day_001.parquet")
    assert day1["traffic"]["requests"] == rows1.num_rows, "the aborted traffic is counted nowhere"
    assert day1["monitor"]["breach"] and "KL(promoted ‖ served)" in day1["monitor"]["why"][0]
    assert np.allclose(resumed._treatment()["weights"], cfg.start_weights, rtol=1e-5), "rolled back to the start"
    assert day1["candidate"]["injected"] and day1["candidate"]["status"] == "rejected"
    assert not day1["candidate"]["gate"]["passed"]

    # the candidate is the live weights: a paired difference of exactly 0, or no estimate at all where the drifted
    # treatment's draws leave the shadow's ESS under the abstain rule's 50 (one in a few runs at 135 requests)
    evaluated = day1["shadow"]
    assert evaluated["requests"] == rows1.num_rows
    assert abs(evaluated["difference"]) < 1e-6 or evaluated["why"].startswith("abstained"), evaluated
    assert (
        day1["shadow"]["status"] == "rejected in shadow"
        and not resumed._call("GET", "/experiments")["shadow"]["active"]
    )
    events = read_event_files(resumed.events_root, *resumed.state["slots"]["1"])[0].to_pandas()
    head = events[events["position"] == 0]
    recomputed = served_policy(cfg.start_weights, cfg.weight_std, len(head)).log_density(
        np.log(np.stack(head["utility_weights"].to_numpy()).astype(np.float64))
    )
    assert np.allclose(head["shadow_log_density"].to_numpy(), recomputed, atol=1e-5), "the shadow's density, logged"

    traj = pq.read_table(tmp_path / "cycle" / "trajectories" / "day_000.parquet")
    assert traj["returned"].null_count == 0 and 0 < day1["trajectories"]["return_rate"] < 1
    state = json.loads((tmp_path / "cycle" / "state.json").read_text())
    assert state["next_day"] == 2 and sorted(state["slots"]) == ["0", "1"]
    assert json.loads((tmp_path / "cycle" / "days" / "day_001.json").read_text())["day"] == 1
    _the_operator_page_shows_the_two_days(resumed)


def _the_operator_page_shows_the_two_days(cycle):
    """The recommend app's operator page (serve_apps/operator.py) reads the cycle's days: the failed training, the
    rollback and the rejections, with the arms' audit log naming the cycle and the monitor's reason."""
    from tests.browser import browser_page, screenshot

    state = cycle._call("GET", "/operator/state")
    assert [d["day"] for d in state["cycle"]["days"]] == [0, 1]
    assert state["cycle"]["counts"] == {"promotions": 0, "rejections": 2, "rollbacks": 1, "training_failures": 1}
    rollback = next(e for e in state["experiment"]["arms"]["treatment"]["audit"] if e["action"] == "rollback")
    assert rollback["who"] == "daily-cycle" and rollback["reason"].startswith("monitor: KL(promoted ‖ served)")
    with browser_page() as page:
        page.goto(f"{cycle.url}/operator")
        page.wait_for_selector("#cycle-days tbody tr >> nth=1")
        page.wait_for_selector("#kl-chart circle")
        assert "1 rollbacks" in page.text_content("#cycle-counts")
        assert "rolled back to" in page.locator("#cycle-days tbody tr").first.inner_text()
        assert "rolled back to" in page.text_content("#arm-history")
        screenshot(page, "operator_cycle")
        assert not page.errors, page.errors


JOB_CONFIG = """
storage: {storage}
experiment: job-cycle
days: 1
sessions_per_day: 12
env_config: {{world: {{n_items: 1500, n_users: 400}}, pipeline: {{k_matching: 150, k_pre_ranking: 30}}}}
http: {{host: 127.0.0.1, port: {port}, concurrency: 4}}
crm: {{iterations: 1, steps_per_iteration: 5}}
"""


@pytest.mark.slow  # in process: test_two_days_through_serve_with_every_fault; `ray job submit`: test_train_job
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_real_job_submission_runs_the_cycle(ray_head, tmp_path):
    """`ray job submit --working-dir .` of ``python -m rllib_policies.daily_cycle`` against a local head: the job
    deploys the apps on the cluster from their import paths, runs a day through them and writes it under the
    configured storage, outside the job's temporary working directory (resuming is the test above)."""
    env, address, _ = ray_head
    config = tmp_path / "cycle.yaml"
    config.write_text(JOB_CONFIG.format(storage=tmp_path / "cycle", port=free_port()))
    try:
        entrypoint = ("python", "-m", "rllib_policies.daily_cycle", "--config", str(config))
        logs = submit(env, address, *entrypoint, timeout_s=600)
    finally:
        delete_serve_apps(address)  # the job's apps outlive it (by design): the next job tests run alone
    assert "day  0 |" in logs and "done: 1 day(s)" in logs, logs[-3000:]
    assert json.loads((tmp_path / "cycle" / "state.json").read_text())["next_day"] == 1
    assert json.loads((tmp_path / "cycle" / "days" / "day_000.json").read_text())["traffic"]["requests"] > 12
