"""Gaussian-logged weight requests on the simulator (Jeunen et al., arXiv 2405.02141: the ranking
weights are a continuous action, a = log w), the request table CRM trains on, and the world's exact
value of any weight policy at the logged states.

Logging policy q: per request a ~ N(log μ₀, diag σ₀²) truncated to the box
[log(1e-3·high), log high]³ (high = RANKING_ACTION_HIGH), w = exp(a) served by the ranking stage; the
event carries w (``utility_weights``), μ₀ (``weight_mean``), log q(a) (``weight_log_density``) and the
request context, through the telemetry sink like served traffic.

Objective (one scalar reward per request, documented choice): r_λ = λ·clicks/σ_clicks +
(1 − λ)·long_views/σ_long_views, σ_k the logged reward's standard deviation (as the utility agent
scalarises); or a learnt metric (metric.py). Ground truth: the logged states (user, history, step,
clicks, pre-ranked candidates, a per-request stage-noise id) are kept, so the exact expected KPIs of
*any* weight vector at a state are the ranking stage re-run with it on the same candidates and noise,
scored by ``World.expected_kpis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray.data

from actors.cascade import build_world
from actors.simulate import run_sessions, simulated_events
from actors.stages import DEFAULT_PARAMS, LONG_VIEW_S, RANKING_ACTION_HIGH, RequestBatch, run_stage
from actors.telemetry import EVENT_SCHEMA, ParquetSink, dedupe
from actors.telemetry.sessionise import map_user_partitions
from actors.world import seed_sequence, user_uniform
from rllib_policies.ope import GaussianPolicy

KPIS = ("clicks", "long_views", "purchases", "revenue")
LOG_LOW = np.log(1e-3 * RANKING_ACTION_HIGH.astype(np.float64))  # the box of a = log w
LOG_HIGH = np.log(RANKING_ACTION_HIGH.astype(np.float64))
DEFAULT_WEIGHTS = DEFAULT_PARAMS["ranking"].astype(np.float64)  # μ₀ of the benchmark: (1, 1, 10)
# A deliberately poor μ₀ for the learning test: click-heavy (long views 5×, purchases 10× below the defaults).
# From click-only (1, 0.01, 0.2) the oracle's region lies ≈ 3.5 σ₀ away: one logging round cannot reach it.
CLICK_HEAVY = np.array([1.0, 0.2, 1.0])
STATE_ID_BASE = 3_000_000_000  # per-request stage-noise ids of logged states


def logging_policy(mean_weights, sigma) -> GaussianPolicy:
    """q = N(log μ₀, diag σ₀²) truncated to [LOG_LOW, LOG_HIGH] (μ₀ in weight units, clipped into the box)."""
    mean = np.clip(np.log(np.asarray(mean_weights, np.float64)), LOG_LOW, LOG_HIGH)
    return GaussianPolicy(mean, np.broadcast_to(np.asarray(sigma, np.float64), (3,)).copy(), LOG_LOW, LOG_HIGH)


@dataclass(frozen=True)
class LoggedStates:
    """The logged request states (ground truth's inputs): RequestBatch fields with per-request noise
    ids, the pre-ranked candidates, cohorts and the logged request ids (hex uid strings)."""

    user: np.ndarray
    history: np.ndarray
    step: np.ndarray
    clicks: np.ndarray
    state_id: np.ndarray
    pre_ranked: np.ndarray
    cohort: np.ndarray
    request_id: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    @property
    def req(self) -> RequestBatch:
        return RequestBatch(self.user, self.history, self.step, self.clicks, self.state_id)

    def take(self, idx) -> LoggedStates:
        return LoggedStates(**{k: v[idx] for k, v in self.__dict__.items()})

    def select(self, request_ids) -> LoggedStates:
        """The states of these logged request ids, in their order (KeyError naming a missing one)."""
        pos = {r: i for i, r in enumerate(self.request_id.tolist())}
        missing = [r for r in request_ids if r not in pos]
        if missing:
            raise KeyError(f"{len(missing)} logged requests have no stored state, e.g. {missing[0]!r}")
        return self.take(np.fromiter((pos[r] for r in request_ids), np.int64, len(request_ids)))

    def save(self, path: str) -> str:
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in self.__dict__.items()})
        return path

    @classmethod
    def load(cls, path: str) -> LoggedStates:
        with np.load(path, allow_pickle=False) as f:
            return cls(**{k: f[k] for k in f.files})

    @classmethod
    def concat(cls, parts: list[LoggedStates]) -> LoggedStates:
        """The states of several logging rounds, in order."""
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})


def simulate_gaussian_logs(
    env_config: dict | None,
    events_root: str,
    n_sessions: int = 2000,
    mean_weights=DEFAULT_WEIGHTS,
    sigma=1.0,
    seed: int = 0,
    batch_sessions: int = 500,
    states_path: str | None = None,
    round_index: int = 0,
) -> dict:
    """Serve ``n_sessions`` whole sessions with Gaussian-logged ranking weights (module docstring)
    and write their events to a ParquetSink at ``events_root``; ``states_path``: also save the logged
    states (``LoggedStates``, .npz) for the exact values of any policy. ``round_index`` > 0: a later
    logging round of the same run (fresh users, draws and state ids; round 0 reproduces a single round)."""
    if not 0 <= round_index < 10:
        raise ValueError(f"round_index must be in [0, 10), got {round_index}")
    world, pipeline = build_world(env_config)
    q = logging_policy(mean_weights, sigma)
    mu = np.exp(q.mean).astype(np.float32)
    rng = seed_sequence(seed, "crm-logging", round_index) if round_index else seed_sequence(seed, "crm-logging")
    counter = [round_index * 10**7]  # state ids: STATE_ID_BASE + seed·10⁸ + round·10⁷ + request
    sink = ParquetSink(events_root, n_buckets=4)
    served, batches, states = {}, [], []

    def policy(world_, pipeline_, req, rng_):
        b = len(req.user)
        ids = STATE_ID_BASE + seed * 10**8 + counter[0] + np.arange(b, dtype=np.int64)
        counter[0] += b
        row_req = RequestBatch(req.user, req.history, req.step, req.clicks, ids)
        w = np.exp(q.sample(rng, b)).astype(np.float32)
        a = np.clip(np.log(w.astype(np.float64)), LOG_LOW, LOG_HIGH)  # the served (float32) action
        rec = pipeline_.recommend(row_req, {"ranking": w})
        served[req.request_id] = (w, q.log_density(a), rec, pipeline_.context(row_req), row_req)
        return rec.slate

    def observer(req, slate, resp):
        w, log_q, rec, context, row_req = served.pop(req.request_id)
        uids = rng.integers(0, 2**63, len(slate), dtype=np.uint64)
        if states_path:
            states.append((row_req, rec.pre_ranked, np.char.mod("%016x", uids)))
        batches.append(
            simulated_events(
                pipeline,
                req,
                slate,
                resp,
                uids,
                predictions=rec.predictions,
                utility_weights=w,
                propensity=1.0,  # no grid draw: the weights' density is weight_log_density
                context=context,
                weight_mean=np.broadcast_to(mu, w.shape),
                weight_log_density=log_q,
            )
        )

    for start in range(0, n_sessions, batch_sessions):
        users = rng.integers(0, world.users.n, min(batch_sessions, n_sessions - start))
        name = f"crm-logging-{start}" if round_index == 0 else f"r{round_index}-{start}"  # streams differ in 8 bytes
        run_sessions(world, pipeline, policy, len(users), seed + start, name, users, observer)
        sink.write(pa.Table.from_batches(batches))
        batches.clear()
    if states_path:
        req = RequestBatch.concat([s[0] for s in states])
        LoggedStates(
            req.user,
            req.history,
            req.step,
            req.clicks,
            req.request_id,
            np.concatenate([s[1] for s in states]),
            world.users.cohort[req.user].astype(np.int64),
            np.concatenate([s[2] for s in states]),
        ).save(states_path)
    n_events = pads.dataset(events_root, format="parquet").count_rows()
    return {"sessions": n_sessions, "requests": n_events // pipeline.config.k_slate, "events": n_events}


# ---------------------------------------------------------------------------------------------- request rows
REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("user_id", pa.int64()),
        ("action", pa.list_(pa.float64(), 3)),  # a = log w
        ("log_propensity", pa.float64()),  # log q(a | x)
        ("obs", pa.list_(pa.float32())),
        ("clicks", pa.float32()),
        ("long_views", pa.float32()),
        ("purchases", pa.float32()),
        ("revenue", pa.float32()),
        ("arm", pa.string()),  # the A/B arm that served the request (null outside an experiment)
        ("arm_version", pa.int32()),
        ("ts", pa.timestamp("us", tz="UTC")),  # when the request was served
        ("shadow_log_density", pa.float64()),  # a shadow candidate's log density of the served action (or null)
    ]
)


def request_rows(events: pa.Table) -> pa.Table:
    """Served-item events → one row per Gaussian-logged request (REQUEST_SCHEMA), deduplicated;
    requests without a logged density or context (not drawn by a Gaussian logger) are dropped."""
    if events.num_rows == 0:
        return REQUEST_SCHEMA.empty_table()
    df = (
        dedupe(events)
        .select(
            ["user_id", "request_id", "position", "clicked", "dwell_s", "purchased", "revenue"]
            + ["utility_weights", "weight_log_density", "context", "arm", "arm_version", "ts", "shadow_log_density"]
        )
        .to_pandas()
    )
    df["long_view"] = df["clicked"].fillna(False).astype(bool) & (df["dwell_s"] >= LONG_VIEW_S)
    sums = df.groupby("request_id", sort=False).agg(
        clicks=("clicked", "sum"),
        long_views=("long_view", "sum"),
        purchases=("purchased", "sum"),
        revenue=("revenue", "sum"),
    )
    head = df.loc[
        df["position"] == 0,
        ["request_id", "user_id", "utility_weights", "weight_log_density", "context", "arm", "arm_version", "ts"]
        + ["shadow_log_density"],
    ]
    head = head.set_index("request_id")
    head = head[head["weight_log_density"].notna() & head["context"].notna()]
    if head.empty:
        return REQUEST_SCHEMA.empty_table()
    rows = head.join(sums, how="inner")
    action = np.log(np.stack(rows["utility_weights"].to_numpy()).astype(np.float64))
    obs = np.stack(rows["context"].to_numpy()).astype(np.float32)
    return pa.table(
        {
            "request_id": pa.array(rows.index.to_numpy(), pa.string()),
            "user_id": pa.array(rows["user_id"].to_numpy(np.int64)),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(np.clip(action, LOG_LOW, LOG_HIGH).ravel()), 3),
            "log_propensity": pa.array(rows["weight_log_density"].to_numpy(np.float64)),
            "obs": pa.ListArray.from_arrays(
                pa.array(np.arange(0, obs.size + 1, obs.shape[1], dtype=np.int32)), pa.array(obs.ravel())
            ),
            **{k: pa.array(rows[k].to_numpy(np.float32)) for k in KPIS},
            "arm": pa.Array.from_pandas(rows["arm"], type=pa.string()),  # NaN (no arm) → null
            "arm_version": pa.Array.from_pandas(rows["arm_version"], type=pa.int32()),
            "ts": pa.Array.from_pandas(rows["ts"], type=pa.timestamp("us", tz="UTC")),
            "shadow_log_density": pa.Array.from_pandas(rows["shadow_log_density"], type=pa.float64()),
        },
        schema=REQUEST_SCHEMA,
    )


def request_dataset(events_root: str, num_cpus: float = 0.25, num_partitions: int = 4):
    """The Ray Data job: read the event Parquet, group by user, build request rows (materialised)."""
    ds = ray.data.read_parquet(
        events_root, schema=EVENT_SCHEMA, partitioning=None, file_extensions=["parquet"], num_cpus=num_cpus
    )
    return map_user_partitions(ds, request_rows, num_partitions, num_cpus).materialize()


def as_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Request rows as NumPy: obs [N, d] float32, action [N, 3], log_propensity [N], KPIs [N] each."""
    if table.num_rows == 0:
        raise ValueError("no request rows: the logs hold no Gaussian-logged requests (weight_log_density, context)")
    obs = table["obs"].combine_chunks()
    d = len(obs[0])
    return {
        "obs": obs.flatten().to_numpy().reshape(-1, d).astype(np.float32),
        "action": table["action"].combine_chunks().flatten().to_numpy().reshape(-1, 3).astype(np.float64),
        "log_propensity": table["log_propensity"].to_numpy().astype(np.float64),
        **{k: table[k].to_numpy().astype(np.float64) for k in KPIS},
        "user_id": table["user_id"].to_numpy(),
        "request_id": np.asarray(table["request_id"].to_pylist(), object),
    }


def split_by_user(table: pa.Table, shares: tuple[float, ...], seed: int = 0) -> list[pa.Table]:
    """Split rows by user into len(shares) + 1 parts (the last takes the rest); no user in two parts, and a
    user's part is fixed by its id and ``seed`` alone (``user_uniform``), so later logs (another logging round,
    the next day) put each user on the same side."""
    users = table["user_id"].to_numpy()
    u = user_uniform(users, f"crm-split-{seed}")
    edges = np.cumsum((0.0, *shares, 1.0))
    edges[-1] = 1.0 + 1e-12
    part = np.searchsorted(edges, u, side="right") - 1
    return [table.filter(pa.array(part == p)) for p in range(len(shares) + 1)]


# ---------------------------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class Objective:
    """r_λ = λ·clicks/σ_clicks + (1 − λ)·long_views/σ_long_views per request (σ from the training logs)."""

    lam: float = 0.5
    scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"objective λ must be in [0, 1], got {self.lam}")
        if not all(s > 0 for s in self.scale):
            raise ValueError(f"objective scales must be > 0, got {self.scale}")

    @classmethod
    def fitted(cls, lam: float, rows: dict[str, np.ndarray]) -> Objective:
        return cls(lam, (float(max(rows["clicks"].std(), 1e-9)), float(max(rows["long_views"].std(), 1e-9))))

    def __call__(self, kpis: dict[str, np.ndarray]) -> np.ndarray:
        return self.lam * kpis["clicks"] / self.scale[0] + (1 - self.lam) * kpis["long_views"] / self.scale[1]


# ---------------------------------------------------------------------------------------------- exact values
def exact_kpis(pipeline, states: LoggedStates, weights, chunk: int = 4096) -> dict[str, np.ndarray]:
    """E[KPI | s_i, w_i] per state [N] for weights [3] or per state [N, 3]: the ranking stage re-run
    with w_i on state i's candidates and stage noise, scored by the world's exact expectations."""
    n = len(states)
    w = np.broadcast_to(np.asarray(weights, np.float32), (n, 3))
    out = {k: np.empty(n) for k in KPIS}
    for s in range(0, n, chunk):
        part = states.take(slice(s, s + chunk))
        slate = run_stage(pipeline.ctx, pipeline.config, "ranking", part.req, part.pre_ranked, w[s : s + chunk]).items
        for k, v in pipeline.world.expected_kpis(part.user, slate).items():
            out[k][s : s + chunk] = v.sum(axis=1)
    return out


def policy_value(pipeline, states: LoggedStates, objective: Objective, actions) -> float:
    """V = mean_i E[r | s_i, a_i] for log-weight actions [N, 3] or [M, N, 3] (M draws: a stochastic
    policy's exact value up to the Monte-Carlo over its M draws)."""
    a = np.asarray(actions, np.float64)
    a = a.reshape(-1, *a.shape[-2:]) if a.ndim == 3 else np.broadcast_to(a, (1, len(states), 3))
    return float(np.mean([objective(exact_kpis(pipeline, states, np.exp(x))).mean() for x in a]))
