"""The signed served record: round trip, and every way a token can be bad gets its own 4xx."""

import numpy as np
import pytest

from serve_apps.errors import BadRequest
from serve_apps.served_record import ServedRecordCodec

KEY = b"k" * 32
SERVED = {
    "uid": 2**61 + 5,
    "user_id": 7,
    "ts_us": 1_000_000_000_000_000,
    "items": np.array([5, 3, 9], np.int64),
    "predictions": {"p_click": np.array([0.1, 0.2, 0.3], np.float32)},
    "weights": np.array([1.0, 1.0, 10.0], np.float32),
    "version": 3,
    "propensity": 1 / 49,
    "context": None,
    "weight_mean": None,
    "weight_log_density": -1.5,
}


def sealed(codec: ServedRecordCodec | None = None, request_id: str = "00ab") -> str:
    return (codec or ServedRecordCodec(KEY)).seal(request_id, SERVED)


def test_round_trip_keeps_values_and_dtypes():
    out = ServedRecordCodec(KEY).open(sealed(), "00ab", now_us=SERVED["ts_us"] + 10)
    assert out.keys() == SERVED.keys()
    for name in ("items", "weights"):
        np.testing.assert_array_equal(out[name], SERVED[name])
        assert out[name].dtype == SERVED[name].dtype
    np.testing.assert_array_equal(out["predictions"]["p_click"], SERVED["predictions"]["p_click"])
    assert (out["uid"], out["version"], out["context"], out["weight_log_density"]) == (2**61 + 5, 3, None, -1.5)
    assert len(sealed()) < 1000  # compact: it travels in every response


def _flip_payload(token: str) -> str:
    body, tag = token.split(".")
    return ("A" if body[5] != "A" else "B").join((body[:5], body[6:])) + "." + tag


@pytest.mark.parametrize(
    ("token", "request_id", "now_offset_s", "status", "match"),
    [
        (lambda: sealed(ServedRecordCodec(b"x" * 32)), "00ab", 0, 403, "does not verify"),  # another key: forged
        (lambda: _flip_payload(sealed()), "00ab", 0, 403, "does not verify"),  # altered payload
        (lambda: sealed().split(".")[0] + ".AAAA", "00ab", 0, 403, "does not verify"),  # altered tag
        (lambda: sealed(), "00ac", 0, 422, "another request"),
        (lambda: sealed(), "00ab", 86_401, 410, "stale"),
        (lambda: "no-dot", "00ab", 0, 422, "malformed"),
        (lambda: "a.b.c", "00ab", 0, 422, "malformed"),
        (lambda: "@@@.@@@", "00ab", 0, 422, "not base64url"),
        (lambda: "x" * 20_000 + ".y", "00ab", 0, 422, "malformed"),
    ],
)
def test_bad_tokens_get_a_4xx_naming_the_problem(token, request_id, now_offset_s, status, match):
    with pytest.raises(BadRequest, match=match) as err:
        ServedRecordCodec(KEY).open(token(), request_id, now_us=SERVED["ts_us"] + int(now_offset_s * 1e6))
    assert err.value.status == status and err.value.loc == ["body", "request_id" if status == 410 else "served_record"]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"max_age_s": 0}, "max_age_s must be > 0"),
        ({"key_hex": "00" * 8}, "at least 16 bytes"),
        ({"key_env": "MORL_TEST_UNSET_KEY_VAR"}, "not set"),
        ({"secret": "x"}, "unknown served_record options"),
    ],
)
def test_bad_codec_config(config, match):
    with pytest.raises(ValueError, match=match):
        ServedRecordCodec.from_config(config)


def test_config_rebuilds_the_same_key_and_env_keys_work(monkeypatch):
    codec = ServedRecordCodec.from_config(None)
    assert ServedRecordCodec.from_config(codec.config()).open(sealed(codec), "00ab", SERVED["ts_us"])["user_id"] == 7
    monkeypatch.setenv("MORL_TEST_KEY", "a-long-enough-shared-secret")
    a, b = (ServedRecordCodec.from_config({"key_env": "MORL_TEST_KEY"}) for _ in range(2))
    assert b.open(sealed(a), "00ab", SERVED["ts_us"])["version"] == 3
