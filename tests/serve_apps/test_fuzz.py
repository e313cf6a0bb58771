"""Hostile input, generated from each app's own OpenAPI schema (schemathesis, as a user would run it against a
deployment): no server error, every status code answered is documented, every response matches its schema and
content type. Plus the hand-written hostile cases a generator rarely reaches: an oversized body, a body that is not
JSON, NaN and infinity."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import httpx
import pytest

from serve_apps.inner_reward import MAX_BODY_BYTES as INNER_REWARD_MAX_BODY
from serve_apps.recommend import MAX_BODY_BYTES as RECOMMEND_MAX_BODY

pytestmark = [pytest.mark.ray, pytest.mark.serve]
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_EXAMPLES = 25  # per operation and phase: ~1 500 cases over both apps


@pytest.fixture(scope="module")
def apps(serve_url):
    """Both apps on their own stores and routes (the fuzzer changes weights, operating points, the catalogue)."""
    from ray import serve

    from serve_apps import inner_reward, recommend

    prefix = f"fuzz_{uuid.uuid4().hex[:8]}"
    serve.run(inner_reward.app_builder({"weights_store": f"{prefix}_w"}), name="fuzz_ir", route_prefix="/fuzz_ir")
    events = tempfile.mkdtemp(prefix="morl-events-fuzz-")
    serve.run(
        recommend.app_builder(
            {
                "world": {"n_items": 2000, "n_users": 300},
                "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 5},
                "store_prefix": prefix,
                "inner_reward_app": "fuzz_ir",
                "inner_reward_weights_store": f"{prefix}_w",
                "telemetry": {"sink": "parquet", "path": events},
            }
        ),
        name="fuzz_rec",
        route_prefix="/fuzz_rec",
    )
    yield {"inner_reward": f"{serve_url}/fuzz_ir", "recommend": f"{serve_url}/fuzz_rec"}
    serve.delete("fuzz_rec")
    serve.delete("fuzz_ir")
    shutil.rmtree(events, ignore_errors=True)


@pytest.mark.parametrize("app", ["inner_reward", "recommend"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_status(apps, app, tmp_path):
    base = apps[app]
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(httpx.get(f"{base}/openapi.json", timeout=30).json()))
    st = os.path.join(os.path.dirname(sys.executable), "st")  # the venv's schemathesis CLI
    out = subprocess.run(
        [st, "run", str(spec), "--url", base, "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # its reports and cassettes stay in the test's folder
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "generated" in out.stdout


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "app, path, limit",
    [
        ("inner_reward", "/reward", INNER_REWARD_MAX_BODY),
        ("inner_reward", "/reward/arrow", INNER_REWARD_MAX_BODY),
        ("recommend", "/recommend", RECOMMEND_MAX_BODY),
    ],
)
def test_an_oversized_body_gets_413_naming_the_limit(apps, app, path, limit, chunked):
    """By its Content-Length, or streamed without one (chunked): either way a 413 in the usual shape."""
    chunk = b" " * (1 << 20)

    def stream():
        for _ in range(limit // len(chunk) + 1):
            yield chunk

    content = stream() if chunked else b" " * (limit + 1)
    r = httpx.post(f"{apps[app]}{path}", content=content, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 413, r.text[:500]
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body"] and str(limit) in detail["msg"] and detail["type"] == "too_large"


@pytest.mark.parametrize(
    "app, path, body, status, loc",
    [
        ("recommend", "/recommend", b"{not json", 422, ["body"]),
        ("recommend", "/recommend", b'{"user_id": NaN}', 422, ["body", "user_id"]),
        ("recommend", "/recommend", b'{"user_id": 3, "ranking_weights": [1, Infinity, 0]}', 422, None),
        ("inner_reward", "/reward", b"[1, 2", 422, ["body"]),
        ("inner_reward", "/weights", b'{"click_w": NaN}', 422, None),
    ],
)
def test_bodies_that_are_not_json_or_carry_nan_get_a_4xx_naming_where(apps, app, path, body, status, loc):
    method = "PUT" if path == "/weights" else "POST"
    r = httpx.request(method, f"{apps[app]}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail and all({"loc", "msg", "type"} <= set(d) for d in detail)
    if loc is not None:
        assert detail[0]["loc"][: len(loc)] == loc, detail
