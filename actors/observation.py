"""The observation layout, defined once: what a policy sees of a request and of a stage's input.

A request's context (the features every learner and every server build from a ``RequestBatch``):

    context = [ user_tower (d) | history (d) | cohort (one-hot, 3) | step (1) | clicks (1) ]

    user_tower  the two-tower model's user embedding
    history     the mean item-tower embedding of the recently clicked items (zeros when none)
    cohort      the user's cohort, one-hot
    step        request index within the session / max_requests, clipped to [0, 1]
    clicks      clicks so far in the session / 10, clipped to the trained range

A stage's observation (UNEX-RL's o_k, the cascading information chain):

    o_k = [ context | candidates (d + 2) | upstream (4 + 3) ]

    candidates  mean item-tower embedding, popularity and quality estimate of the candidates stage k
                receives (zeros for matching, which receives the whole catalogue)
    upstream    a_1 / a_max (matching's 4 parameters) then a_2 / a_max (pre-ranking's 3), zero where a
                stage has not acted yet

``ObservationSpec.slices`` names every part; ``spec.field(obs, "cohort")`` decodes one from a context
or a stage observation. Never the hidden session state (satisfaction, temper).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from actors.stages import PARAM_NAMES, STAGE_ACTION_HIGH, STAGES, RequestBatch, StageContext, history_embedding
from actors.world import COHORTS, WorldConfig

UPSTREAM_STAGES = ("matching", "pre_ranking")  # the stages whose actions downstream stages observe
CLICKS_SCALE = 10.0  # clicks are observed as clicks / 10 (one slate holds at most 10)


@dataclass(frozen=True)
class ObservationSpec:
    """Layout of request contexts and stage observations for one world configuration."""

    embed_dim: int
    max_requests: int
    n_cohorts: int = len(COHORTS)

    @classmethod
    def of(cls, world_config: WorldConfig) -> ObservationSpec:
        return cls(world_config.embed_dim, world_config.max_requests)

    @cached_property
    def slices(self) -> dict[str, slice]:
        """Every named part of a stage observation (the context parts are its prefix)."""
        d = self.embed_dim
        widths = {
            "user_tower": d,
            "history": d,
            "cohort": self.n_cohorts,
            "step": 1,
            "clicks": 1,
            "candidates": d + 2,
            "upstream": sum(len(PARAM_NAMES[s]) for s in UPSTREAM_STAGES),
        }
        out, start = {}, 0
        for name, w in widths.items():
            out[name] = slice(start, start + w)
            start += w
        return out

    @property
    def context_dim(self) -> int:
        return self.slices["clicks"].stop

    @property
    def dim(self) -> int:
        """Width of a stage observation o_k."""
        return self.slices["upstream"].stop

    def field(self, obs: np.ndarray, name: str) -> np.ndarray:
        """One named part of contexts or stage observations [..., D] (NumPy or torch)."""
        return obs[..., self.slices[name]]

    def context(self, ctx: StageContext, req: RequestBatch) -> np.ndarray:
        """The observable request context [B, context_dim] (float32)."""
        clicks = np.zeros(len(req.user), np.float32) if req.clicks is None else np.asarray(req.clicks, np.float32)
        step = np.clip(np.asarray(req.step, np.float32) / self.max_requests, 0.0, 1.0)
        cohort = np.eye(self.n_cohorts, dtype=np.float32)[ctx.world.users.cohort[req.user]]
        parts = [
            ctx.user_tower[req.user],
            history_embedding(ctx, req.history),
            cohort,
            step[:, None],
            np.minimum(clicks, CLICKS_SCALE * self.max_requests)[:, None] / CLICKS_SCALE,
        ]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def candidates(self, ctx: StageContext, candidates: np.ndarray | None, b: int) -> np.ndarray:
        """Summary of the candidates a stage receives [B, d + 2] (zeros for None: the whole catalogue)."""
        if candidates is None:
            return np.zeros((b, self.embed_dim + 2), np.float32)
        parts = [
            ctx.item_tower[candidates].mean(axis=1),
            ctx.popularity[candidates].mean(axis=1, keepdims=True),
            ctx.quality_estimate[candidates].mean(axis=1, keepdims=True),
        ]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def upstream(self, actions: dict[str, np.ndarray], stage: str, b: int) -> np.ndarray:
        """a_{<k} / a_max of the stages before ``stage``, zero-padded to [B, 7]."""
        out = np.zeros((b, self.slices["upstream"].stop - self.slices["upstream"].start), np.float32)
        start = 0
        for s in UPSTREAM_STAGES[: STAGES.index(stage)]:
            n = len(PARAM_NAMES[s])
            out[:, start : start + n] = np.asarray(actions[s], np.float32) / STAGE_ACTION_HIGH[s]
            start += n
        return out

    def stage_observation(
        self,
        ctx: StageContext,
        context: np.ndarray,
        stage: str,
        candidates: np.ndarray | None,
        actions: dict[str, np.ndarray],
    ) -> np.ndarray:
        """o_k = [context, candidates summary, upstream actions] [B, dim]."""
        b = len(context)
        parts = [context, self.candidates(ctx, candidates, b), self.upstream(actions, stage, b)]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def upstream_offsets(self, stage: str) -> dict[str, slice]:
        """Where each upstream stage's scaled action sits inside o_k (absolute columns)."""
        out, start = {}, self.slices["upstream"].start
        for s in UPSTREAM_STAGES[: STAGES.index(stage)]:
            out[s] = slice(start, start + len(PARAM_NAMES[s]))
            start += len(PARAM_NAMES[s])
        return out
