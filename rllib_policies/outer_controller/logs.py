"""Historical logs for warm starts and offline training: simulated days of sessions served by a
behaviour policy, written as served-item events (with the logged request context) to the
telemetry ParquetSink, then sessionised into trajectory Parquet by the Ray Data job.

Day d serves the users who returned from day d − 1 plus fresh users up to ``users_per_day``; each
user's session starts at the same hour offset every day, so the sessioniser's 24-hour return
window recovers the simulator's next-day return (the last day's returns stay unknown: null).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors.cascade import build_world
from actors.simulate import SIMULATED_T0_US, inner_rewards, run_sessions
from actors.stages import DEFAULT_PARAMS, retrieval_relevance
from actors.telemetry import ParquetSink, slate_events
from actors.world import seed_sequence

DAY_US = 86_400 * 10**6


def lognormal_behaviour(noise: float, base: np.ndarray | None = None):
    """w = base·exp(noise·ε), ε ~ N(0, I): returns (sample(rng, req) → (w [B, 3], density [B])) for the
    B requests of ``req``; ``base`` [3] (one vector) or a function req → [B, 3] (per request)."""
    base = DEFAULT_PARAMS["ranking"] if base is None else base

    def sample(rng: np.random.Generator, req):
        b = len(req.user)
        mean = np.asarray(base(req) if callable(base) else np.broadcast_to(base, (b, 3)), np.float32)
        w = (mean * np.exp(noise * rng.standard_normal((b, 3)))).astype(np.float32)
        return w, lognormal_density(w, mean, noise)

    return sample


def lognormal_density(w: np.ndarray, mean: np.ndarray, noise: float) -> np.ndarray:
    """The density of w = mean·exp(noise·ε), ε ~ N(0, I), at w [B, 3]: Π_k φ(ln(w_k/mean_k)/noise) / (noise·w_k)."""
    w = np.asarray(w, np.float64)
    eps = np.log(w / mean) / noise
    return np.prod(np.exp(-0.5 * eps**2) / (np.sqrt(2 * np.pi) * noise * w), axis=1).astype(np.float32)


def simulate_logs(
    env_config: dict,
    events_root: str,
    days: int = 3,
    users_per_day: int = 200,
    noise: float = 0.3,
    seed: int = 0,
    behaviour=None,
) -> dict:
    """Serve ``days`` of sessions with a behaviour policy and write their events. ``behaviour``:
    sample(rng, req) → (weights [B, 3], density [B]); default the log-normal one around the default
    weights with ``noise``."""
    world, pipeline = build_world(env_config)
    sink = ParquetSink(events_root, n_buckets=4)
    behaviour = behaviour or lognormal_behaviour(noise)
    rng = seed_sequence(seed, "logs")
    returners = np.array([], np.int64)
    n_events = n_sessions = 0
    for day in range(days):
        fresh = rng.choice(
            np.setdiff1d(np.arange(world.users.n), returners), max(users_per_day - len(returners), 0), replace=False
        )
        users = np.concatenate([returners, fresh])
        batches, served = [], {}

        def policy(world_, pipeline_, req, rng_, served=served):  # this day's dicts (bound, not looked up later)
            w, density = behaviour(rng, req)
            rec = pipeline_.recommend(req, {"ranking": w})
            served[req.request_id] = (w, density, rec.predictions, pipeline_.context(req))
            return rec.slate

        def observer(req, slate, resp, day=day, served=served, batches=batches):
            w, density, preds, context = served.pop(req.request_id)
            b, k = slate.shape
            rewards, _ = inner_rewards(pipeline.ctx, req.user, slate, resp)
            relevance = retrieval_relevance(pipeline.ctx, req.user, slate)
            offset = (req.user * 7919 % 21_600) * 10**6 + req.step.astype(np.int64) * 10 * 10**6
            start = SIMULATED_T0_US + day * DAY_US + offset
            for i in range(b):  # one RecordBatch per served slate (a log generator, not a hot path)
                batches.append(
                    slate_events(
                        request_uid=int(rng.integers(0, 2**63)),
                        ts_us=int(start[i]),
                        user_id=int(req.user[i]),
                        items=slate[i],
                        clicked=resp.clicked[i],
                        dwell_s=resp.dwell_s[i],
                        skipped=resp.skipped[i],
                        inner_reward=rewards[i],
                        predictions={n: v[i] for n, v in preds.items()},
                        relevance=relevance[i],
                        utility_weights=w[i],
                        propensity=float(density[i]),
                        purchased=resp.purchased[i],
                        revenue=resp.revenue[i],
                        context=context[i],
                    )
                )

        summary = run_sessions(world, pipeline, policy, len(users), seed + day, f"logs-day{day}", users, observer)
        table = pa.Table.from_batches(batches)
        sink.write(table)
        n_events += table.num_rows
        n_sessions += len(users)
        returners = users[summary.returned_mask]
    return {"days": days, "sessions": n_sessions, "events": n_events}
