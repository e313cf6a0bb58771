"""The cascading information chain (CIC) and category-quantile reward rescaling (CQR) of UNEX-RL.

CIC: every downstream observation is a deterministic function of the first, action-independent
observation (the request) and the upstream actions,

    o_k = f_k(o_1, a_1, …, a_{k−1}) = [ context(request), summary(candidates_k), a_{<k} / a_max ]

with candidates_k produced by replaying the cascade with those actions on the same request — its
per-request random streams make the replay exact (actors.stages.stage_rng). Learners rebuild o_k
this way instead of reading the stale o_k a replay buffer stored under old actions.

CQR: r̃ = Φ(r | G_u, G_i), the empirical quantile of the reward within its (user group, item group)
cell, over a sliding window of recent rewards per cell, maintained online.
"""

from __future__ import annotations

import numpy as np

from actors.cascade import Pipeline, Recommendation
from actors.stages import RequestBatch


def stage_observations(
    pipeline: Pipeline,
    req: RequestBatch,
    actions: dict[str, np.ndarray],
    upto: str = "ranking",
    context: np.ndarray | None = None,
    matched: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], Recommendation]:
    """CIC: (o_k for every stage up to ``upto``, the replay), by running the cascade with ``actions``
    on ``req``. Needs the actions of the stages before ``upto``; ``matched`` reuses matching's
    candidates from an earlier replay with the same a_1 (``replay.matched``)."""
    replay = pipeline.recommend(req, actions, observe=True, upto=upto, context=context, matched=matched)
    return replay.observations, replay


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
            self.cells[key] = np.concatenate([self.cells.get(key, np.empty(0)), rewards[m]])[-self.window :]

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
