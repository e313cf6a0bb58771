"""What a slate served, as a compact signed token the client hands back with its feedback.

``/feedback`` needs what ``/recommend`` served (items, predictions, weights, propensities) to score the
slate and log it. A replica's in-memory cache covers the common case, but not a slate served by another
replica or by one that has since died. So every response also carries ``served_record``: the same record,
serialised and signed, that any replica holding the app's key can verify.

Token = ``base64url(payload) "." base64url(HMAC-SHA256(key, payload)[:16])``; the payload is JSON with
NumPy arrays as base64 of their little-endian bytes. A token whose tag does not verify (forged or altered)
is refused with 403; one older than ``max_age_s`` with 410; one naming another request with 422.
Bounded memory: nothing is stored server-side beyond the replica's LRU cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_apps.errors import BadRequest

TAG_BYTES = 16
MAX_TOKEN_CHARS = 65_536  # about 80 characters per slate item: slates of several hundred items fit
_DTYPES = {"i4": np.int32, "i8": np.int64, "u8": np.uint64, "f4": np.float32, "f8": np.float64}
_CODES = {np.dtype(t): code for code, t in _DTYPES.items()}
LOC = ["body", "served_record"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        code = _CODES.get(value.dtype)
        if code is None:
            raise TypeError(f"served_record cannot carry {value.dtype} arrays; use one of {sorted(_DTYPES)}")
        return {
            "nd": code,
            "shape": list(value.shape),
            "b": _b64(np.ascontiguousarray(value).astype(f"<{code}").tobytes()),
        }
    if isinstance(value, dict):
        return {"map": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "nd" in value:
        return (
            np.frombuffer(_unb64(value["b"]), dtype=f"<{value['nd']}")
            .astype(_DTYPES[value["nd"]])
            .reshape(value["shape"])
        )
    if isinstance(value, dict) and "map" in value:
        return {k: _decode(v) for k, v in value["map"].items()}
    return value


@dataclass(frozen=True)
class ServedRecordCodec:
    """Seal and open served records with one app-wide key.

    Args:
        key: the HMAC key (≥ 16 bytes); every replica of the app must hold the same one.
        max_age_s: a record older than this is stale (410): feedback arrives within a session.
    """

    key: bytes = field(repr=False)
    max_age_s: float = 86_400.0

    def __post_init__(self):
        if len(self.key) < 16:
            raise ValueError(f"served_record key must be at least 16 bytes, got {len(self.key)}")
        if not self.max_age_s > 0:
            raise ValueError(f"served_record.max_age_s must be > 0, got {self.max_age_s!r}")

    @classmethod
    def from_config(cls, config: dict | None) -> ServedRecordCodec:
        """{"key_env": name of an env var holding the key (its text, ≥ 16 bytes), "max_age_s": 86400}. Without the env
        var a random key is drawn: records then verify on every replica of this deployment, restarted ones
        included, but not across a redeploy (set the env var for that)."""
        cfg = dict(config or {})
        unknown = set(cfg) - {"key_env", "key_hex", "max_age_s"}
        if unknown:
            raise ValueError(f"unknown served_record options: {sorted(unknown)}")
        if cfg.get("key_hex"):
            key = bytes.fromhex(cfg["key_hex"])
        elif cfg.get("key_env") and os.environ.get(cfg["key_env"]):
            key = os.environ[cfg["key_env"]].encode()
        elif cfg.get("key_env"):
            raise ValueError(f"served_record.key_env names {cfg['key_env']!r}, which is not set")
        else:
            key = secrets.token_bytes(32)
        return cls(key, float(cfg.get("max_age_s", 86_400.0)))

    def config(self) -> dict:
        """The config that rebuilds this codec (with its key) in a replica."""
        return {"key_hex": self.key.hex(), "max_age_s": self.max_age_s}

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()[:TAG_BYTES]

    def seal(self, request_id: str, served: dict[str, Any]) -> str:
        payload = json.dumps(
            {"request_id": request_id, **{k: _encode(v) for k, v in served.items()}}, separators=(",", ":")
        )
        raw = payload.encode()
        return f"{_b64(raw)}.{_b64(self._tag(raw))}"

    def open(self, token: str, request_id: str, now_us: int | None = None) -> dict[str, Any]:
        """The record sealed for ``request_id``; a BadRequest (403 / 410 / 422) naming the problem otherwise."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise BadRequest(LOC, "malformed served_record: expected '<payload>.<tag>' as /recommend returned it")
        body, tag = token.split(".")
        try:
            raw, tag_raw = _unb64(body), _unb64(tag)
        except (binascii.Error, ValueError):
            raise BadRequest(LOC, "malformed served_record: not base64url") from None
        if not hmac.compare_digest(self._tag(raw), tag_raw):
            raise BadRequest(LOC, "served_record signature does not verify (forged or altered)", 403, "forbidden")
        record = {k: _decode(v) for k, v in json.loads(raw).items()}
        if record.pop("request_id") != request_id:
            raise BadRequest(LOC, f"served_record was issued for another request, not {request_id!r}")
        self.check_age(record["ts_us"], now_us)
        return record

    def check_age(self, ts_us: int, now_us: int | None = None) -> None:
        """410 when feedback comes more than ``max_age_s`` after its slate was served (cached or not)."""
        age_s = ((time.time_ns() // 1000 if now_us is None else now_us) - ts_us) / 1e6
        if age_s > self.max_age_s:
            raise BadRequest(
                ["body", "request_id"],
                f"feedback is stale: the slate was served {age_s:.0f} s ago, max_age_s {self.max_age_s:g}",
                410,
                "gone",
            )
