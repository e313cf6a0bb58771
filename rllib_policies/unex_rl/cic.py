"""The cascading information chain (CIC) and category-quantile reward rescaling (CQR) of UNEX-RL.

CIC: every downstream observation is a deterministic function of the first, action-independent
observation (the request) and the upstream actions,

    o_k = f_k(o_1, a_1, …, a_{k−1}) = [ context(request), summary(candidates_k), a_{<k} / a_max ]

with candidates_k produced by replaying matching (and pre-ranking) with those actions on the same
request — its per-request random streams make the replay exact (actors.stages.stage_rng). Learners
rebuild o_k this way instead of reading the stale o_k a replay buffer stored under old actions.

CQR: r̃ = Φ(r | G_u, G_i), the empirical quantile of the reward within its (user group, item group)
cell, over a sliding window of recent rewards per cell, maintained online.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.stages import PARAM_NAMES, RequestBatch, matching, pre_ranking
from rllib_policies.envs import STAGE_ACTION_HIGH, user_features

STAGES = ("matching", "pre_ranking", "ranking")
UPSTREAM_DIM = len(PARAM_NAMES["matching"]) + len(PARAM_NAMES["pre_ranking"])   # a_1 (4) and a_2 (3)


@dataclass
class Requests:
    """o_1 in raw form: what the serving system observed before any stage acted ([B] / [B, H])."""

    user: np.ndarray
    history: np.ndarray
    step: np.ndarray
    clicks: np.ndarray
    request_id: np.ndarray

    def batch(self) -> RequestBatch:
        return RequestBatch(self.user, self.history, self.step, self.request_id, self.clicks)

    def take(self, idx) -> "Requests":
        return Requests(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list["Requests"]) -> "Requests":
        return Requests(*(np.concatenate([getattr(p, f) for p in parts]) for f in Requests.__dataclass_fields__))


def candidate_summary(ctx, candidates: np.ndarray | None, b: int) -> np.ndarray:
    """Mean item-tower embedding, popularity and quality estimate of a stage's candidates [B, d + 2]
    (zeros for matching, which receives the whole catalogue)."""
    d = ctx.item_tower.shape[1]
    if candidates is None:
        return np.zeros((b, d + 2), np.float32)
    return np.concatenate([ctx.item_tower[candidates].mean(axis=1), ctx.popularity[candidates].mean(axis=1, keepdims=True),
                           ctx.quality_estimate[candidates].mean(axis=1, keepdims=True)], axis=1).astype(np.float32)


def upstream_features(actions: dict[str, np.ndarray], stage: str, b: int) -> np.ndarray:
    """a_{<k} / a_max, zero-padded to [B, 7] (matching's 4 then pre-ranking's 3)."""
    out = np.zeros((b, UPSTREAM_DIM), np.float32)
    if stage in ("pre_ranking", "ranking"):
        out[:, :4] = np.asarray(actions["matching"], np.float32) / STAGE_ACTION_HIGH["matching"]
    if stage == "ranking":
        out[:, 4:] = np.asarray(actions["pre_ranking"], np.float32) / STAGE_ACTION_HIGH["pre_ranking"]
    return out


def observation_dim(pipeline) -> int:
    return 2 * pipeline.world.config.embed_dim + 3 + 2 + pipeline.world.config.embed_dim + 2 + UPSTREAM_DIM


def stage_observations(pipeline, req: Requests, actions: dict[str, np.ndarray], upto: str = "ranking",
                       context: np.ndarray | None = None, matched: np.ndarray | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CIC: (o_k for every stage up to ``upto``, the candidates each stage received), by replaying
    matching → pre-ranking with ``actions`` on ``req``. Needs the actions of the stages before ``upto``;
    ``matched`` reuses matching's candidates from an earlier replay with the same a_1."""
    rb, ctx, cfg = req.batch(), pipeline.ctx, pipeline.config
    b = len(req.user)
    base = user_features(pipeline, rb) if context is None else context
    candidates = {"matching": None}
    if upto in ("pre_ranking", "ranking"):
        candidates["pre_ranking"] = (matched if matched is not None
                                     else matching(ctx, rb, actions["matching"], cfg.k_matching, cfg.seed).items)
    if upto == "ranking":
        candidates["ranking"] = pre_ranking(ctx, rb, candidates["pre_ranking"], actions["pre_ranking"], cfg.k_pre_ranking).items
    obs = {s: np.concatenate([base, candidate_summary(ctx, candidates[s], b), upstream_features(actions, s, b)], axis=1)
           for s in STAGES[: STAGES.index(upto) + 1]}
    return obs, candidates


class CategoryQuantileRescaler:
    """r̃ = Φ(r | G_u, G_i): the mid-rank quantile of r among the last ``window`` rewards of its
    (user group, item group) cell, (#{x < r} + ½·#{x = r}) / n; 0.5 for a cell with no history.
    ``rescale`` scores a batch against the cells as they were, then adds the batch (online); a cell
    seen for the first time is seeded with the batch's own rewards first (else its first batch
    would all be ½). Stored transitions keep the quantile they were given at insertion."""

    def __init__(self, n_user_groups: int, n_item_groups: int, window: int = 4096):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n_user_groups, self.n_item_groups, self.window = n_user_groups, n_item_groups, window
        self.cells: dict[tuple[int, int], np.ndarray] = {}

    def quantiles(self, rewards: np.ndarray, user_group: np.ndarray, item_group: np.ndarray) -> np.ndarray:
        out = np.full(len(rewards), 0.5)
        for key in set(zip(user_group.tolist(), item_group.tolist())):
            hist = self.cells.get(key)
            if hist is None or len(hist) == 0:
                continue
            m = (user_group == key[0]) & (item_group == key[1])
            srt = np.sort(hist)
            lo, hi = np.searchsorted(srt, rewards[m], "left"), np.searchsorted(srt, rewards[m], "right")
            out[m] = (lo + 0.5 * (hi - lo)) / len(srt)
        return out

    def update(self, rewards: np.ndarray, user_group: np.ndarray, item_group: np.ndarray) -> None:
        for key in set(zip(user_group.tolist(), item_group.tolist())):
            m = (user_group == key[0]) & (item_group == key[1])
            self.cells[key] = np.concatenate([self.cells.get(key, np.empty(0)), rewards[m]])[-self.window:]

    def rescale(self, rewards: np.ndarray, user_group: np.ndarray, item_group: np.ndarray) -> np.ndarray:
        new = np.array([(u, i) not in self.cells for u, i in zip(user_group.tolist(), item_group.tolist())], bool)
        if new.any():
            self.update(rewards[new], user_group[new], item_group[new])
        q = self.quantiles(rewards, user_group, item_group)
        if (~new).any():
            self.update(rewards[~new], user_group[~new], item_group[~new])
        return q

    def state(self) -> dict:
        return {f"{u},{i}": v.tolist() for (u, i), v in self.cells.items()}

    def set_state(self, state: dict) -> None:
        self.cells = {tuple(map(int, k.split(","))): np.asarray(v) for k, v in state.items()}
