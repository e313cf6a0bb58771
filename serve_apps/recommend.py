"""The recommend application: matching → pre-ranking → ranking, fused in the ingress replica (the default) or
composed from three stage deployments by DeploymentHandles (``cascade: composed``: stages scale on their own).
Both run the same ``actors.stage_actors.ServedStage``s, so they serve identical slates.

- ``POST /recommend``  {user_id, history?, step?, ranking_weights?} → slate, scores, predictions,
  stage parameter versions, request id, ``served_record`` (what was served, signed: serve_apps/served_record.py)
- ``POST /feedback``   {request_id, clicked, dwell_s, skipped, served_record?} for a served slate: the replica's
  cache, else the signed record (another replica, or a restarted one, scores it; forged 403, stale 410)
  → per-item inner rewards from the Rust kernel, with the weights version: in this replica on the weights the
  inner-reward app serves (args ``inner_reward_weights_store``), else by a call to that app; the reward's
  relevance term is the two-tower similarity of the user and the served items
  (``actors.stages.retrieval_relevance``, from the ingress's own StageContext), not the ranker's p_click
- ``GET /stages``, ``PUT /stages/{stage}/params``  versioned, hot-updated stage parameters
- ``GET /matching/index``, ``PUT /matching/index``  matching's retrieval index (exact, or faiss IVF from 200 000
  items: actors/matching_index.py) and catalogue updates: each replica builds the new index beside the old and swaps
- every /recommend answers a ``server-timing`` header: each stage's compute, each stage call's transport on the
  composed path (``<stage>_hop``), the wait for the utility agent and the whole request (``app``)
- micro-batching (args ``micro_batch`` > 1, fused): concurrent requests already waiting in a replica run the
  cascade together, one pass of each stage (``actors.stage_actors.run_served_cascade``; Serve's ``@serve.batch``
  with no wait); each request's slate is the one it gets alone (its random streams are keyed by its request id).
  A utility agent's choice is then awaited before matching, not beside it
- ``GET /telemetry``  the event buffer's counters; ``GET /healthz``
- ``GET /operator``  the operator's page (serve_apps/operator.py): the frontier, the live operating point and its
  audit log with a switch, the A/B arms, the daily cycle's promotions, rejections, rollbacks and KL monitor, the
  inner-reward weights in force; ``GET /operator/state`` is its JSON; the same figures are Prometheus gauges
- with a utility agent (args ``utility_agent``): requests without ``ranking_weights`` get theirs from
  the agent (serve_apps/utility_agent.py), asked in parallel with matching and pre-ranking;
  ``GET|PUT /operating-point`` reads / switches the live λ (or fixed weights) on every agent
  replica at once; ``GET /frontier`` returns the current Pareto-frontier artifact
- with the outer controller (args ``ranking_policy: "outer_controller"``, or an arm with that policy): requests
  without ``ranking_weights`` get μ(s) from the outer controller's published policy
  (``actors.served_policies.publish_outer_controller``; s = the request's context), the held ranking weights
  while none is published; the response's ``versions["outer_controller"]`` names the version
- with the CRM weight policy (args ``ranking_policy: "crm"``, or an arm with that policy): requests without
  ``ranking_weights`` are served w = exp(a), a drawn from the published policy N(m(x), diag std²) in the
  log-weight box (``actors.served_policies.publish_crm``; x = the request's context), logged like Gaussian
  weight logging (μ = exp(m(x)) and the draw's log density, so the served traffic trains the next round; no
  ``weight_logging`` arg needed); the held ranking weights while none is published; ``versions["crm"]``
  names the version
- with Gaussian weight logging (args ``weight_logging``, serve_apps/weight_logging.py): requests without
  ``ranking_weights`` are served log w ~ N(log μ, Σ) truncated to a box around the live weights μ (the
  agent's choice, else the ranking stage's held parameters); the response's ``weight_logging`` names the
  served weights, μ and the log density, and every /feedback event logs μ (``weight_mean``) and the density
  (``weight_log_density``) next to the served ``utility_weights``

Whoever chose a request's ranking weights (the request itself, the held parameters, an arm's weights, the
utility agent, the outer controller, the CRM policy or UNEX-RL's ranking-stage policy) and that policy's version
are in the response (``ranking_policy``) and in every event (``ranking_policy``, ``ranking_policy_version``).

Every /feedback emits one served-item event per slate position (what /recommend served plus the
feedback and its inner reward) into a non-blocking ring buffer that a background thread flushes
to the configured sink (Parquet by default, or Redis Streams); see actors/telemetry.

Each stage, fused or composed, runs the same pure stage function as the in-process Pipeline, on a World
built from the same config, with parameters followed from a VersionedParamStore.
"""

import asyncio
import os
import tempfile
import time
from collections import OrderedDict
from typing import Annotated, Any

import numpy as np
import ray
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from actors.matching_index import MatchingIndex
from actors.observation import ObservationSpec
from actors.param_store import ParamFollower, get_or_create_store
from actors.served_policies import RankingPolicy, crm_store, operating_point_store, outer_controller_store
from actors.stage_actors import (
    ServedStage,
    StageResult,
    catalogue_store,
    default_stage_params,
    open_stage_stores,
    params_array,
    run_served_cascade,
)
from actors.stages import (
    PARAM_NAMES,
    STAGES,
    RequestBatch,
    StageContext,
    retrieval_relevance,
    stage_params,
)
from actors.telemetry import BufferConfig, ParquetSink, RedisStreamSink, TelemetryBuffer, slate_events
from actors.telemetry.sinks import read_parquet_events
from actors.world import PipelineConfig, World, WorldConfig
from rllib_policies import storage
from serve_apps.errors import (
    BadRequest,
    BodyLimit,
    ServerTiming,
    body_error_responses,
    error_responses,
    install_error_handlers,
)
from serve_apps.experiments import ArmSplit, arm_report, arm_weights_params
from serve_apps.inner_reward import DwellSeconds, FiniteFloat, score_slates, weights_follower
from serve_apps.operator import OperatorMetrics, cycle_timeline
from serve_apps.operator import asset as operator_asset
from serve_apps.operator import page as operator_page
from serve_apps.served_record import MAX_TOKEN_CHARS, ServedRecordCodec
from serve_apps.weight_logging import ServedCRM, WeightLogging

# the operator's reads of a store or the inner-reward app: a stuck one fails the read, not the page
STORE_TIMEOUT_S = 10.0
# a stage call that met a replica dying under it (killed, its node lost) is retried once
STAGE_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# who ranks requests without weights outside an experiment (with one, every such request is in an arm)
RANKING_POLICIES = ("held", "utility_agent", "outer_controller", "crm")
# AGENT_IMPORT: serve_apps.utility_agent (torch, RLlib) is imported where an agent is configured, not at the top:
# a recommend replica without an agent then starts in ~3.4 s of imports instead of ~6.2 s (measured here, one
# cold process), which every replica start, autoscaling step and test deployment pays.
LEARNED_POLICIES = ("outer_controller", "crm")  # weight policies published to a store, evaluated on the context
Weight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


class Audited(BaseModel):
    """Who makes a change and why: written into the store's audit log with the change (``GET /operator``)."""

    operator: str | None = Field(default=None, min_length=1, max_length=64, description="who makes the change")
    reason: str | None = Field(default=None, max_length=500, description="why, in a line")

    def meta(self, request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else None
        return {"who": self.operator or "anonymous", "reason": self.reason, "client": client}


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(ge=0, le=2**62)
    history: list[Annotated[int, Field(ge=0, le=2**62)]] = Field(
        default_factory=list, max_length=200, description="recently clicked item ids, oldest first"
    )
    step: int = Field(default=0, ge=0, le=2**31 - 1, description="request index within the session")
    clicks: int = Field(default=0, ge=0, le=2**31 - 1, description="clicks so far in the session (a policy feature)")
    ranking_weights: list[Weight] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="per-request utility weights (w_click, w_long_view, w_purchase)",
    )


class RecommendResponse(BaseModel):
    request_id: str
    user_id: int
    slate: list[int]
    scores: list[float]
    predictions: dict[str, list[float]]
    versions: dict[str, int]
    utility: dict[str, Any] | None = None  # the agent's choice: weights, action, λ, operating-point version
    # Gaussian weight logging: {"weights": served, "mean": μ, "log_density": log π(log w | μ)} or {"fallback": why}
    weight_logging: dict[str, Any] | None = None
    # what was served, signed: hand it back with /feedback so any replica can score the slate
    served_record: str
    arm: dict[str, Any] | None = None  # the A/B arm: {"name", "policy", "version"} (None outside an experiment)
    # who chose the ranking weights and its version: "request", "held", "arm", "utility_agent", "outer_controller",
    # "crm" or "stage_policy" (UNEX-RL's ranking-stage policy); "fallback" says why a configured policy was not used
    ranking_policy: dict[str, Any]


class OperatingPointBody(Audited):
    """Exactly one of ``lambda`` (personalised π_λ) or ``weights`` (one global weight vector)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float | None = Field(default=None, alias="lambda", ge=0, le=1, allow_inf_nan=False)
    weights: list[Weight] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="fixed (w_click, w_long_view, w_purchase) for every request",
    )
    expected_version: int | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str
    clicked: list[bool]
    dwell_s: list[DwellSeconds]
    skipped: list[bool]
    purchased: list[bool] | None = None
    revenue: list[DwellSeconds] | None = None  # same bounds: finite, >= 0, float32 range
    session_id: str | None = Field(default=None, max_length=128)
    served_record: str | None = Field(
        default=None,
        max_length=MAX_TOKEN_CHARS,
        description="the /recommend response's served_record: lets any replica score a slate it did not serve",
    )


class FeedbackResponse(BaseModel):
    request_id: str
    rewards: list[float]
    total: float
    weights_version: int


class ArmWeightsBody(Audited):
    """A promotion: new ranking weights for one arm (versioned; ``expected_version`` guards races)."""

    model_config = ConfigDict(extra="forbid")
    weights: list[Weight] = Field(min_length=3, max_length=3, description="(w_click, w_long_view, w_purchase)")
    expected_version: int | None = None


class ArmRollbackBody(Audited):
    model_config = ConfigDict(extra="forbid")
    expected_version: int | None = None


class CatalogueBody(BaseModel):
    """A catalogue update for matching: a snapshot every replica can read, or null for the world's own towers."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(
        max_length=4096,
        description="a .npz on the replicas' filesystem with item_tower [n_items, embed_dim] and popularity "
        "[n_items] (float, finite); null: back to the world's own towers",
    )
    expected_version: int | None = None


class StageParamsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, FiniteFloat]
    expected_version: int | None = None


# Serving replicas run one request at a time per core: BLAS's own threads (numpy's matching product) only add
# thread wake-ups, which cost a system call each and, in sandboxed kernels, more than the product itself.
SERVING_RUNTIME_ENV = {"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}


class RequestIds:
    """Unpredictable 62-bit request ids from the OS's randomness, read 8 KiB at a time (a ``uuid4`` per request
    is one system call per request; where system calls are slow, that was 7 % of a fused replica's time)."""

    def __init__(self, block: int = 8192):
        self.block, self.buffer, self.used = block, b"", 0

    def next(self) -> int:
        if self.used + 8 > len(self.buffer):
            self.buffer, self.used = os.urandom(self.block), 0
        value = int.from_bytes(self.buffer[self.used : self.used + 8], "little") & ((1 << 62) - 1)
        self.used += 8
        return value


DEFAULT_EVENTS_PATH = os.path.join(tempfile.gettempdir(), "morl-events")
REPORT_TTL_S = 5.0  # GET /experiments re-reads the logs at most this often
ARM_ERRORS = body_error_responses(404, 409)  # the arm routes read a body (DELETE /experiments/shadow too may)


def make_event_buffer(telemetry: dict | None) -> TelemetryBuffer | None:
    """{"sink": "parquet", "path": …} (default) | {"sink": "redis", "url": …, "stream": …} | {"sink": "off"};
    other keys are BufferConfig fields."""
    cfg = dict(telemetry or {})
    kind = cfg.pop("sink", "parquet")
    if kind == "off":
        return None
    if kind == "parquet":
        sink = ParquetSink(cfg.pop("path", DEFAULT_EVENTS_PATH), int(cfg.pop("n_buckets", 16)))
    elif kind == "redis":
        sink = RedisStreamSink(cfg.pop("url", "redis://127.0.0.1:6379/0"), cfg.pop("stream", "morl:events"))
    else:
        raise ValueError(f"telemetry sink must be 'parquet', 'redis' or 'off', got {kind!r}")
    return TelemetryBuffer(sink, BufferConfig(**cfg))


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25, "runtime_env": SERVING_RUNTIME_ENV})
class StageDeployment(ServedStage):
    """One stage in its own deployment (the composed path): ``ServedStage`` with this replica as the reader."""

    def __init__(self, stage: str, world_config: WorldConfig, pipeline_config: PipelineConfig, store_prefix: str):
        replica = serve.get_replica_context().replica_id.unique_id
        super().__init__(stage, world_config, pipeline_config, store_prefix, replica)


app = FastAPI(title="Recommend", description=__doc__)
install_error_handlers(app)
app.add_middleware(ServerTiming)
MAX_BODY_BYTES = 32 << 20  # a catalogue update with its embeddings fits; more is answered 413
app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25, "runtime_env": SERVING_RUNTIME_ENV})
@serve.ingress(app)
class RecommendService:
    def __init__(
        self,
        matching,
        pre_ranking,
        ranking,
        world_config: WorldConfig,
        store_prefix: str,
        inner_reward_app: str = "inner_reward",
        telemetry: dict | None = None,
        served_cache_size: int = 100_000,
        utility_agent=None,
        utility_config: dict | None = None,
        pipeline_config: PipelineConfig | None = None,
        weight_logging: dict | None = None,
        served_record: dict | None = None,
        experiment: dict | None = None,
        ranking_policy: str | None = None,
        inner_reward_weights_store: str | None = None,
        operator: dict | None = None,
        micro_batch: int = 1,
    ):
        pipeline_config = pipeline_config or PipelineConfig()
        replica = serve.get_replica_context().replica_id.unique_id
        # the stages' own towers (same world and seed), for the inner reward's relevance term at /feedback
        self.ctx = StageContext(World(world_config), pipeline_config.seed)
        self.fused = matching is None  # the fused path: the three stages run here, on this replica's context
        if self.fused:
            open_stage_stores(store_prefix)  # all seven starting at once; each stage below then finds its own
            self.stages = {
                s: ServedStage(s, world_config, pipeline_config, store_prefix, f"fused-{replica}", self.ctx)
                for s in STAGES
            }
        else:  # the composed path: stage deployments, in cascade order
            self.stages = dict(zip(STAGES, (matching, pre_ranking, ranking)))
        self.micro_batch = micro_batch
        self._cascade_batch.set_max_batch_size(micro_batch)
        self.catalogue = catalogue_store(store_prefix)
        self.embed_dim = self.ctx.item_tower.shape[1]
        self.inner_reward_app = inner_reward_app
        self._inner_reward = None
        # /feedback's kernel in this replica, on the weights the inner-reward app serves (no hop), when named
        self.reward_weights = (
            weights_follower(inner_reward_weights_store, f"recommend-{replica}") if inner_reward_weights_store else None
        )
        self.n_users, self.n_items = world_config.n_users, world_config.n_items
        self.stores = {s: get_or_create_store(f"{store_prefix}_{s}", default_stage_params(s)) for s in STAGES}
        self.served: OrderedDict[str, dict] = OrderedDict()
        self.cache_size = served_cache_size
        self.served_record = ServedRecordCodec.from_config(served_record)
        self.request_ids = RequestIds()
        self.experiment = None if experiment is None else ArmSplit.from_config(experiment)
        self.arm_stores, self.arm_weights = {}, {}  # per "weights" arm: its store, and this replica's follower
        for arm in self.experiment.arms if self.experiment else ():
            if arm.policy == "weights":
                store = get_or_create_store(
                    f"{store_prefix}_arm_{self.experiment.name}_{arm.name}", arm_weights_params(arm.weights)
                )
                self.arm_stores[arm.name] = store
                self.arm_weights[arm.name] = ParamFollower(
                    store, f"recommend-{replica}", lambda p: params_array("ranking", p)
                )
        self.shadow_store = self.shadow = None  # shadow mode: a candidate scored on live requests, never served
        if self.experiment is not None:
            off = {**arm_weights_params(self.experiment.arms[0].weights), "active": 0.0}
            self.shadow_store = get_or_create_store(f"{store_prefix}_shadow_{self.experiment.name}", off)
            self.shadow = ParamFollower(
                self.shadow_store,
                f"recommend-{replica}",
                lambda p: params_array("ranking", p) if p.get("active") else None,
            )
        self._report_cache: tuple[float, dict, dict] | None = None  # (time, per-arm KPIs, versions): GET /experiments
        self.events = make_event_buffer(telemetry)
        self.utility_agent, self.utility_config = utility_agent, dict(utility_config or {})
        self.local_agent = None  # placement "replica": the agent answers in this replica, no hop
        if utility_config is not None and self.utility_config.get("placement") == "replica":
            from serve_apps.utility_agent import UtilityAgent  # noqa: PLC0415  (AGENT_IMPORT)

            self.local_agent = UtilityAgent(
                world_config, pipeline_config, self.utility_config, store_prefix, replica, self.ctx
            )
        self.has_agent = utility_agent is not None or self.local_agent is not None
        self.operating_point = (
            operating_point_store(store_prefix, self.utility_config.get("lambda", 0.5)) if self.has_agent else None
        )
        # who ranks requests that carry no weights and belong to no arm (app_builder validated it)
        self.ranking_policy = ranking_policy or ("utility_agent" if self.has_agent else "held")
        # the learned weight policies this app may serve, each followed from its store like any parameters
        policies = {self.ranking_policy, *(a.policy for a in (self.experiment.arms if self.experiment else ()))}
        self.learned = {
            name: ParamFollower(store(store_prefix), f"recommend-{replica}", lambda p, f=load: f(p) if p else None)
            for name, store, load in (
                ("outer_controller", outer_controller_store, RankingPolicy),
                ("crm", crm_store, ServedCRM.from_params),
            )
            if name in policies
        }
        self.weight_logging = WeightLogging.from_config(weight_logging)
        # the CRM policy's draws: seeded like weight logging's when that has a seed, on their own stream
        self.crm_rng = self.weight_logging.rng(f"{replica}-crm") if self.weight_logging else np.random.default_rng()
        self.obs_spec = ObservationSpec.of(world_config)  # the logged context of Gaussian-logged requests
        if self.weight_logging is not None:  # μ without an agent: the ranking stage's held (hot-updated) weights
            self.weight_rng = self.weight_logging.rng(replica)
            self.shadow_rng = self.weight_logging.rng(f"{replica}-shadow")  # a shadow never moves the served draws
            self.held_ranking = ParamFollower(
                self.stores["ranking"], f"recommend-{replica}", lambda p: params_array("ranking", p)
            )
        self.operator = {"cycle_root": None, "metrics_interval_s": 15.0, **(operator or {})}
        self.metrics = None
        if self.operator["metrics_interval_s"]:  # Prometheus gauges, refreshed off the request path
            app_name = serve.get_replica_context().app_name
            self.metrics = OperatorMetrics(app_name, self._operator_snapshot, self.operator["metrics_interval_s"])

    def _draw_weights(self, live: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
        """Gaussian weight logging: the weights to serve around μ = ``live`` (None: the held ones), and the
        record {"weights", "mean", "log_density"} (or {"fallback"} when a full Σ found no exact draw)."""
        mu = self.held_ranking.current[1] if live is None else live
        drawn = self.weight_logging.draw(mu, self.weight_rng)
        if drawn is None:
            why = "no draw inside the box in weight_logging.max_tries candidates: the live weights served, unlogged"
            return np.asarray(mu, np.float32), {"fallback": why}
        weights, mean, log_density = drawn
        return weights, {"weights": weights, "mean": mean, "log_density": log_density}

    def _request(self, body: RecommendRequest) -> RequestBatch:
        if body.user_id >= self.n_users:
            raise BadRequest(["body", "user_id"], f"unknown user_id {body.user_id}: users are 0..{self.n_users - 1}")
        hist = np.asarray(body.history, np.int64)
        bad = np.flatnonzero((hist < 0) | (hist >= self.n_items))
        if len(bad):
            raise BadRequest(
                ["body", "history", int(bad[0])],
                f"unknown item id {int(hist[bad[0]])}: items are 0..{self.n_items - 1}",
            )
        history = np.full((1, 20), -1, np.int64)
        if len(hist):
            history[0, -min(20, len(hist)) :] = hist[-20:]
        return RequestBatch(
            np.array([body.user_id]),
            history,
            np.array([body.step], np.int32),
            clicks=np.array([body.clicks], np.int32),
            request_id=self.request_ids.next(),
        )

    def _logged_context(self, req: RequestBatch, logged: dict | None, context=None) -> np.ndarray | None:
        """A Gaussian-logged request's observable context (ObservationSpec.context, as the agent and the
        learners see it), so weight policies can be learned from served traffic; None when nothing is logged."""
        if logged is None or "log_density" not in logged:
            return None
        return (self.obs_spec.context(self.ctx, req) if context is None else context)[0]

    def _shadow(self, arm, served: np.ndarray, logged: dict | None) -> dict | None:
        """Shadow mode, for an experiment's Gaussian-logged request while a candidate is in shadow: the
        candidate's would-be weights (one draw of its policy N(log w_shadow, Σ) in the box, never served) and
        the log density of the *served* log w under that policy, so the candidate is evaluated off-policy on
        exactly the requests it saw. None otherwise."""
        if self.shadow is None or self.weight_logging is None or arm is None or logged is None:
            return None
        if "log_density" not in logged:
            return None
        version, candidate = self.shadow.current
        if candidate is None:
            return None
        drawn = self.weight_logging.draw(candidate, self.shadow_rng)
        log_density = float(self.weight_logging.log_density(candidate[None], np.asarray(served)[None])[0])
        would_be = candidate if drawn is None else drawn[0]
        return {"weights": np.asarray(would_be, np.float32), "log_density": log_density, "version": version}

    async def _agent_choice(self, req: RequestBatch, choice_ref) -> tuple[dict | None, str | None]:
        """The agent's choice (in this replica, or the deployment's answer within ``timeout_s``), or (None, why)
        if it is slow or failing: it must never take the request down."""
        try:
            if self.local_agent is not None:
                return self.local_agent.choose([req])[0], None
            return await asyncio.wait_for(choice_ref, self.utility_config.get("timeout_s", 0.5)), None
        except Exception as e:
            return None, f"utility agent unavailable ({type(e).__name__}): default ranking weights served"

    async def _run_stage(self, stage: str, *args) -> tuple[StageResult, float]:
        """(the stage's result, the wall time it cost this replica in ms): in process on the fused path, one
        DeploymentHandle call on the composed one."""
        started = time.perf_counter()
        if self.fused:
            result = self.stages[stage].run(*args)
        else:
            try:
                result = await self.stages[stage].run.remote(*args)
            except STAGE_REPLICA_GONE:  # a stage is a pure function of the request: sent again, to a live replica
                result = await self.stages[stage].run.remote(*args)
        return result, (time.perf_counter() - started) * 1e3

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # max_batch_size: the app's micro_batch
    async def _cascade_batch(self, calls: list[tuple[RequestBatch, dict]]) -> list[dict[str, StageResult]]:
        """Micro-batching (``micro_batch`` > 1) on the fused path: the requests already waiting in this replica (no
        wait for more: batches form only under load), each stage one pass over them (``run_served_cascade``)."""
        return run_served_cascade(self.stages, calls)

    @app.post("/recommend", response_model=RecommendResponse, responses=body_error_responses())
    async def recommend(self, body: RecommendRequest, response: Response) -> RecommendResponse:
        """Serve a slate. The ``server-timing`` header says where the replica's time went: each stage's
        compute (``matching``, ``pre_ranking``, ``ranking``), on the composed path each stage call's transport
        (``<stage>_hop``), the wait for the utility agent (``agent``) and the whole request (``app``); with
        micro-batching, ``<stage>_batch;desc=n`` the requests its stage ran with (the stage's time is the batch's)."""
        req = self._request(body)
        weights = None if body.ranking_weights is None else np.asarray(body.ranking_weights, np.float32)
        served_us = time.time_ns() // 1000
        live, arm, arm_version = None, None, None  # live: the weights the serving policy chose (None: the stage's)
        source, source_version = "request" if weights is not None else self.ranking_policy, None
        if self.experiment is not None and weights is None:  # the user's arm (a request's own weights: none)
            arm = self.experiment.arms[int(self.experiment.assign(np.array([body.user_id]))[0])]
            source = "arm" if arm.policy == "weights" else arm.policy
            if arm.policy == "weights":
                arm_version, live = self.arm_weights[arm.name].current
                source_version = arm_version
        context = None  # the request's observable context, computed at most once
        policy_fallback, logged = None, None  # logged: a Gaussian-logged draw's record (the CRM policy's, or below)
        if source in LEARNED_POLICIES:
            source_version, policy = self.learned[source].current
            if policy is not None:
                context = self.obs_spec.context(self.ctx, req)
                try:
                    if source == "crm":  # a draw of the policy, logged with its density
                        live, mean, log_density = policy.draw(context, self.crm_rng)
                        logged = {"weights": live, "mean": mean, "log_density": log_density}
                    else:
                        live = policy(context)[0]
                    arm_version = source_version if arm is not None else None
                except ValueError as e:  # a policy that does not fit this app's world: never take requests down
                    name = source.replace("_", " ")
                    policy_fallback = f"{name} policy v{source_version} unusable ({e}): held weights served"
                    policy = None
            if policy is None:  # nothing (usable) published: the ranking stage's held weights
                source, source_version = "held", None
        # the agent's choice needs only the request context: ask for it now, await it before ranking
        ask_agent = source == "utility_agent" and self.has_agent
        choice_ref = self.utility_agent.choose.remote(req) if ask_agent and self.local_agent is None else None
        params = {"ranking": live if weights is None else weights}  # overrides of the stages' held parameters
        choice, fallback, out, versions, actions, timing, batches = None, None, None, {}, {}, {}, {}

        async def settle_ranking() -> None:  # the agent's choice, then weight logging's draw: ranking's parameters
            nonlocal choice, fallback, logged
            if ask_agent:
                started = time.perf_counter()
                choice, fallback = await self._agent_choice(req, choice_ref)
                timing["agent"] = (time.perf_counter() - started) * 1e3
                if choice is not None:
                    params["ranking"] = np.asarray(choice["weights"], np.float32)
            if weights is None and self.weight_logging is not None and logged is None:
                params["ranking"], logged = self._draw_weights(params["ranking"])

        batched = None  # micro-batching: the whole cascade in one batch, ranking's parameters settled before it
        if self.fused and self.micro_batch > 1:
            await settle_ranking()
            batched = await self._cascade_batch((req, params))
        for stage in STAGES:
            if batched is not None:
                result, wall_ms = batched[stage], batched[stage].compute_ms
            else:
                if stage == "ranking":
                    await settle_ranking()
                candidates = None if out is None else out.items
                result, wall_ms = await self._run_stage(stage, req, candidates, params.get(stage), actions)
            out, versions[stage], actions[stage] = result.out, result.version, result.action
            timing[stage] = result.compute_ms
            if batched is not None:  # a count, not a duration: the header carries it as desc
                batches[f"{stage}_batch"] = result.batch
            if not self.fused:
                timing[f"{stage}_hop"] = max(wall_ms - result.compute_ms, 0.0)
            if result.policy_version is not None:  # a learned stage policy acted: the response names its version
                versions[f"{stage}_policy"] = result.policy_version
            if result.index_version is not None:  # matching's catalogue snapshot
                versions["matching_index"] = result.index_version
        ranked, weights = out, params["ranking"]
        if choice is not None:
            source_version = choice.get("operating_point_version")
            if arm is not None:
                arm_version = source_version
        elif source == "utility_agent":  # the agent failed or is absent: the held weights served
            source = "held"
        if source == "held" and "ranking_policy" in versions:  # UNEX-RL's ranking-stage policy chose them
            source, source_version = "stage_policy", versions["ranking_policy"]
        elif source == "held":
            source_version = versions["ranking"]
        if source in LEARNED_POLICIES:
            versions[source] = source_version
        request_id = f"{req.request_id:016x}"
        self.served[request_id] = served = {
            "uid": req.request_id,
            "user_id": body.user_id,
            "ts_us": served_us,
            "items": ranked.items[0],
            "predictions": {k: v[0] for k, v in ranked.predictions.items()},
            "weights": weights,
            "version": versions["ranking"],
            "propensity": 1.0 if choice is None else choice["propensity"],
            "context": choice["context"] if choice is not None else self._logged_context(req, logged, context),
            "weight_mean": None if logged is None else logged.get("mean"),
            "weight_log_density": None if logged is None else logged.get("log_density"),
            "arm": None if arm is None else self.experiment.arm_id(arm),
            "arm_version": arm_version,
            "ranking_policy": source,
            "ranking_policy_version": source_version,
            "shadow": self._shadow(arm, weights, logged),
        }
        while len(self.served) > self.cache_size:
            self.served.popitem(last=False)
        metrics = [f"{name};dur={ms:.3f}" for name, ms in timing.items()]
        metrics += [f"{name};desc={n}" for name, n in batches.items()]
        response.headers["server-timing"] = ", ".join(metrics)
        return RecommendResponse(
            request_id=request_id,
            user_id=body.user_id,
            slate=ranked.items[0].tolist(),
            scores=ranked.scores[0].round(6).tolist(),
            predictions={k: v[0].round(6).tolist() for k, v in ranked.predictions.items()},
            versions=versions,
            utility=({"fallback": fallback} if fallback else None)
            if choice is None
            else {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in choice.items() if k != "context"},
            weight_logging=None
            if logged is None
            else {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in logged.items()},
            served_record=self.served_record.seal(request_id, served),
            arm=None if arm is None else {"name": arm.name, "policy": arm.policy, "version": arm_version},
            ranking_policy={"name": source, "version": source_version}
            | ({"fallback": policy_fallback} if policy_fallback else {}),
        )

    async def _inner_reward_scores(self, offsets, clicked, dwell, skipped, relevance):
        """(rewards, totals, weights version): the Rust kernel in this replica with the inner-reward app's weights
        followed from their store (``inner_reward_weights_store``), else one handle call to the inner-reward app."""
        if self.reward_weights is not None:
            return score_slates(self.reward_weights, offsets, clicked, dwell, skipped, relevance, ["body"])
        try:
            if self._inner_reward is None:  # the inner-reward app is deployed on its own; look it up lazily
                self._inner_reward = serve.get_app_handle(self.inner_reward_app)
        except Exception:
            raise BadRequest(
                ["app"],
                f"inner-reward application {self.inner_reward_app!r} is not running",
                status=503,
                type_="unavailable",
            ) from None
        return await self._inner_reward.score_slates.remote(offsets, clicked, dwell, skipped, relevance)

    @app.post("/feedback", response_model=FeedbackResponse, responses=body_error_responses(403, 404, 410, 503))
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        served = self.served.get(body.request_id)
        if served is None and body.served_record is not None:  # served by another replica, or a dead one
            served = self.served_record.open(body.served_record, body.request_id)
        elif served is not None:
            self.served_record.check_age(served["ts_us"])
        if served is None:
            raise BadRequest(
                ["body", "request_id"],
                f"unknown or expired request_id {body.request_id!r} on this replica: send the /recommend "
                "response's served_record with the feedback",
                status=404,
                type_="not_found",
            )
        items = served["items"]
        for name in ("clicked", "dwell_s", "skipped", "purchased", "revenue"):
            if getattr(body, name) is not None and len(getattr(body, name)) != len(items):
                raise BadRequest(
                    ["body", name], f"the slate had {len(items)} items but {name} has {len(getattr(body, name))}"
                )
        offsets = np.array([0, len(items)], np.int64)
        relevance = retrieval_relevance(self.ctx, np.array([served["user_id"]]), items[None])[0]
        feedback = (np.asarray(body.clicked), np.asarray(body.dwell_s, np.float32), np.asarray(body.skipped))
        rewards, totals, version = await self._inner_reward_scores(offsets, *feedback, relevance)
        if self.events is not None:
            self.events.emit(
                slate_events(
                    request_uid=served["uid"],
                    ts_us=served["ts_us"],
                    user_id=served["user_id"],
                    items=items,
                    clicked=np.asarray(body.clicked),
                    dwell_s=np.asarray(body.dwell_s),
                    skipped=np.asarray(body.skipped),
                    inner_reward=rewards,
                    predictions=served["predictions"],
                    relevance=relevance,
                    utility_weights=served["weights"],
                    policy_version=served["version"],
                    purchased=body.purchased,
                    revenue=body.revenue,
                    session_id=body.session_id,
                    propensity=served["propensity"],
                    context=served["context"],
                    weight_mean=served["weight_mean"],
                    weight_log_density=served["weight_log_density"],
                    arm=served["arm"],
                    arm_version=served["arm_version"],
                    ranking_policy=served.get("ranking_policy"),
                    ranking_policy_version=served.get("ranking_policy_version"),
                    shadow=served.get("shadow"),
                )
            )
        return FeedbackResponse(
            request_id=body.request_id,
            rewards=np.round(rewards.astype(np.float64), 6).tolist(),
            total=round(float(totals[0]), 6),
            weights_version=version,
        )

    def _require_experiment(self) -> ArmSplit:
        if self.experiment is None:
            raise BadRequest(
                ["app"], "this recommend app runs no experiment (args: experiment)", status=404, type_="not_found"
            )
        return self.experiment

    def _arm(self, name: str, weights_only: bool = False):
        arm = self._require_experiment().by_name.get(name)
        if arm is None or (weights_only and arm.policy != "weights"):
            which = [a.name for a in self.experiment.arms if a.policy == "weights" or not weights_only]
            raise BadRequest(
                ["path", "arm"], f"no {'weights ' if weights_only else ''}arm {name!r}; arms: {which}", 404, "not_found"
            )
        return arm

    @app.get("/experiments", responses=error_responses(404))
    async def experiments(self) -> dict[str, Any]:
        """The live experiment: each arm's share, policy, version and weights, and its KPIs per request with
        95 % intervals clustered by user, from the events the sink has written so far."""
        self._require_experiment()
        return await self._experiment_report(*await asyncio.to_thread(self._arms_held))

    async def _experiment_report(self, arms: dict[str, dict], shadow: dict) -> dict[str, Any]:
        """``_arms_held``'s arms (each updated in place) with their live KPIs, as ``GET /experiments`` answers."""
        sink = getattr(self.events, "sink", None)
        if isinstance(sink, ParquetSink):
            current = {name: held.get("version") for name, held in arms.items()}
            report = await asyncio.to_thread(self._arm_report, sink.root, current)
            for name, held in arms.items():
                held |= report.get(name, {"requests": 0, "users": 0, "kpis": None})
            note = (
                "KPIs per request of each arm's current version (all versions for agent arms), from the Parquet "
                f"events written so far (refreshed at most every {REPORT_TTL_S:g} s); 95 % intervals clustered by user"
            )
        else:
            note = "KPIs need the Parquet telemetry sink (telemetry.sink 'parquet'); read Redis logs offline"
        return {
            "name": self.experiment.name,
            "salt": self.experiment.salt,
            "arms": arms,
            "shadow": shadow,
            "note": note,
        }

    def _arms_held(self) -> tuple[dict[str, dict], dict]:
        """Each arm's share, policy, version and weights, and the shadow's state, from their stores (blocking:
        called on a worker thread)."""
        arms = {}
        for arm in self.experiment.arms:
            held = {"policy": arm.policy, "share": arm.share}
            if arm.name in self.arm_stores:
                snap = ray.get(self.arm_stores[arm.name].get.remote(), timeout=STORE_TIMEOUT_S)
                held |= {"version": snap.version, "weights": [snap.params[n] for n in PARAM_NAMES["ranking"]]}
            elif arm.policy in LEARNED_POLICIES:  # its published policy's version (requests the held
                held["version"] = self.learned[arm.policy].current[0]  # weights served before are not pooled in)
            arms[arm.name] = held
        snap = ray.get(self.shadow_store.get.remote(), timeout=STORE_TIMEOUT_S)
        shadow = {"active": bool(snap.params.get("active")), "version": snap.version}
        if shadow["active"]:
            shadow["weights"] = [snap.params[n] for n in PARAM_NAMES["ranking"]]
        return arms, shadow

    def _arm_report(self, root: str, current: dict[str, int | None]) -> dict:
        """Per-arm KPIs, re-read from the logs at most every REPORT_TTL_S (a GET never stalls /recommend)."""
        now = time.monotonic()
        if self._report_cache is None or now - self._report_cache[0] > REPORT_TTL_S or self._report_cache[2] != current:
            self._report_cache = (now, arm_report(read_parquet_events(root), self.experiment, current), current)
        return self._report_cache[1]

    async def _versioned_put(self, store_call, response: Response):
        try:
            ack = await store_call
        except Exception as e:  # VersionConflict / NothingToRollBack arrive wrapped in a RayTaskError
            cause = getattr(e, "cause", e)
            if type(cause).__name__ == "VersionConflict":
                raise BadRequest(["body", "expected_version"], str(cause), status=409, type_="conflict") from None
            if type(cause).__name__ == "NothingToRollBack":
                raise BadRequest(["path", "arm"], str(cause), status=409, type_="conflict") from None
            raise
        ack["all_acked"] = ack["readers_acked"] >= ack["readers_live"]
        if not ack["all_acked"]:  # as PUT /operating-point: the laggards switch on their next poll
            response.status_code = 202
        return ack

    @app.put("/experiments/arms/{arm}/weights", responses={202: {"description": "Accepted"}, **ARM_ERRORS})
    async def put_arm_weights(
        self, arm: str, body: ArmWeightsBody, request: Request, response: Response
    ) -> dict[str, Any]:
        """Promote: a versioned hot update of one arm's weights: 200 once every replica serves it, 202 if some
        had not acknowledged within the store's ack timeout (they switch on their next poll)."""
        arm = self._arm(arm, weights_only=True)
        if sum(body.weights) <= 0:
            raise BadRequest(["body", "weights"], "weights must not all be 0")
        params = arm_weights_params(body.weights)
        put = self.arm_stores[arm.name].put.remote(params, body.expected_version, meta=body.meta(request))
        ack = await self._versioned_put(put, response)
        return {"arm": arm.name, "weights": body.weights, **ack}

    @app.post("/experiments/arms/{arm}/rollback", responses={202: {"description": "Accepted"}, **ARM_ERRORS})
    async def rollback_arm(
        self, arm: str, body: ArmRollbackBody, request: Request, response: Response
    ) -> dict[str, Any]:
        """Roll one arm back to its previous version (served again as a new version; 202 as for a promotion)."""
        arm = self._arm(arm, weights_only=True)
        rollback = self.arm_stores[arm.name].rollback.remote(body.expected_version, meta=body.meta(request))
        ack = await self._versioned_put(rollback, response)
        params = ack.pop("params")
        return {"arm": arm.name, "weights": [params[n] for n in PARAM_NAMES["ranking"]], **ack}

    @app.put("/experiments/shadow/weights", responses={202: {"description": "Accepted"}, **ARM_ERRORS})
    async def put_shadow_weights(self, body: ArmWeightsBody, response: Response) -> dict[str, Any]:
        """Put a candidate in shadow: every Gaussian-logged request of the experiment logs the candidate's
        would-be weights and its density of the served weights (``shadow_*`` event columns); nothing it
        proposes is served. Versioned like a promotion (200, or 202 while replicas catch up; 409 stale)."""
        self._require_experiment()
        if self.weight_logging is None:
            raise BadRequest(
                ["app"], "shadow mode needs Gaussian weight logging (args: weight_logging)", 409, "conflict"
            )
        if sum(body.weights) <= 0:
            raise BadRequest(["body", "weights"], "weights must not all be 0")
        put = self.shadow_store.put.remote({**arm_weights_params(body.weights), "active": 1.0}, body.expected_version)
        return {"shadow": "on", "weights": body.weights, **await self._versioned_put(put, response)}

    @app.delete("/experiments/shadow", responses={202: {"description": "Accepted"}, **ARM_ERRORS})
    async def delete_shadow(self, response: Response) -> dict[str, Any]:
        """Take the candidate out of shadow (a new version with shadow off)."""
        self._require_experiment()
        snap = await self.shadow_store.get.remote()
        put = self.shadow_store.put.remote({**snap.params, "active": 0.0}, None)
        return {"shadow": "off", **await self._versioned_put(put, response)}

    @app.get("/matching/index")
    async def get_matching_index(self) -> dict[str, Any]:
        """matching's retrieval index: the catalogue snapshot's version and source, the index's kind (exact
        or ivf), its size, cells, cells probed per query and build time."""
        if self.fused:
            return self.stages["matching"].describe_index()
        return await self.stages["matching"].describe_index.remote()

    @app.put("/matching/index", responses={202: {"description": "Accepted"}, **body_error_responses(409)})
    async def put_matching_index(self, body: CatalogueBody, response: Response) -> dict[str, Any]:
        """A catalogue update: every matching replica loads the snapshot and builds its index beside the one in
        service, then swaps (no request waits or fails); 200 once all have swapped, 202 while some still build
        (they swap when done), 409 on a stale ``expected_version``, 422 naming what is wrong with the file."""
        if body.path is not None:
            try:  # the check every replica would make, so a bad snapshot never reaches them
                await asyncio.to_thread(MatchingIndex.from_file, body.path, self.n_items, self.embed_dim)
            except ValueError as e:
                raise BadRequest(["body", "path"], str(e)) from None
        ack = await self._versioned_put(self.catalogue.put.remote({"path": body.path}, body.expected_version), response)
        return {"path": body.path, **ack}

    @app.get("/stages")
    async def get_stages(self) -> dict[str, Any]:
        out = {}
        for s, store in self.stores.items():
            snap = await store.get.remote()
            out[s] = {"version": snap.version, "params": snap.params}
        return out

    @app.put("/stages/{stage}/params", responses=body_error_responses(404, 409))
    async def put_stage_params(self, stage: str, body: StageParamsBody) -> dict[str, Any]:
        if stage not in STAGES:
            raise BadRequest(
                ["path", "stage"], f"unknown stage {stage!r}; stages are {list(STAGES)}", status=404, type_="not_found"
            )
        names = PARAM_NAMES[stage]
        if set(body.params) != set(names):
            raise BadRequest(
                ["body", "params"], f"{stage} params must be exactly {list(names)}, got {sorted(body.params)}"
            )
        try:  # the same check every stage replica applies, so a bad update can never reach them
            stage_params(params_array(stage, body.params), stage, 1)
        except ValueError as e:
            raise BadRequest(["body", "params"], str(e)) from None
        try:
            ack = await self.stores[stage].put.remote(body.params, body.expected_version)
        except Exception as e:  # VersionConflict arrives wrapped in a RayTaskError
            if "VersionConflict" in type(getattr(e, "cause", e)).__name__:
                raise BadRequest(
                    ["body", "expected_version"], str(e.cause), status=409, type_="version_conflict"
                ) from None
            raise
        return {"stage": stage, **ack}

    def _require_agent(self) -> None:
        if not self.has_agent:
            raise BadRequest(
                ["app"],
                "this recommend app runs without a utility agent (args: utility_agent)",
                status=404,
                type_="not_found",
            )

    @app.get("/operating-point", responses=error_responses(404))
    async def get_operating_point(self) -> dict[str, Any]:
        self._require_agent()
        snap = await self.operating_point.get.remote()
        return {"version": snap.version, **snap.params, "mode": self.utility_config.get("mode", "agent")}

    @app.put("/operating-point", responses={202: {"description": "Accepted"}, **body_error_responses(404, 409)})
    async def put_operating_point(
        self, body: OperatingPointBody, request: Request, response: Response
    ) -> dict[str, Any]:
        """Switch the live operating point on every agent replica: 200 once every live replica holds
        the new version, 202 (``all_acked: false``) if some had not acknowledged within the store's
        ack timeout (they switch on their next poll)."""
        self._require_agent()
        if (body.lambda_ is None) == (body.weights is None):
            raise BadRequest(
                ["body"],
                "give exactly one of 'lambda' (in [0, 1]) or 'weights' ([w_click, w_long_view, "
                "w_purchase], each in [0, 1e6])",
            )
        if self.utility_config.get("mode", "agent") == "explore":
            raise BadRequest(
                ["body"],
                "the agent runs in explore mode (the uniform logging policy): an operating point has no effect there",
                status=409,
                type_="conflict",
            )
        params = {"lambda": body.lambda_, "weights": body.weights}
        try:
            ack = await self.operating_point.put.remote(params, body.expected_version, meta=body.meta(request))
        except Exception as e:  # VersionConflict arrives wrapped in a RayTaskError
            if "VersionConflict" in type(getattr(e, "cause", e)).__name__:
                raise BadRequest(
                    ["body", "expected_version"], str(e.cause), status=409, type_="version_conflict"
                ) from None
            raise
        ack["all_acked"] = ack["readers_acked"] >= ack["readers_live"]
        if not ack["all_acked"]:
            response.status_code = 202
        return {**params, **ack}

    @app.get("/frontier", responses=error_responses(404))
    async def frontier(self) -> dict[str, Any]:
        """The current Pareto-frontier artifact (re-read, so a new study's file is served at once)."""
        self._require_agent()
        return await asyncio.to_thread(self._frontier_artifact)

    def _frontier_artifact(self) -> dict[str, Any]:
        path = self.utility_config.get("frontier")
        path = path and storage.resolve(path)  # relative: under the storage root; or a URI (rllib_policies.storage)
        if not path or not storage.exists(path):
            raise BadRequest(
                ["app", "utility_agent", "frontier"], f"no frontier artifact at {path!r}", status=404, type_="not_found"
            )
        return storage.read_json(path)

    @app.get("/operating-point/history", responses=error_responses(404, 422))
    async def operating_point_history(self, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
        """The operating point's audit log, newest first: version, from_version, when (``at``, Unix s), who,
        reason, from and to."""
        self._require_agent()
        return await self.operating_point.audit.remote(limit)

    # ---- the operator's page (serve_apps/operator.py) ------------------------------------------------
    @app.get("/operator", response_class=HTMLResponse)
    async def operator_page(self) -> HTMLResponse:
        return HTMLResponse(operator_page())

    @app.get(
        "/operator/assets/{name}",
        response_class=Response,
        responses={200: {"content": {t: {} for t in ("text/javascript", "text/css")}}, **error_responses(404)},
    )
    async def operator_asset(self, name: str) -> Response:
        found = operator_asset(name)
        if found is None:
            raise BadRequest(["path", "name"], f"no page asset {name!r}", status=404, type_="not_found")
        return Response(found[0], media_type=found[1], headers={"cache-control": "no-cache"})

    @app.get("/operator/state")
    async def operator_state(self) -> dict[str, Any]:
        """Everything the operator's page draws, in one document (each part null with a note when this app
        does not run it): the operating point, its audit log and the replicas holding it, the frontier, the A/B
        arms with their live KPIs and their audit logs, the inner-reward weights in force, the daily cycle."""
        state = await asyncio.to_thread(self._operator_snapshot, True)
        if self.experiment is not None:  # + the live KPIs, on the arms the snapshot read
            state["experiment"] = await self._experiment_report(
                state["experiment"]["arms"], state["experiment"]["shadow"]
            )
        if self.metrics is not None:
            try:
                self.metrics.update(state)
            except Exception:  # the gauges never take the page down; the metrics thread refreshes them
                pass
        return storage.json_safe(state)  # a frontier or a day with an interval that could not be computed

    def _operator_snapshot(self, audit: bool = False) -> dict[str, Any]:
        """The page's document without the live per-arm KPIs; the audit logs only with ``audit`` (the gauges need
        none). Blocking: called on a worker thread, or on the metrics thread."""
        notes, state = [], {"generated_at": time.time(), "app": serve.get_replica_context().app_name}
        state["operating_point"] = state["frontier"] = None
        if self.has_agent:
            snap = ray.get(self.operating_point.get.remote(), timeout=STORE_TIMEOUT_S)
            state["operating_point"] = {
                "version": snap.version,
                **snap.params,
                "mode": self.utility_config.get("mode", "agent"),
                "audit": ray.get(self.operating_point.audit.remote(50), timeout=STORE_TIMEOUT_S) if audit else [],
                "replicas": ray.get(self.operating_point.readers.remote(), timeout=STORE_TIMEOUT_S),
            }
            try:
                state["frontier"] = self._frontier_artifact()
            except BadRequest as e:
                notes.append(e.msg)
        else:
            notes.append("no utility agent: no operating point or frontier (args: utility_agent)")
        state["experiment"] = None
        if self.experiment is not None:
            arms, shadow = self._arms_held()
            for name, store in self.arm_stores.items() if audit else ():
                arms[name]["audit"] = ray.get(store.audit.remote(50), timeout=STORE_TIMEOUT_S)
            state["experiment"] = {"name": self.experiment.name, "arms": arms, "shadow": shadow}
        else:
            notes.append("no A/B experiment (args: experiment)")
        state["inner_reward"] = self._inner_reward_in_force()
        state["cycle"] = cycle_timeline(self.operator["cycle_root"])
        if state["cycle"] is None:
            notes.append("no daily cycle attached (args: operator.cycle_root)")
        state["notes"] = notes
        return state

    def _inner_reward_in_force(self) -> dict[str, Any]:
        if self.reward_weights is not None:
            version, weights = self.reward_weights.current
            return {"version": version, "weights": weights.as_dict(), "app": self.inner_reward_app}
        try:
            if self._inner_reward is None:  # one handle for the replica's lifetime, as /feedback's
                self._inner_reward = serve.get_app_handle(self.inner_reward_app)
            held = self._inner_reward.get_weights.remote().result(timeout_s=STORE_TIMEOUT_S)
            return {"version": held.version, "weights": held.weights, "app": self.inner_reward_app}
        except Exception as e:
            return {"error": f"inner-reward application {self.inner_reward_app!r}: {type(e).__name__}"}

    @app.get("/telemetry")
    async def telemetry(self) -> dict[str, Any]:
        return {"sink": type(self.events.sink).__name__, **self.events.stats()} if self.events else {"sink": "off"}

    def __del__(self):
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        if getattr(self, "events", None) is not None:
            self.events.close(timeout_s=5)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "n_users": self.n_users, "n_items": self.n_items, "time": time.time()}


def app_builder(args: dict[str, Any] | None = None) -> serve.Application:
    """args: {"preset": str, "world": {WorldConfig overrides}, "pipeline": {PipelineConfig fields},
    "store_prefix": str, "inner_reward_app": name of the running inner-reward application,
    "inner_reward_weights_store": that application's ``weights_store``: /feedback then runs the kernel in this
                                  replica on the weights it serves (hot updates included) instead of calling it,
    "telemetry": {"sink": "parquet"|"redis"|"off", "path"|"url"/"stream", BufferConfig fields},
    "utility_agent": {"mode": "agent"|"explore", "path": agent.pt, "frontier": frontier.json, "lambda": 0.5,
                      "placement": "replica" (fused default: in the recommend replica) | "deployment" (its own,
                      batched; the composed default), "num_replicas": 1 (deployment), "timeout_s": 0.5
                      (deployment), "grid_n", "grid_high" (explore)},
    "weight_logging": {"std": 0.3 | [3] or "cov": [[3 × 3]], "floor": 1e-3, "seed": int | None,
                       "max_tries": 100000} (Gaussian weight logging, serve_apps/weight_logging.py; None: off),
    "num_replicas": RecommendService replicas (1),
    "experiment": {"name", "salt"?, "arms": {name: {"share", "policy": "weights"|"utility_agent"|"outer_controller"
                  |"crm", "weights"}}} (the live A/B split, serve_apps/experiments.py; None: no experiment),
    "cascade": "fused" (the default: the ingress replica runs matching → pre-ranking → ranking in process) or
               "composed" (one deployment per stage, called by DeploymentHandles: stages scale independently;
               a call that meets a dying stage replica is sent once more),
    "stage_replicas": replicas of each stage deployment (composed only; 1),
    "micro_batch": the most concurrent requests a fused replica runs through a stage in one pass (1: off, the
                   default); only requests already waiting join a batch, so batches form only under load,
    "ranking_policy": who ranks requests without weights outside an arm: "held" (the ranking stage's parameters),
                      "utility_agent" (needs utility_agent; the default when it is given), "outer_controller"
                      (its published policy, actors.served_policies.publish_outer_controller) or "crm" (the
                      published CRM weight policy, actors.served_policies.publish_crm),
    "served_record": {"key_env": env var with the signing key, "max_age_s": 86400} (serve_apps/served_record.py;
                      without key_env a random key, shared by this deployment's replicas),
    "operator": {"cycle_root": the daily cycle's storage root (its days/ on the page; None: none),
                 "metrics_interval_s": 15 (Prometheus gauges' refresh; 0: no gauges)} (serve_apps/operator.py)}."""
    args = dict(args or {})
    unknown = set(args) - {
        "preset",
        "world",
        "pipeline",
        "store_prefix",
        "inner_reward_app",
        "telemetry",
        "utility_agent",
        "weight_logging",
        "served_record",
        "num_replicas",
        "experiment",
        "ranking_policy",
        "cascade",
        "inner_reward_weights_store",
        "operator",
        "stage_replicas",
        "micro_batch",
    }
    if unknown:
        raise ValueError(f"unknown recommend args: {sorted(unknown)}")
    world_config = WorldConfig.preset(args.get("preset", "default"), **args.get("world", {}))
    pipeline_config = PipelineConfig(**args.get("pipeline", {}))
    prefix = args.get("store_prefix", "recommend")
    cascade = args.get("cascade", "fused")
    if cascade not in ("fused", "composed"):
        raise ValueError(f"cascade must be 'fused' or 'composed', got {cascade!r}")
    micro_batch = args.get("micro_batch", 1)
    if not isinstance(micro_batch, int) or micro_batch < 1 or (micro_batch > 1 and cascade != "fused"):
        raise ValueError(f"micro_batch must be an int ≥ 1, and > 1 only with cascade 'fused', got {micro_batch!r}")
    stage_replicas = int(args.get("stage_replicas", 1))
    if stage_replicas < 1 or (cascade == "fused" and "stage_replicas" in args):
        raise ValueError(f"stage_replicas (≥ 1, replicas per stage) needs cascade 'composed', got {stage_replicas}")
    stages = {
        s: StageDeployment.options(name=f"Stage_{s}", num_replicas=stage_replicas).bind(
            s, world_config, pipeline_config, prefix
        )
        if cascade == "composed"
        else None
        for s in STAGES
    }
    if args.get("telemetry", {}).get("sink", "parquet") not in ("parquet", "redis", "off"):
        raise ValueError(f"telemetry sink must be 'parquet', 'redis' or 'off', got {args['telemetry']['sink']!r}")
    WeightLogging.from_config(args.get("weight_logging"))  # bad config fails here, naming the field
    agent_cfg = args.get("utility_agent")
    agent = None
    if agent_cfg is not None:
        agent_cfg = dict(agent_cfg)
        if agent_cfg.get("mode", "agent") not in ("agent", "explore"):
            raise ValueError(f"utility_agent.mode must be 'agent' or 'explore', got {agent_cfg['mode']!r}")
        if agent_cfg.get("mode", "agent") == "agent" and not agent_cfg.get("path"):
            raise ValueError("utility_agent.path (the trained agent.pt) is required in mode 'agent'")
        lam = agent_cfg.get("lambda", 0.5)
        if not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
            raise ValueError(f"utility_agent.lambda must be a number in [0, 1], got {lam!r}")
        agent_cfg.setdefault("placement", "replica" if cascade == "fused" else "deployment")
        if agent_cfg["placement"] not in ("replica", "deployment"):
            raise ValueError(
                f"utility_agent.placement must be 'replica' or 'deployment', got {agent_cfg['placement']!r}"
            )
        if agent_cfg["placement"] == "replica" and (cascade != "fused" or "num_replicas" in agent_cfg):
            raise ValueError(
                "utility_agent.placement 'replica' runs the agent in the fused recommend replica: it needs cascade "
                "'fused' and takes no num_replicas (use placement 'deployment' to scale the agent on its own)"
            )
        if agent_cfg["placement"] == "deployment":
            from serve_apps.utility_agent import UtilityAgentDeployment  # noqa: PLC0415  (AGENT_IMPORT)

            agent = UtilityAgentDeployment.options(num_replicas=int(agent_cfg.pop("num_replicas", 1))).bind(
                world_config, pipeline_config, agent_cfg, prefix
            )
    experiment = args.get("experiment")
    if experiment is not None:
        split = ArmSplit.from_config(experiment)  # bad config fails here, naming the field
        if agent_cfg is None and any(a.policy == "utility_agent" for a in split.arms):
            raise ValueError("experiment arm with policy 'utility_agent' needs the utility_agent arg")
    operator = dict(args.get("operator") or {})
    if set(operator) - {"cycle_root", "metrics_interval_s"}:
        raise ValueError(f"unknown operator args: {sorted(set(operator) - {'cycle_root', 'metrics_interval_s'})}")
    interval = operator.get("metrics_interval_s", 15.0)
    if not isinstance(interval, (int, float)) or interval < 0:
        raise ValueError(f"operator.metrics_interval_s must be a number ≥ 0 (0: no metrics), got {interval!r}")
    ranking_policy = args.get("ranking_policy")
    if ranking_policy not in (None, *RANKING_POLICIES):
        raise ValueError(f"ranking_policy must be one of {RANKING_POLICIES}, got {ranking_policy!r}")
    if ranking_policy == "utility_agent" and agent_cfg is None:
        raise ValueError("ranking_policy 'utility_agent' needs the utility_agent arg")
    return RecommendService.options(num_replicas=int(args.get("num_replicas", 1))).bind(
        *(stages[s] for s in STAGES),
        world_config,
        prefix,
        args.get("inner_reward_app", "inner_reward"),
        args.get("telemetry"),
        100_000,
        agent,
        agent_cfg,
        pipeline_config,
        weight_logging=args.get("weight_logging"),
        served_record=ServedRecordCodec.from_config(args.get("served_record")).config(),  # one key for all replicas
        experiment=experiment,
        ranking_policy=ranking_policy,
        inner_reward_weights_store=args.get("inner_reward_weights_store"),
        operator=operator,
        micro_batch=micro_batch,
    )
