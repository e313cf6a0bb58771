"""Exploration logs for the utility-weight agent, and the request-level table it trains on.

The logging policy picks one utility-weight vector per request uniformly from the discrete action
grid (PRL-PUTS: 7 values for each of two weights, 49 actions), so every logged action has
propensity 1/|A| and "reward at hit" is exactly SNIPS. Adaptive exploration (successive halving,
learning.py) logs later rounds uniformly over a round's support S ⊆ A of survivors
(``halving_survivors``), each request with that round's propensity 1/|S|. Events go through the telemetry schema and
ParquetSink like served traffic (the Serve app logs the same way in ``mode: explore``); the
request table (one row per request: context, action, propensity, per-objective rewards) is built
from them with Ray Data, grouped by user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

from actors.cascade import build_world
from actors.simulate import run_sessions, simulated_events
from actors.stages import run_stage, utility_weight_grid
from actors.telemetry import EVENT_SCHEMA, ParquetSink, dedupe
from actors.telemetry.sessionise import map_user_partitions, requests_table
from actors.world import seed_sequence

# Reward groups, one Q head each: engagement (clicks) vs. conversion-like long dwell (≥ 18 s views).
OBJECTIVES = ("clicks", "long_views")
DAY_US = 86_400 * 10**6


@dataclass(frozen=True)
class ActionGrid:
    """The discrete action set: w_click fixed at 1, ``n`` linearly spaced values of w_long_view in
    [0, high[0]] and of w_purchase in [0, high[1]] → n² weight vectors (w_click, w_long_view, w_purchase)."""

    n: int = 7
    high: tuple[float, float] = (2.0, 40.0)

    def __post_init__(self) -> None:
        if self.n < 2 or not all(h > 0 for h in self.high):
            raise ValueError(f"ActionGrid needs n >= 2 and positive highs, got n={self.n}, high={self.high}")

    @property
    def weights(self) -> np.ndarray:
        return utility_weight_grid(self.n, tuple(self.high))

    @property
    def size(self) -> int:
        return self.n * self.n

    def match(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearest grid index [N], whether the vector is on the grid [N]) for weight vectors [N, 3]."""
        w = np.asarray(weights, np.float32).reshape(-1, 3)
        dist = np.abs(w[:, None, :] - self.weights[None]).max(axis=2)
        idx = dist.argmin(axis=1)
        return idx, dist[np.arange(len(w)), idx] <= 1e-4 * max(self.high)

    def index_of(self, weights: np.ndarray) -> np.ndarray:
        """Grid index of each logged weight vector [N, 3]; ValueError if one is not on the grid."""
        w = np.asarray(weights, np.float32).reshape(-1, 3)
        idx, on = self.match(w)
        off = ~on
        if off.any():
            raise ValueError(
                f"logged utility weights {w[off][0].tolist()} are not on the action grid "
                f"(n={self.n}, high={self.high}); log with the same grid you train on"
            )
        return idx


DEFAULT_GRID = ActionGrid()  # PRL-PUTS's 7 × 7 grid


def exploration_support(grid: ActionGrid, support=None) -> np.ndarray:
    """The grid indices a logging round serves (sorted, unique): all of A by default; ValueError on
    an empty support or an index off the grid."""
    if support is None:
        return np.arange(grid.size)
    s = np.unique(np.asarray(support, np.int64).ravel())
    if s.size == 0 or s[0] < 0 or s[-1] >= grid.size:
        raise ValueError(f"exploration support must be a non-empty set of grid indices in [0, {grid.size}), got {s}")
    return s


def uniform_actions(rng: np.random.Generator, b: int, grid: ActionGrid, support=None) -> tuple[np.ndarray, np.ndarray]:
    """The logging policy: a ~ Uniform(S) per request, S ⊆ A the round's support (all of A by
    default) → (grid action index [B], propensity 1/|S| [B])."""
    s = exploration_support(grid, support)
    if s.size == grid.size:  # the plain uniform logger (same draws as before supports existed)
        return rng.integers(0, grid.size, b), np.full(b, 1.0 / grid.size, np.float32)
    return s[rng.integers(0, s.size, b)], np.full(b, 1.0 / s.size, np.float32)


def round_sessions(total: int, rounds: int) -> list[int]:
    """The session budget of each logging round: ``total`` split as evenly as possible (successive
    halving's equal budget per round), the remainder to the last rounds; ValueError if a round gets none."""
    if rounds < 1 or total < rounds:
        raise ValueError(f"need 1 <= rounds <= sessions, got rounds={rounds}, sessions={total}")
    base, extra = divmod(total, rounds)
    return [base + (r >= rounds - extra) for r in range(rounds)]


def halving_survivors(values: np.ndarray, support: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Successive halving's cut: of the round's support S, keep the top k = ⌈keep_fraction·|S|⌉
    actions by value at each λ (values [L, A], e.g. the model's mean Q̂_λ per action) and return the
    union over λ (sorted grid indices) — the next round's support."""
    if not 0 < keep_fraction < 1:
        raise ValueError(f"keep_fraction must be in (0, 1), got {keep_fraction}")
    support = np.asarray(support, np.int64)
    k = max(1, int(np.ceil(keep_fraction * support.size)))
    v = np.asarray(values, np.float64).reshape(-1, np.asarray(values).shape[-1])[:, support]  # [L, |S|]
    top = np.argsort(-v, axis=1, kind="stable")[:, :k]
    return np.unique(support[top])


def simulate_exploration_logs(
    env_config: dict | None,
    events_root: str,
    n_sessions: int = 2000,
    grid: ActionGrid = DEFAULT_GRID,
    seed: int = 0,
    batch_sessions: int = 500,
    ground_truth_path: str | None = None,
    support=None,
    round_index: int = 0,
) -> dict:
    """Serve ``n_sessions`` whole sessions on the simulator with uniformly random utility weights per
    request, through the same stage functions as the Serve app, and write their events (with the
    request context and propensity) to a ParquetSink at ``events_root``.

    ``support``: the grid indices this logging round draws from (all by default); every request
    logs the propensity of the round that served it, 1/|support|. ``round_index`` > 0 draws fresh
    users, sessions and actions (round 0 reproduces the single-round logs).

    ``ground_truth_path``: also write, per logged request, the simulator's exact expected clicks and
    long views of *every* action at that state (World.expected_response of each action's slate):
    the ground truth V(π) = mean_i E[r | s_i, π(s_i)] that off-policy estimates on these logs target."""
    world, pipeline = build_world(env_config)
    truth_tables = []
    sink = ParquetSink(events_root, n_buckets=4)
    rng = seed_sequence(seed, "exploration") if round_index == 0 else seed_sequence(seed, "exploration", round_index)
    support = exploration_support(grid, support)
    weights = grid.weights
    served, batches = {}, []  # request id → what the policy chose; events of the current batch of sessions

    def policy(world_, pipeline_, req, rng_):
        action, propensity = uniform_actions(rng, len(req.user), grid, support)
        rec = pipeline_.recommend(req, {"ranking": weights[action]})
        truth = expected_rewards_all_actions(pipeline_, req, rec.pre_ranked, weights) if ground_truth_path else None
        served[req.request_id] = (weights[action], propensity, rec.predictions, pipeline_.context(req), truth)
        return rec.slate

    def observer(req, slate, resp):
        w, propensity, preds, context, truth = served.pop(req.request_id)
        b, k = slate.shape
        uids = rng.integers(0, 2**63, b, dtype=np.uint64)
        if truth is not None:
            truth_tables.append(
                pa.table(
                    {
                        "request_id": np.char.mod("%016x", uids).tolist(),
                        "expected_clicks": list(truth[..., 0]),
                        "expected_long_views": list(truth[..., 1]),
                    }
                )
            )
        batches.append(
            simulated_events(
                pipeline,
                req,
                slate,
                resp,
                uids,
                predictions=preds,
                utility_weights=w,
                propensity=propensity,
                context=context,
            )
        )

    for start in range(0, n_sessions, batch_sessions):
        users = rng.integers(0, world.users.n, min(batch_sessions, n_sessions - start))
        # run_sessions' stream name: seed_sequence reads its first 8 bytes, so later rounds' names differ there
        name = f"exploration-{start}" if round_index == 0 else f"r{round_index}-{start}"
        run_sessions(world, pipeline, policy, len(users), seed + start, name, users, observer)
        sink.write(pa.Table.from_batches(batches))
        batches.clear()
    n_events = pads.dataset(events_root, format="parquet").count_rows()
    n_requests = n_events // pipeline.config.k_slate
    if ground_truth_path:
        pq.write_table(pa.concat_tables(truth_tables), ground_truth_path)
    return {"sessions": n_sessions, "requests": n_requests, "events": n_events, "support": support.tolist()}


def expected_rewards_all_actions(pipeline, req, candidates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """E[clicks], E[long views] of every action's slate at these requests [B, A, 2]: the ranking
    stage re-run with each weight vector on the same pre-ranked candidates and model noise, scored
    by the simulator's exact expectations."""
    out = np.empty((len(req.user), len(weights), 2), np.float32)
    for a, w in enumerate(weights):  # |A| small ranking passes (50 candidates each), vectorised over B
        slate = run_stage(pipeline.ctx, pipeline.config, "ranking", req, candidates, w).items
        clicks, long_views = pipeline.world.expected_response(req.user, slate)
        out[:, a, 0], out[:, a, 1] = clicks.sum(axis=1), long_views.sum(axis=1)
    return out


REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("user_id", pa.int64()),
        ("action", pa.int32()),
        ("propensity", pa.float32()),
        ("obs", pa.list_(pa.float32())),
        ("clicks", pa.float32()),
        ("long_views", pa.float32()),
        ("revenue", pa.float32()),
    ]
)


def request_rows(events: pa.Table, grid: ActionGrid = DEFAULT_GRID) -> pa.Table:
    """Served-item events → one row per *exploration* request (REQUEST_SCHEMA): deduplicated (sinks
    deliver at least once), with a logged context, a weight vector on the grid and a propensity
    below 1. Requests served greedily by the agent or with fixed weights (propensity 1) have no
    support for other actions: they are dropped, not mixed into training and off-policy estimates."""
    if events.num_rows == 0:
        return REQUEST_SCHEMA.empty_table()
    steps = requests_table(dedupe(events))
    steps = steps[steps["context"].notna() & (steps["propensity"] < 1.0)]
    if steps.empty:
        return REQUEST_SCHEMA.empty_table()
    action, on_grid = grid.match(np.stack(steps["action"].to_numpy()))
    steps, action = steps[on_grid], action[on_grid]
    if steps.empty:
        return REQUEST_SCHEMA.empty_table()
    obs = np.stack(steps["context"].to_numpy()).astype(np.float32)
    return pa.table(
        {
            "request_id": pa.array(steps["request_id"].to_numpy(), pa.string()),
            "user_id": pa.array(steps["user_id"].to_numpy(np.int64)),
            "action": pa.array(action.astype(np.int32)),
            "propensity": pa.array(steps["propensity"].to_numpy(np.float32)),
            "obs": pa.ListArray.from_arrays(
                pa.array(np.arange(0, obs.size + 1, obs.shape[1], dtype=np.int32)), pa.array(obs.ravel())
            ),
            **{k: pa.array(steps[k].to_numpy(np.float32)) for k in ("clicks", "long_views", "revenue")},
        },
        schema=REQUEST_SCHEMA,
    )


def request_dataset(events_root: str, grid: ActionGrid = DEFAULT_GRID, num_cpus: float = 0.25, num_partitions: int = 8):
    """The Ray Data job: read the event Parquet, group by user (``num_partitions`` hash partitions),
    build request rows (materialised)."""
    ds = ray.data.read_parquet(
        events_root, schema=EVENT_SCHEMA, partitioning=None, file_extensions=["parquet"], num_cpus=num_cpus
    )
    return map_user_partitions(ds, lambda t: request_rows(t, grid), num_partitions, num_cpus).materialize()


def split_by_user(table: pa.Table, holdout: float = 0.3, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(train, held-out) with every user's requests on one side (no leakage through the user tower)."""
    users = table["user_id"].to_numpy()
    uniq = np.unique(users)
    held = seed_sequence(seed, "holdout").random(len(uniq)) < holdout
    mask = np.isin(users, uniq[held])
    return table.filter(pa.array(~mask)), table.filter(pa.array(mask))


def as_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns as NumPy: obs [N, d], action [N], propensity [N], rewards [N, 2] (OBJECTIVES order)."""
    if table.num_rows == 0:
        raise ValueError(
            "no request rows: the logs hold no exploration requests (context, propensity < 1, on the grid)"
        )
    obs_col = table["obs"].combine_chunks()
    d = len(obs_col[0])
    return {
        "obs": obs_col.flatten().to_numpy().reshape(-1, d).astype(np.float32),
        "action": table["action"].to_numpy().astype(np.int64),
        "propensity": table["propensity"].to_numpy().astype(np.float32),
        "rewards": np.stack([table[k].to_numpy() for k in OBJECTIVES], axis=1).astype(np.float32),
        "user_id": table["user_id"].to_numpy(),
        "request_id": np.asarray(table["request_id"].to_pylist(), object),
    }


def load_ground_truth(path: str | list[str], request_ids: np.ndarray) -> np.ndarray:
    """The exact expected rewards of every action at the given logged requests [N, A, 2] (see
    simulate_exploration_logs(ground_truth_path=…); several paths: one per logging round);
    KeyError naming a request without one."""
    paths = [path] if isinstance(path, str) else list(path)
    t = pa.concat_tables([pq.read_table(p) for p in paths])
    pos = {rid: i for i, rid in enumerate(t["request_id"].to_pylist())}
    missing = [r for r in request_ids if r not in pos]
    if missing:
        raise KeyError(f"{len(missing)} logged requests have no ground truth in {path!r}, e.g. {missing[0]!r}")
    idx = np.fromiter((pos[r] for r in request_ids), np.int64, len(request_ids))
    stack = lambda col: np.stack(t[col].to_numpy(zero_copy_only=False))[idx]  # noqa: E731
    return np.stack([stack("expected_clicks"), stack("expected_long_views")], axis=-1).astype(np.float64)


def exact_value(truth: np.ndarray, policy_actions: np.ndarray) -> np.ndarray:
    """V(π) = mean_i E[r | s_i, π(s_i)] over the logged states [2] (truth [N, A, 2])."""
    return truth[np.arange(len(truth)), np.asarray(policy_actions)].mean(axis=0)
