"""The stages as Ray actors holding versioned, hot-updatable parameters, and a pipeline over them.

Each actor builds the same World/StageContext from the config (deterministic in the seed) and
runs the same pure stage function as the in-process Pipeline, so for the same request and
parameters both paths give identical slates (tests/actors/test_stages.py).

A stage may also hold a learned stage policy (UNEX-RL's a_k = high·sigmoid(MLP(o_k))). ``act_and_run``
then builds o_k exactly as ``run_cascade`` does (the request's context, the candidates it receives,
the upstream stages' actions) and runs the stage with the policy's action. Policies reach the Serve
stage deployments through a versioned store (``actors.served_policies.publish_stage_policy``), so a hot update and a
rollback work as for parameters.

``ServedStage`` is a stage as a server runs it: parameters, stage policy and (matching) the retrieval index
each followed from a versioned store. The recommend app runs the three either in its ingress replica (the
fused path) or one per Serve deployment (the composed path): the same class, so both serve identical slates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import ray

from actors.cascade import Recommendation, run_cascade
from actors.matching_index import MatchingIndex
from actors.observation import ObservationSpec
from actors.param_store import ParamFollower, get_or_create_store
from actors.served_policies import mlp_act, mlp_layers, stage_policy_store
from actors.stages import (
    DEFAULT_PARAMS,
    PARAM_NAMES,
    STAGES,
    RequestBatch,
    StageContext,
    StageOutput,
    run_stage,
    stage_params,
)
from actors.world import PipelineConfig, World, WorldConfig

log = logging.getLogger(__name__)


def default_stage_params(stage: str) -> dict[str, float]:
    """A stage's default parameters by name (a param store's initial value)."""
    return dict(zip(PARAM_NAMES[stage], map(float, DEFAULT_PARAMS[stage])))


def params_array(stage: str, params: dict) -> np.ndarray:
    """A stage's parameters by name → the [n] vector the stage function takes."""
    return np.array([params[n] for n in PARAM_NAMES[stage]], np.float32)


def catalogue_store(prefix: str):
    """matching's catalogue snapshot: {"path": .npz with item_tower and popularity, or None for the world's own}."""
    return get_or_create_store(f"{prefix}_catalogue", {"path": None})


def open_stage_stores(prefix: str, stages=STAGES) -> list:
    """Every store the ``stages`` follow, in order: each stage's parameters and its learned policy, then matching's
    catalogue. Created side by side: each store is a process of its own, and a follower's first read waits for its
    store to start (one after another, a fused replica's seven stores took about 12 s of its start here)."""
    stores = []
    for stage in stages:
        params = get_or_create_store(f"{prefix}_{stage}", default_stage_params(stage))
        stores += [params, stage_policy_store(prefix, stage)]
    return stores + [catalogue_store(prefix)] * ("matching" in stages)


class StageRunner:
    """One stage with its current parameters (plain class; wrapped as an actor below)."""

    def __init__(
        self,
        stage: str,
        world_config: WorldConfig,
        pipeline_config: PipelineConfig,
        ctx: StageContext | None = None,
        build_index: bool = True,
    ):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage, self.pipeline_config = stage, pipeline_config
        if ctx is None:  # its own context, with matching's index as the in-process Pipeline builds it
            ctx = StageContext(World(world_config), pipeline_config.seed)
            if stage == "matching" and build_index:
                ctx.index = MatchingIndex.for_config(ctx, pipeline_config)
        self.ctx = ctx
        self.spec = ObservationSpec.of(world_config)
        self.params = DEFAULT_PARAMS[stage].copy()
        self.version = 1
        # a learned stage policy a = high·sigmoid(MLP(o)), once set_policy is called
        self.policy: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.policy_high: np.ndarray | None = None
        self.policy_version = 0

    def run(
        self, req: RequestBatch, candidates: np.ndarray | None = None, params=None, index: MatchingIndex | None = None
    ) -> tuple[StageOutput, int]:
        """Run on a request batch; ``params`` (per request) override the held ones for this call, ``index``
        matching's retrieval index (else the context's)."""
        p = self.params if params is None else params
        return run_stage(self.ctx, self.pipeline_config, self.stage, req, candidates, p, index), self.version

    def set_params(self, params, expected_version: int | None = None) -> int:
        """Replace the held parameters (validated); returns the new version."""
        if expected_version is not None and expected_version != self.version:
            raise ValueError(f"expected_version {expected_version} but {self.stage} is at version {self.version}")
        p = stage_params(params, self.stage, 1)[0].copy()
        self.params, self.version = p, self.version + 1
        return self.version

    def get_params(self) -> tuple[int, dict[str, float]]:
        return self.version, dict(zip(PARAM_NAMES[self.stage], map(float, self.params)))

    # ---------------------------------------------------------------- a learned stage policy
    def set_policy(self, mlp_state: dict, high, version: int) -> int:
        """Hot-update this stage's policy a = high·sigmoid(MLP(o)) (an nn.Sequential state dict of
        Linear layers with ReLU between them, as NumPy arrays); the new version serves from now on."""
        self.policy = mlp_layers(mlp_state)
        self.policy_high, self.policy_version = np.asarray(high, np.float32), int(version)
        return self.policy_version

    def clear_policy(self) -> None:
        """Back to the held parameters."""
        self.policy, self.policy_high, self.policy_version = None, None, 0

    def observe(self, req: RequestBatch, candidates: np.ndarray | None, upstream: dict[str, np.ndarray]) -> np.ndarray:
        """o_k = [context, candidates summary, upstream actions] [B, D], as ``run_cascade`` builds it."""
        return self.spec.stage_observation(self.ctx, self.spec.context(self.ctx, req), self.stage, candidates, upstream)

    def act_and_run(
        self, req: RequestBatch, candidates: np.ndarray | None, upstream: dict[str, np.ndarray]
    ) -> tuple[StageOutput, int, np.ndarray]:
        """The held policy's action on o_k and the stage run with it: (output, policy version, action [B, n])."""
        action, version = self.act(self.observe(req, candidates, upstream))
        out = run_stage(self.ctx, self.pipeline_config, self.stage, req, candidates, action)
        return out, version, action

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, int]:
        """The held policy's deterministic actions for observations [B, D] (NumPy forward pass)."""
        if self.policy is None:
            raise ValueError(f"{self.stage}: no policy set (set_policy first)")
        return mlp_act(self.policy, self.policy_high, obs), self.policy_version


StageActor = ray.remote(num_cpus=0)(StageRunner)


@dataclass
class StageResult:
    """What a served stage did for a request batch."""

    out: StageOutput
    version: int  # the held parameters' version
    action: np.ndarray  # the parameters it ran with [B, n]
    policy_version: int | None  # the learned stage policy's version, when one acted
    compute_ms: float  # time in the stage function (the rest of a call's wall time is transport)
    index_version: int | None = None  # matching: the catalogue snapshot's version
    batch: int = 1  # the requests run together in one pass (micro-batching; compute_ms is the batch's)


class ServedStage:
    """One stage as a server runs it: the pure stage function with parameters followed from the stage's
    versioned store; once one is published (``actors.served_policies.publish_stage_policy``), a learned
    stage policy acting on o_k; for matching, the retrieval index (``PipelineConfig.matching_index``) over the
    catalogue snapshot followed from ``catalogue_store``: a new snapshot is loaded and indexed on the
    follower's thread while requests keep using the old index, then swapped in one assignment."""

    def __init__(
        self,
        stage: str,
        world_config: WorldConfig,
        pipeline_config: PipelineConfig,
        store_prefix: str,
        reader_id: str,
        ctx: StageContext | None = None,
    ):
        self.stage = stage
        self.runner = StageRunner(stage, world_config, pipeline_config, ctx, build_index=False)  # followed below
        self.store, policy_store, *catalogue = open_stage_stores(store_prefix, [stage])
        self.follower = ParamFollower(self.store, reader_id, lambda p: params_array(stage, p))
        self.policy = ParamFollower(
            policy_store,
            reader_id,
            lambda p: (mlp_layers(p["mlp_state"]), np.asarray(p["high"], np.float32)) if p else None,
        )
        self.index, self.index_error, self._indexed = None, None, False
        if catalogue:
            self.index = ParamFollower(catalogue[0], reader_id, self._build_index)

    def _build_index(self, snapshot: dict) -> MatchingIndex | None:
        """The index over a catalogue snapshot (None: exact search on the world's towers). A snapshot that cannot
        be loaded (the PUT checked it; the file may have gone since, or not be visible here) raises on a hot
        update, so the follower keeps the index and version in service, leaves the update unacknowledged and
        retries; at start-up the replica serves the world's towers instead. ``index_error`` says why."""
        ctx, config = self.runner.ctx, self.runner.pipeline_config
        path, shape = snapshot.get("path"), ctx.item_tower.shape
        try:
            arrays = None if not path else MatchingIndex.from_file(path, *shape)
            index = MatchingIndex.for_config(ctx, config, source=path, arrays=arrays)
        except ValueError as e:
            self.index_error = f"catalogue snapshot {path!r} not applied: {e}"
            log.error(self.index_error)
            if self._indexed:
                raise
            index = None
        else:
            self.index_error = None
        self._indexed = True
        return index

    def run(self, req: RequestBatch, candidates=None, params=None, upstream: dict | None = None) -> StageResult:
        """A request's ``params`` override everything; else the stage policy acts on o_k (``upstream``: the earlier
        stages' actions); else the held parameters."""
        return self.run_many([(req, candidates, params, upstream)])[0]

    def run_many(self, calls: list[tuple]) -> list[StageResult]:
        """Several ``run`` calls (req, candidates, params, upstream) as one pass of the stage function over their
        requests concatenated (micro-batching): each call gets what it would get alone — its rows, its own
        parameters or else the policy's or the held ones, its random streams (keyed by its request ids) — and
        the batch's compute time."""
        started = time.perf_counter()
        version, held = self.follower.current
        policy_version, policy = self.policy.current
        index_version, index = self.index.current if self.index is not None else (None, None)
        reqs, candidates, params, upstream = zip(*calls)
        sizes = [len(r.user) for r in reqs]
        req = reqs[0] if len(calls) == 1 else RequestBatch.concat(list(reqs))
        cand = None if candidates[0] is None else np.concatenate(candidates)
        own = [p is not None for p in params]
        if all(own):
            base, policy = None, None
        elif policy is not None:  # o_k of every row (one forward), though rows with their own parameters ignore it
            ups = {s: np.concatenate([u[s] for u in upstream]) for s in (upstream[0] or {})}
            base = mlp_act(*policy, self.runner.observe(req, cand, ups))
        else:
            base = stage_params(held, self.stage, len(req.user))
        parts = [stage_params(p, self.stage, n) if p is not None else None for p, n in zip(params, sizes)]
        offsets = np.cumsum([0, *sizes])
        action = (
            np.concatenate(parts)
            if base is None
            else np.concatenate([base[a:b] if p is None else p for p, a, b in zip(parts, offsets, offsets[1:])])
        )
        out, _ = self.runner.run(req, cand, action, index)
        ms = (time.perf_counter() - started) * 1e3
        return [
            StageResult(
                StageOutput(out.items[a:b], out.scores[a:b], {k: v[a:b] for k, v in out.predictions.items()}),
                version,
                action[a:b],
                None if p is not None or policy is None else policy_version,
                ms,
                index_version,
                len(calls),
            )
            for p, a, b in zip(parts, offsets, offsets[1:])
        ]

    def stop(self) -> None:
        """Stop following the stores (the replica's shutdown; tests)."""
        for follower in (self.follower, self.policy, self.index):
            if follower is not None:
                follower.stop()

    def describe_index(self) -> dict:
        """matching's index: the catalogue snapshot's version, and the index's kind, size, cells and build time."""
        version, index = self.index.current
        exact = {"kind": "exact", "n_items": len(self.runner.ctx.item_tower), "source": None}
        return {**(exact if index is None else index.describe()), "version": version, "last_error": self.index_error}


def run_served_cascade(stages: dict[str, ServedStage], calls: list[tuple[RequestBatch, dict]]) -> list[dict]:
    """matching → pre_ranking → ranking for several requests at once (micro-batching): ``calls`` are (req, params:
    stage → that request's own parameters, stages not named acting as ``ServedStage.run`` says); each stage runs
    one pass over all of them (``ServedStage.run_many``). Returns, per call, stage → its StageResult."""
    out: list[dict] = [{} for _ in calls]
    for k, stage in enumerate(STAGES):
        previous = STAGES[k - 1] if k else None  # whose candidates this stage receives
        batch = [
            (req, r[previous].out.items if previous else None, p.get(stage), {s: res.action for s, res in r.items()})
            for (req, p), r in zip(calls, out)
        ]
        for r, result in zip(out, stages[stage].run_many(batch)):
            r[stage] = result
    return out


class ActorPipeline:
    """matching → pre_ranking → ranking through three stage actors (one call each, in order)."""

    def __init__(self, world_config: WorldConfig | None = None, pipeline_config: PipelineConfig | None = None):
        wc, pc = world_config or WorldConfig(), pipeline_config or PipelineConfig()
        self.config = pc
        self.actors = {s: StageActor.remote(s, wc, pc) for s in STAGES}

    def recommend(self, req: RequestBatch, params: dict | None = None) -> Recommendation:
        """The cascade with each stage run by its actor: with ``params[stage]`` where given, else with
        the actor's held parameters (``rec.versions`` names them; ``rec.actions`` has only the given)."""
        versions: dict[str, int] = {}
        params = params or {}

        def remote(stage: str, r: RequestBatch, candidates, p) -> StageOutput:
            out, versions[stage] = ray.get(self.actors[stage].run.remote(r, candidates, p if stage in params else None))
            return out

        rec = run_cascade(None, self.config, req, params, stage_runner=remote)
        rec.actions = {s: a for s, a in rec.actions.items() if s in params}
        rec.versions = versions
        return rec

    def set_params(self, stage: str, params, expected_version: int | None = None) -> int:
        return ray.get(self.actors[stage].set_params.remote(params, expected_version))

    def shutdown(self) -> None:
        for a in self.actors.values():
            ray.kill(a)
