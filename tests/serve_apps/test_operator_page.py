"""The operator's page on a real recommend app (two utility-agent replicas, the study's frontier artifact), driven in
headless Chromium: a switch made on the page reaches every replica and lands in the audit log; a stale switch shows
the conflict and changes nothing. Also the page's JSON, its assets, the audit fields' validation and the Prometheus
gauges Ray's metrics agent exports."""

import re
import shutil
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest
import ray

from actors.served_policies import operating_point_store
from tests.agent_helpers import random_agent
from tests.browser import browser_page, screenshot

pytestmark = [pytest.mark.ray, pytest.mark.serve]
ARGS = {"world": {"n_items": 3000, "n_users": 500}, "pipeline": {"k_matching": 200, "k_pre_ranking": 30, "k_slate": 8}}
FRONTIER = Path(__file__).parents[2] / "benchmarks" / "results" / "utility_agent_frontier.json"  # a study's artifact


@pytest.fixture(scope="module")
def operator_app(serve_url, tmp_path_factory):
    from ray import serve

    from serve_apps import inner_reward
    from serve_apps.recommend import app_builder

    tmp = tmp_path_factory.mktemp("operator_app")
    path, _ = random_agent(str(tmp / "agent.pt"))
    shutil.copy(FRONTIER, tmp / "frontier.json")
    prefix = f"op_{uuid.uuid4().hex[:8]}"
    serve.run(inner_reward.app_builder({"weights_store": f"{prefix}_inner"}), name="op_inner", route_prefix="/op_ir")
    agent = {"mode": "agent", "path": path, "frontier": str(tmp / "frontier.json"), "lambda": 0.5}
    serve.run(
        app_builder(
            {
                **ARGS,
                "store_prefix": prefix,
                "inner_reward_app": "op_inner",
                "telemetry": {"sink": "off"},
                "utility_agent": {**agent, "placement": "deployment", "num_replicas": 2},
                "operator": {"metrics_interval_s": 1.0},
            }
        ),
        name="op_app",
        route_prefix="/op",
    )
    with httpx.Client(base_url=f"{serve_url}/op", timeout=60) as c:
        c.base, c.prefix = f"{serve_url}/op", prefix
        yield c
    serve.delete("op_app")
    serve.delete("op_inner")


def test_the_state_document_holds_every_part_the_page_draws(operator_app):
    state = operator_app.get("/operator/state").json()
    op = state["operating_point"]
    assert op["lambda"] == 0.5 and op["mode"] == "agent" and len(op["replicas"]) == 2
    assert state["frontier"]["points"][0]["off_policy"]["cohorts"], "the study's frontier, with its cohorts"
    assert set(state["inner_reward"]["weights"]) >= {"click_w", "dwell_w"} and state["inner_reward"]["version"] >= 1
    assert state["experiment"] is None and state["cycle"] is None
    assert any("operator.cycle_root" in n for n in state["notes"]), "what is not shown says why"


@pytest.mark.parametrize(
    "path, status",
    [
        ("/operator", 200),
        ("/operator/assets/operator.js", 200),
        ("/operator/assets/operator.css", 200),
        ("/operator/assets/..%2Frecommend.py", 404),
        ("/operator/assets/index.html", 404),
        ("/operating-point/history?limit=0", 422),
        ("/operating-point/history?limit=501", 422),
    ],
)
def test_page_assets_are_an_allowlist_and_history_limits_are_checked(operator_app, path, status):
    assert operator_app.get(path).status_code == status


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"lambda": 0.3, "operator": ""}, ["body", "operator"]),
        ({"lambda": 0.3, "operator": "x" * 65}, ["body", "operator"]),
        ({"lambda": 0.3, "reason": "y" * 501}, ["body", "reason"]),
        ({"lambda": 0.3, "operator": 7}, ["body", "operator"]),
    ],
)
def test_bad_audit_fields_are_refused_naming_the_field(operator_app, body, loc):
    before = operator_app.get("/operating-point").json()["version"]
    r = operator_app.put("/operating-point", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc
    assert operator_app.get("/operating-point").json()["version"] == before, "nothing switched"


def test_a_switch_on_the_page_reaches_every_replica_and_a_stale_one_shows_the_conflict(operator_app):
    store = operating_point_store(operator_app.prefix)
    with browser_page() as page:
        page.goto(f"{operator_app.base}/operator")
        page.wait_for_selector("#frontier-chart .point")
        page.uncheck("#auto-refresh")  # the page keeps what it loaded: the stale switch below is made against it
        screenshot(page, "operator_page")

        page.click('#frontier-chart .point[data-lambda="1"]')  # pick λ = 1 on the frontier
        assert page.input_value("#op-lambda") == "1"
        page.fill("#op-operator", "alice")
        page.fill("#op-reason", "clicks campaign")
        page.click("#op-switch")
        page.wait_for_selector("#confirm[open]")
        assert "to λ = 1.00" in page.text_content("#confirm-text")
        page.click("#confirm-ok")
        page.wait_for_selector("#op-result.ok")
        result = page.text_content("#op-result")
        version = int(re.search(r"version (\d+)", result).group(1))
        # 200: both acknowledged within the store's ack timeout; 202 under load: the rest switch on their next poll
        assert re.search(r"(2 of 2 replicas serve it\.$)|(of 2 replicas serve it \(the rest switch)", result), result
        assert every_replica_holds(store, version), "every agent replica serves the new version"
        snap = ray.get(store.get.remote())
        assert (snap.version, snap.params["lambda"]) == (version, 1.0)
        page.wait_for_function(f"document.querySelector('#op-history tbody tr td')?.textContent == '{version}'")
        first = page.locator("#op-history tbody tr").first.inner_text()
        assert "alice" in first and "λ = 0.50" in first and "λ = 1.00" in first and "clicks campaign" in first

        # someone else switches meanwhile; the page still shows `version` and switches against it
        other = operator_app.put(
            "/operating-point", json={"lambda": 0.0, "operator": "bob", "expected_version": version}
        )
        assert other.status_code == 200
        page.fill("#op-lambda", "0.25")
        page.click("#op-switch")
        page.wait_for_selector("#confirm[open]")
        page.click("#confirm-ok")
        page.wait_for_selector("#op-result.error")
        assert "Conflict" in page.text_content("#op-result") and "expected_version" in page.text_content("#op-result")
        snap = ray.get(store.get.remote())
        assert (snap.version, snap.params["lambda"]) == (version + 1, 0.0), "the stale switch changed nothing"
        page.wait_for_function(f"document.querySelector('#op-current').textContent.includes('version {version + 1}')")
        screenshot(page, "operator_conflict")
        assert not page.errors, page.errors
    audit = operator_app.get("/operating-point/history").json()
    assert [(a["version"], a["who"]) for a in audit[:2]] == [(version + 1, "bob"), (version, "alice")]


def every_replica_holds(store, version: int, replicas: int = 2, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readers = ray.get(store.readers.remote())
        if len(readers) == replicas and all(v == version for v in readers.values()):
            return True
        time.sleep(0.1)
    return False


def test_the_figures_are_prometheus_gauges(operator_app):
    """Ray's metrics agent on this node exports the replica's gauges (prefixed ray_)."""
    lam = operator_app.get("/operating-point").json()["lambda"]
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])  # this session's one node
    pattern = re.compile(r'^ray_morl_operating_point_lambda\{[^}]*app="op_app"[^}]*\} (\S+)$', re.M)
    deadline, found = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = [float(v) for v in pattern.findall(body)]
        if found and found[-1] == lam:
            break
        time.sleep(1)
    assert found and found[-1] == lam, f"ray_morl_operating_point_lambda not exported as {lam}: {found}"
    assert re.search(r'^ray_morl_inner_reward_weight\{[^}]*name="click_w"', body, re.M)
