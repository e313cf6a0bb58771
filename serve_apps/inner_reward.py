"""The inner-reward service: per-item immediate rewards for served slates, on Ray Serve.

Routes (FastAPI ingress; the Rust kernel runs inside the ingress replica — a handle hop would
cost 4–6 ms here):

- ``POST /reward``        JSON: one ``slate`` or a batch of ``slates`` → rewards, totals, version
- ``POST /reward/arrow``  Arrow IPC stream (columns clicked, dwell_s, skipped, relevance and an
  optional sorted ``slate`` id) → Arrow IPC with a ``reward`` column
- ``GET /weights``, ``PUT /weights``  versioned weights (the outer controller's update path);
  a PUT returns once every live replica serves the new version
- ``GET /healthz``

Run it: ``python -m serve_apps.launch serve_apps/configs/inner_reward.yaml`` (or ``serve run``).
"""

import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import ray
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

import rust_ext
from actors.param_store import ParamFollower, VersionConflict, find_store, get_or_create_store
from serve_apps.errors import (
    BadRequest,
    BodyLimit,
    ServerTiming,
    body_error_responses,
    install_error_handlers,
    loc_from_kernel_error,
)

log = logging.getLogger(__name__)

F32_MAX = 3.4e38
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, ge=-F32_MAX, le=F32_MAX)]
DwellSeconds = Annotated[float, Field(ge=0, le=F32_MAX, allow_inf_nan=False)]
_KERNEL_FIELDS = {"dwell": "dwell_s"}  # kernel argument name -> API field name
ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass
class InnerRewardConfig:
    """Deployment settings (the ``args`` of the Serve config file)."""

    max_slate_size: int = 1000
    max_slates_per_request: int = 512
    weights_store: str = "inner_reward_weights"
    weights_snapshot_path: str | None = None
    initial_weights: dict[str, float] = field(default_factory=lambda: rust_ext.RewardWeights().as_dict())
    weights_ack_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_slate_size", "max_slates_per_request"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        rust_ext.RewardWeights(**self.initial_weights)  # validates


class Slate(BaseModel):
    """One served slate: per-item feedback, all lists the same length."""

    model_config = ConfigDict(extra="forbid")
    clicked: list[bool]
    dwell_s: list[DwellSeconds]
    skipped: list[bool]
    relevance: list[FiniteFloat]

    @model_validator(mode="after")
    def _same_length(self) -> "Slate":
        n = len(self.clicked)
        for name in ("dwell_s", "skipped", "relevance"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"length mismatch: clicked has {n} items but {name} has {len(getattr(self, name))}")
        return self


class RewardRequest(BaseModel):
    """Either ``slate`` (one) or ``slates`` (a micro-batch)."""

    model_config = ConfigDict(extra="forbid")
    slate: Slate | None = None
    slates: list[Slate] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "RewardRequest":
        if (self.slate is None) == (self.slates is None):
            raise ValueError("give exactly one of 'slate' or 'slates'")
        return self


class RewardResponse(BaseModel):
    rewards: list[list[float]]
    totals: list[float]
    weights_version: int


class WeightsBody(BaseModel):
    """New inner-reward weights. ``expected_version`` guards against lost updates (409)."""

    model_config = ConfigDict(extra="forbid")
    click_w: FiniteFloat = 1.0
    dwell_w: FiniteFloat = 0.5
    skip_penalty: FiniteFloat = -0.3
    rel_w: FiniteFloat = 0.8
    clip_lo: FiniteFloat = -5.0
    clip_hi: FiniteFloat = 5.0
    expected_version: int | None = None

    @model_validator(mode="after")
    def _clip_order(self) -> "WeightsBody":
        if self.clip_lo > self.clip_hi:
            raise ValueError(f"clip_lo ({self.clip_lo}) must not exceed clip_hi ({self.clip_hi})")
        return self


class WeightsState(BaseModel):
    version: int
    weights: dict[str, float]
    readers_acked: int | None = None
    readers_live: int | None = None


def pack_slates(slates: list[Slate]) -> tuple[np.ndarray, ...]:
    """JSON slates → CSR offsets + four flat columns in the kernel's dtypes."""
    lengths = np.fromiter((len(s.clicked) for s in slates), dtype=np.int64, count=len(slates))
    offsets = np.zeros(len(slates) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def flat(name: str, dtype) -> np.ndarray:
        return np.fromiter((v for s in slates for v in getattr(s, name)), dtype=dtype, count=int(offsets[-1]))

    return (
        offsets,
        flat("clicked", np.bool_),
        flat("dwell_s", np.float32),
        flat("skipped", np.bool_),
        flat("relevance", np.float32),
    )


def weights_follower(store_name: str, reader_id: str, config: InnerRewardConfig | None = None) -> ParamFollower:
    """A reader's copy of the inner-reward weights (``rust_ext.RewardWeights``), followed from their store: the
    inner-reward app (``config`` given) creates it with its initial weights and snapshot; any other reader only
    finds it, waiting for that app, so it can never create the store with defaults of its own."""
    if config is not None:
        store = get_or_create_store(store_name, config.initial_weights, snapshot_path=config.weights_snapshot_path)
    else:
        store = find_store(store_name)
    return ParamFollower(store, reader_id, lambda p: rust_ext.RewardWeights(**p))


def score_slates(weights: ParamFollower, offsets, clicked, dwell, skipped, relevance, prefix: list):
    """The Rust kernel on packed slates with the followed weights: (rewards, totals, weights version); a kernel
    error becomes a 422 naming the field."""
    version, current = weights.current
    try:
        rewards, totals = rust_ext.inner_reward_slates(offsets, clicked, dwell, skipped, relevance, current)
    except ValueError as e:
        raise BadRequest(loc_from_kernel_error(str(e), prefix, _KERNEL_FIELDS), str(e)) from None
    return rewards, totals, version


app = FastAPI(title="Inner reward", description=__doc__)
install_error_handlers(app)
app.add_middleware(ServerTiming)
MAX_BODY_BYTES = 64 << 20  # 512 slates × 1 000 items as JSON fit; more is answered 413
app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class InnerRewardService:
    def __init__(self, config: InnerRewardConfig | None = None):
        self.config = config or InnerRewardConfig()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._weights = weights_follower(self.config.weights_store, self._replica, self.config)
        self._store = self._weights.store

    # ---- scoring -------------------------------------------------------------------------
    def _check_sizes(self, lengths: list[int], prefix: list) -> None:
        if len(lengths) > self.config.max_slates_per_request:
            raise BadRequest(
                [*prefix, "slates"],
                f"at most {self.config.max_slates_per_request} slates per request, got {len(lengths)}",
            )
        for j, n in enumerate(lengths):
            if n > self.config.max_slate_size:
                raise BadRequest(
                    [*prefix, "slates", j, "clicked"],
                    f"slate has {n} items; max_slate_size is {self.config.max_slate_size}",
                )

    def _score(self, offsets, clicked, dwell, skipped, relevance, prefix: list):
        return score_slates(self._weights, offsets, clicked, dwell, skipped, relevance, prefix)

    def score_slates(self, offsets, clicked, dwell, skipped, relevance):
        """For DeploymentHandle callers (e.g. /feedback): (rewards, totals, weights version)."""
        return self._score(offsets, clicked, dwell, skipped, relevance, prefix=["body"])

    @app.post("/reward", response_model=RewardResponse, responses=body_error_responses())
    async def reward(self, body: RewardRequest) -> RewardResponse:
        slates = body.slates if body.slates is not None else [body.slate]
        self._check_sizes([len(s.clicked) for s in slates], ["body"])
        offsets, *cols = pack_slates(slates)
        rewards, totals, version = self._score(offsets, *cols, prefix=["body"])
        rewards = np.round(rewards.astype(np.float64), 6)  # float32 precision, readable JSON
        per_slate = [r.tolist() for r in np.split(rewards, offsets[1:-1])] if len(slates) > 1 else [rewards.tolist()]
        return RewardResponse(
            rewards=per_slate, totals=np.round(totals.astype(np.float64), 6).tolist(), weights_version=version
        )

    @app.post("/reward/arrow", responses=body_error_responses())
    async def reward_arrow(self, request: Request) -> Response:
        raw = await request.body()
        try:
            table = pa.ipc.open_stream(io.BytesIO(raw)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise BadRequest(["body"], f"not an Arrow IPC stream: {e}", status=400, type_="arrow_error") from None
        repeated = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
        if repeated:
            raise BadRequest(["body", repeated[0]], f"column(s) given more than once: {', '.join(repeated)}")
        missing = [c for c in ("clicked", "dwell_s", "skipped", "relevance") if c not in table.column_names]
        if missing:
            raise BadRequest(["body", missing[0]], f"missing column(s): {', '.join(missing)}")
        offsets = self._arrow_offsets(table)
        self._check_sizes(np.diff(offsets).tolist(), ["body"])
        try:
            cols = (
                rust_ext.as_flags(table["clicked"], "clicked"),
                rust_ext.as_f32(table["dwell_s"], "dwell"),
                rust_ext.as_flags(table["skipped"], "skipped"),
                rust_ext.as_f32(table["relevance"], "relevance"),
            )
        except (TypeError, ValueError) as e:
            raise BadRequest(loc_from_kernel_error(str(e), ["body"], _KERNEL_FIELDS), str(e)) from None
        rewards, totals, version = self._score(offsets, *cols, prefix=["body"])
        sink = io.BytesIO()
        out = pa.table({"reward": rewards}, metadata={"weights_version": str(version)})
        with pa.ipc.new_stream(sink, out.schema) as writer:
            writer.write_table(out)
        return Response(sink.getvalue(), media_type=ARROW_STREAM, headers={"X-Weights-Version": str(version)})

    @staticmethod
    def _arrow_offsets(table: pa.Table) -> np.ndarray:
        if "slate" not in table.column_names:
            return np.array([0, table.num_rows], dtype=np.int64)
        slate = np.asarray(table["slate"].combine_chunks().to_numpy(zero_copy_only=False))
        if slate.dtype.kind not in "iu":
            raise BadRequest(["body", "slate"], f"slate ids must be integers, got {table['slate'].type}")
        if np.any(np.diff(slate) < 0):
            raise BadRequest(["body", "slate"], "slate ids must be sorted (rows of one slate together)")
        starts = np.flatnonzero(np.diff(slate)) + 1
        return np.concatenate([[0], starts, [table.num_rows]]).astype(np.int64)

    # ---- weights -------------------------------------------------------------------------
    @app.get("/weights", response_model=WeightsState)
    async def get_weights(self) -> WeightsState:
        version, weights = self._weights.current
        return WeightsState(version=version, weights=weights.as_dict())

    @app.put("/weights", response_model=WeightsState, responses=body_error_responses(409))
    async def put_weights(self, body: WeightsBody) -> WeightsState:
        params = body.model_dump(exclude={"expected_version"})
        try:
            rust_ext.RewardWeights(**params)
        except ValueError as e:
            raise BadRequest(["body"], str(e)) from None
        try:
            ack = await self._store.put.remote(params, body.expected_version, self.config.weights_ack_timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, VersionConflict):
                raise BadRequest(
                    ["body", "expected_version"], str(e.cause), status=409, type_="version_conflict"
                ) from None
            raise
        self._weights.apply(await self._store.get.remote())
        version, weights = self._weights.current
        return WeightsState(
            version=version, weights=weights.as_dict(), **{k: ack[k] for k in ("readers_acked", "readers_live")}
        )

    # ---- health --------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "replica": self._replica, "weights_version": self._weights.version}

    def check_health(self) -> None:
        """Serve restarts the replica if the kernel stops giving the known answer."""
        got = rust_ext.inner_reward([True], [0.0], [False], [0.5], rust_ext.RewardWeights())
        if abs(float(got[0]) - 1.4) > 1e-5:
            raise RuntimeError(f"inner-reward self-test failed: {got}")


def app_builder(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder: ``args`` are InnerRewardConfig fields, plus an optional
    ``num_replicas`` (leave it out when the config file sets ``autoscaling_config``)."""
    args = dict(args or {})
    num_replicas = args.pop("num_replicas", None)
    unknown = set(args) - set(InnerRewardConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown inner-reward args: {sorted(unknown)}; allowed: {sorted(InnerRewardConfig.__dataclass_fields__)}"
        )
    config = InnerRewardConfig(**args)
    log.info("inner reward config: %s", asdict(config))
    deployment = (
        InnerRewardService if num_replicas is None else InnerRewardService.options(num_replicas=int(num_replicas))
    )
    return deployment.bind(config)
