"""The cascade, walked once: matching → pre_ranking → ranking for a batch of requests.

    rec = run_cascade(ctx, config, req, params={"ranking": w})                 # fixed / per-request params
    rec = run_cascade(ctx, config, req, policies={"ranking": pi}, spec=spec)   # a_k = π_k(o_k)

Each stage acts with, in order of precedence: its policy ``policies[stage](o_k)`` (o_k built by the
``ObservationSpec``), its parameters ``params[stage]`` (one vector [n] or one per request [B, n]), or
its defaults. ``upto`` stops after a stage; ``matched`` reuses matching's candidates from an earlier
run with the same matching action. The same function runs in process (``Pipeline``), in the learners'
samplers and CIC replays, and over the stage actors (``stage_runner`` sends each stage elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from actors.matching_index import MatchingIndex
from actors.observation import ObservationSpec
from actors.stages import STAGES, RequestBatch, StageContext, StageOutput, run_stage, stage_params
from actors.world import PipelineConfig, World, WorldConfig

StagePolicy = Callable[[np.ndarray], np.ndarray]  # o_k [B, D] → a_k [B, n_k]
StageRunnerFn = Callable[[str, RequestBatch, "np.ndarray | None", np.ndarray], StageOutput]


@dataclass
class Recommendation:
    """What the cascade did for a request batch."""

    slate: np.ndarray | None  # [B, K3] item ids, best first (None when stopped before ranking)
    scores: np.ndarray | None  # [B, K3] utility scores
    predictions: dict[str, np.ndarray]  # the ranker's p_click, p_long_view, p_purchase on the slate
    matched: np.ndarray | None  # [B, K1] matching's candidates
    pre_ranked: np.ndarray | None  # [B, K2] pre-ranking's candidates
    actions: dict[str, np.ndarray] = field(default_factory=dict)  # each stage's parameters as used [B, n_k]
    observations: dict[str, np.ndarray] = field(default_factory=dict)  # o_k, when built
    versions: dict[str, int] = field(default_factory=dict)  # parameter versions, when served by stage actors

    def received(self, stage: str) -> np.ndarray | None:
        """The candidates ``stage`` received (None for matching: the whole catalogue)."""
        return {"matching": None, "pre_ranking": self.matched, "ranking": self.pre_ranked}[stage]


def run_cascade(
    ctx: StageContext | None,
    config: PipelineConfig,
    req: RequestBatch,
    params: dict | None = None,
    policies: dict[str, StagePolicy] | None = None,
    *,
    spec: ObservationSpec | None = None,
    context: np.ndarray | None = None,
    observe: bool = False,
    upto: str = "ranking",
    matched: np.ndarray | None = None,
    stage_runner: StageRunnerFn | None = None,
) -> Recommendation:
    """Run the stages up to ``upto`` on ``req``; see the module docstring.

    Args:
        ctx: the serving system's view of the catalogue (needed to run stages locally or to observe).
        config: the pipeline's sizes and seed.
        req: the request batch.
        params: stage → parameters, fixed [n] or per request [B, n].
        policies: stage → a policy mapping o_k [B, D] to a_k [B, n_k]; takes precedence over params.
        spec: the observation layout (defaults to the world's); needed when a policy acts or ``observe``.
        context: the requests' contexts, when already built (else ``spec.context(ctx, req)``).
        observe: build o_k for every stage run (always built for stages that act by policy).
        upto: the last stage to run.
        matched: matching's candidates from an earlier run with the same matching action.
        stage_runner: run a stage elsewhere (stage actors); default: ``run_stage`` in process.
    """
    if upto not in STAGES:
        raise ValueError(f"upto must be one of {STAGES}, got {upto!r}")
    params, policies = params or {}, policies or {}
    unknown = (set(params) | set(policies)) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {STAGES}")
    b = len(req.user)
    if policies or observe:
        if ctx is None:
            raise ValueError("observing stages needs the StageContext")
        spec = spec or ObservationSpec.of(ctx.world.config)
        context = spec.context(ctx, req) if context is None else context
    runner = stage_runner or (lambda stage, r, cand, p: run_stage(ctx, config, stage, r, cand, p))
    rec = Recommendation(None, None, {}, None, None)
    candidates = None
    for stage in STAGES[: STAGES.index(upto) + 1]:
        if stage in policies or observe:
            rec.observations[stage] = spec.stage_observation(ctx, context, stage, candidates, rec.actions)
        if stage in policies:
            action = np.asarray(policies[stage](rec.observations[stage]), np.float32)
        else:
            action = params.get(stage)
        rec.actions[stage] = stage_params(action, stage, b)
        if stage == "matching" and matched is not None:
            out = StageOutput(matched, np.zeros(matched.shape, np.float32))
        else:
            out = runner(stage, req, candidates, rec.actions[stage])
        candidates = out.items
        if stage == "matching":
            rec.matched = out.items
        elif stage == "pre_ranking":
            rec.pre_ranked = out.items
        else:
            rec.slate, rec.scores, rec.predictions = out.items, out.scores, out.predictions
    return rec


class Pipeline:
    """The cascade in process on one world (the same stage functions the stage actors run)."""

    def __init__(self, world: World, config: PipelineConfig | None = None):
        self.world, self.config = world, config or PipelineConfig()
        self.ctx = StageContext(world, self.config.seed)
        self.ctx.index = MatchingIndex.for_config(self.ctx, self.config)  # None: exact search
        self.spec = ObservationSpec.of(world.config)

    def recommend(
        self, req: RequestBatch, params: dict | None = None, policies: dict[str, StagePolicy] | None = None, **kwargs
    ) -> Recommendation:
        """``run_cascade`` on this pipeline's world (keyword arguments as there)."""
        return run_cascade(self.ctx, self.config, req, params, policies, spec=self.spec, **kwargs)

    def context(self, req: RequestBatch) -> np.ndarray:
        """The requests' observable contexts (``ObservationSpec.context``)."""
        return self.spec.context(self.ctx, req)


_WORLD_CACHE: dict[str, tuple[World, Pipeline]] = {}  # by the config as canonical JSON (lists from YAML)


def build_world(env_config: dict | None) -> tuple[World, Pipeline]:
    """World + Pipeline from a config mapping {"preset", "world": {overrides}, "pipeline": {...}} (the
    learners' ``env_config``). Cached per process: envs and learners in one process share the
    (read-only) world."""
    cfg = dict(env_config or {})
    world_overrides = dict(cfg.get("world", {}))
    pipeline_kwargs = dict(cfg.get("pipeline", {}))
    key = json.dumps([cfg.get("preset", "default"), world_overrides, pipeline_kwargs], sort_keys=True, default=str)
    if key not in _WORLD_CACHE:
        world = World(WorldConfig.preset(cfg.get("preset", "default"), **world_overrides))
        _WORLD_CACHE[key] = (world, Pipeline(world, PipelineConfig(**pipeline_kwargs)))
    return _WORLD_CACHE[key]
