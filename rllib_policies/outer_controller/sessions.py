"""Session batches: whole sessions as flat step rows + per-session KPIs, from RLlib episodes
(online) or from the telemetry issue's trajectory Parquet (offline, Ray Data).

Rows are ordered session by session; ``session`` [N] indexes the per-session arrays and ``t`` [N]
is the step within the session. Learners rebuild padded [B, T] tensors with ``pad_sessions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

# Session-level KPIs the outer controller can blend. Online (simulator) sessions have all four;
# logged trajectories have revenue, return and clicks (NDCG needs relevance labels).
KPIS = ("revenue", "return", "ndcg", "clicks")
# KPIs that need the simulator's ground truth, with what it is: real logs cannot carry them.
GROUND_TRUTH_KPIS = {"ndcg": "graded relevance labels, which exist only in the simulator"}
LOGGED_KPIS = tuple(k for k in KPIS if k not in GROUND_TRUTH_KPIS)  # computable from logged trajectories
# KPIs that decompose over the session's requests, and how: KPI = Σ_t part_t ("sum") or
# KPI = (1/T)·Σ_t part_t ("mean"); the per-request part is the step_objectives column of that name.
# The next-day return has no per-request part. (Offline, a session longer than one trajectory window
# has per-request parts per window but session KPIs for the whole session: the windows' parts are
# credited where they were earned, and the blend's scale σ_J still comes from the session totals.)
STEP_KPIS = {"revenue": "sum", "clicks": "sum", "ndcg": "mean"}


@dataclass
class SessionBatch:
    obs: np.ndarray  # [N, D] float32
    actions: np.ndarray  # [N, A] float32
    inner_reward: np.ndarray  # [N] the slate's inner (per-impression) reward
    engaged: np.ndarray  # [N] bool: any click on the slate
    session: np.ndarray  # [N] int64 → row of the per-session arrays
    t: np.ndarray  # [N] int64 step within the session
    kpis: dict[str, np.ndarray] = field(default_factory=dict)  # name → [B] float64
    step_objectives: dict[str, np.ndarray] = field(default_factory=dict)  # name → [N] per-step parts

    @property
    def n_sessions(self) -> int:
        return int(self.session.max()) + 1 if len(self.session) else 0

    def padded(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N] row values → ([B, T] padded, [B, T] mask)."""
        b, t = self.n_sessions, int(self.t.max()) + 1
        out, mask = np.zeros((b, t)), np.zeros((b, t))
        out[self.session, self.t] = values
        mask[self.session, self.t] = 1.0
        return out, mask

    def step_kpi(self, name: str) -> np.ndarray | None:
        """KPI ``name``'s per-request part [N], scaled so that it sums to the session KPI (``STEP_KPIS``);
        None when the KPI has no per-request part in this batch."""
        if name not in STEP_KPIS or name not in self.step_objectives:
            return None
        part = self.step_objectives[name]
        if STEP_KPIS[name] == "mean":
            part = part / np.bincount(self.session, minlength=self.n_sessions)[self.session]
        return part

    def last_step(self) -> np.ndarray:
        """[N] bool: the row is its session's final step."""
        return np.r_[self.session[1:] != self.session[:-1], True]


def from_episodes(episodes) -> SessionBatch:
    """Complete SingleAgentEpisodes of SessionEnv → a SessionBatch. The info returned with reward t
    is ``get_infos()[t + 1]`` (index 0 is the reset info); the last info carries the session KPIs."""
    obs, actions, rewards, engaged, session, steps = [], [], [], [], [], []
    kpis = {k: [] for k in KPIS}
    parts = {"clicks": [], "long_views": [], "revenue": [], "ndcg": [], "inner_features": []}
    for b, ep in enumerate(e for e in episodes if e.is_done and len(e) > 0):
        n = len(ep)
        infos = ep.get_infos()[1 : n + 1]
        obs.append(np.asarray(ep.get_observations()[:n], np.float32))
        actions.append(np.asarray(ep.get_actions(), np.float32))
        rewards.append(np.asarray(ep.get_rewards(), np.float64))
        engaged.append(np.array([i["clicks"] > 0 for i in infos]))
        vec = np.stack([i["reward_vector"] for i in infos]).astype(np.float64)
        for j, name in enumerate(("clicks", "long_views", "revenue")):
            parts[name].append(vec[:, j])
        parts["ndcg"].append(np.array([i["ndcg_at_10"] for i in infos], np.float64))
        parts["inner_features"].append(np.stack([i["inner_features"] for i in infos]).astype(np.float64))
        session.append(np.full(n, b))
        steps.append(np.arange(n))
        last = infos[-1]
        kpis["revenue"].append(last["session_revenue"])
        kpis["return"].append(float(last["returned_next_day"]))
        kpis["ndcg"].append(last["mean_ndcg_at_10"])
        kpis["clicks"].append(last["session_clicks"])
    if not obs:
        raise ValueError("no complete episodes to train on")
    cat = np.concatenate
    return SessionBatch(
        cat(obs),
        cat(actions),
        cat(rewards),
        cat(engaged),
        cat(session),
        cat(steps),
        {k: np.asarray(v, np.float64) for k, v in kpis.items()},
        {k: cat(v) for k, v in parts.items()},
    )


def from_trajectories(table) -> SessionBatch:  # a pyarrow Table, a dict of columns or a list of rows
    """Trajectory rows (actors.telemetry TRAJECTORY_SCHEMA, with logged ``observations``) →
    SessionBatch. Each window row is one sequence; rows whose observations were not logged, or
    whose ``returned`` is still unknown, are skipped."""
    if isinstance(table, dict):
        table = pa.table(table)
    rows = table if isinstance(table, list) else table.to_pylist()
    obs, actions, rewards, clicks, revenue, session, steps = [], [], [], [], [], [], []
    kpis = {"revenue": [], "return": [], "clicks": []}
    b = 0
    for row in rows:
        o = row.get("observations")
        if not o or any(x is None for x in o) or row["returned"] is None:
            continue
        n = len(o)
        obs.append(np.asarray(o, np.float32))
        actions.append(np.asarray(row["actions"], np.float32))
        rewards.append(np.asarray(row["rewards"], np.float64))
        clicks.append(np.asarray(row["clicks"], np.float64))
        revenue.append(np.asarray(row["step_revenue"], np.float64))
        session.append(np.full(n, b))
        steps.append(np.arange(n))
        kpis["revenue"].append(row["session_revenue"])
        kpis["return"].append(float(row["returned"]))
        kpis["clicks"].append(row["session_clicks"])
        b += 1
    if not obs:
        raise ValueError("no trajectory rows with logged observations and a known 'returned' KPI")
    cat = np.concatenate
    c = cat(clicks)
    return SessionBatch(
        cat(obs),
        cat(actions),
        cat(rewards),
        c > 0,
        cat(session),
        cat(steps),
        {k: np.asarray(v, np.float64) for k, v in kpis.items()},
        {"clicks": c, "revenue": cat(revenue)},
    )


def pad_sessions(session: torch.Tensor, t: torch.Tensor, *values: torch.Tensor):
    """Flat rows → padded [B, T, …] tensors + mask [B, T]. Sessions are renumbered 0..B−1 and
    steps made relative to each session's first row present (a learner shard may cut a session)."""
    uniq, sid = torch.unique(session, return_inverse=True)
    first = torch.full((len(uniq),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=t.device)
    first = first.scatter_reduce(0, sid, t.long(), reduce="amin")
    rel = t.long() - first[sid]
    b, tmax = len(uniq), int(rel.max()) + 1
    mask = torch.zeros(b, tmax, device=t.device)
    mask[sid, rel] = 1.0
    out = []
    for v in values:
        p = torch.zeros((b, tmax) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
        p[sid, rel] = v
        out.append(p)
    return mask, sid, rel, out
