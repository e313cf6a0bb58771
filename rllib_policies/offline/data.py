"""The fusion-ranking MDP (seed: RL in recommendation) and its logged datasets.

MDP (``rllib_policies.envs.SessionEnv`` is the same MDP online):
    state   s_t = the request context (``ObservationSpec.context``: user tower, history, cohort, step, clicks)
    action  a_t = the ranking utility weights (w_click, w_long_view, w_purchase) ∈ [0, a_max]
    reward  r_t = the served slate's inner reward (its relevance term: the retrieval towers' similarity)
    end     the session's end terminates; revenue and next-day return close later (trajectory rows)
    value   V(π) = E[Σ_t r_t] per session (γ = 1: sessions end, ~6 requests), measured on the simulator by
            ``true_value`` (the oracle's session loop, common random numbers)

Datasets, each served by a behaviour policy μ through the telemetry path (served-item events → ParquetSink →
``sessionise`` → trajectory rows → ``offline_rows``: one transition per request, RLlib's offline columns):
    exploratory  a ~ Uniform[0, a_max]³                                      the seed's "final buffer"
    concurrent   a = a_default·exp(0.3·ε)                                     limited exploration around the default
    imitation    a = expert(s)·exp(0.05·ε), expert = the oracle's best static  expert actions only
                 weights per cohort (floored at 2 % of their largest entry)
    misaligned   a = (0.05, 1, 0.05)·exp(0.3·ε)                               limited exploration around a
                 ranking tuned for long views: the logged behaviour sits far from the oracle (V 37.15 against
                 40.66 on the benchmark's 1 000 evaluation users; the long-views-only corner 36.66), so a learner
                 must leave it to gain
    misaligned_random  the misaligned ranking on 90 % of requests,   limited exploration plus a random-traffic
                 a ~ Uniform[0, a_max]³ on a 10 % random slice              slice: the logs hold better actions
ε ~ N(0, I); each row logs μ's density at its action (``action_logp``).

``policy_behaviour`` explores around a learned policy instead (a = π(s)·exp(0.3·ε), π floored): the online
exploration round of BCQ-EE, IQL-EE and CQL-EE (``rllib_policies.offline.experiment``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from scipy.spatial import cKDTree
from scipy.stats import chi2

from actors.cascade import Pipeline, build_world
from actors.stages import DEFAULT_PARAMS, RANKING_ACTION_HIGH
from actors.telemetry.sessionise import sessionise, sessionise_dataset
from actors.telemetry.sinks import read_parquet_events
from actors.world import seed_sequence
from actors.world.oracle import (
    Family,
    SessionObjective,
    head_means,
    ranking_grid,
    sample_states,
    session_headroom,
    simulate_policy_sessions,
    static_policy,
)
from rllib_policies import storage
from rllib_policies.ope.data import list_matrix
from rllib_policies.outer_controller.logs import lognormal_behaviour, lognormal_density, simulate_logs

DATASETS = ("exploratory", "concurrent", "imitation", "misaligned", "misaligned_random")
OBJECTIVE = SessionObjective({"inner_return": 1.0})  # V(π): the inner reward summed over the session
CONCURRENT_NOISE = 0.3
IMITATION_NOISE = 0.05
EXPERT_FLOOR = 0.02
MISALIGNED_WEIGHTS = np.array([0.05, 1.0, 0.05], np.float32)  # (w_click, w_long_view, w_purchase)
EXPLORATION_NOISE = 0.3
# the share of requests a random-traffic slice serves uniformly random weights (production logs often carry one
# for unbiased evaluation, as KuaiRand's random exposures do); fixed before any learner ran on it
RANDOM_SLICE = 0.1

# RLlib's offline columns (single agent), plus the behaviour's log-density and the session's KPIs
OFFLINE_SCHEMA = pa.schema(
    [
        ("eps_id", pa.string()),
        ("t", pa.int64()),
        ("obs", pa.list_(pa.float32())),
        ("actions", pa.list_(pa.float32())),
        ("rewards", pa.float32()),
        ("new_obs", pa.list_(pa.float32())),
        ("terminateds", pa.bool_()),
        ("truncateds", pa.bool_()),
        ("action_logp", pa.float32()),
    ]
)


# the datasets whose behaviour is a log-normal jitter noise·ε around one static vector: kind → (vector, noise)
LOGNORMAL_BEHAVIOURS = {
    "concurrent": (DEFAULT_PARAMS["ranking"], CONCURRENT_NOISE),
    "misaligned": (MISALIGNED_WEIGHTS, CONCURRENT_NOISE),
}


def uniform_behaviour(high: np.ndarray = RANKING_ACTION_HIGH):
    """a ~ Uniform[0, high]: sample(rng, req) → (weights [B, 3], density [B] = 1 / Π high)."""
    high = np.asarray(high, np.float32)

    def sample(rng: np.random.Generator, req):
        b = len(req.user)
        return (rng.random((b, len(high))) * high).astype(np.float32), np.full(b, 1 / high.prod(), np.float32)

    return sample


def random_slice_behaviour(centre: np.ndarray, noise: float, share: float = RANDOM_SLICE):
    """μ = (1 − share)·LogNormal(centre, noise) + share·Uniform[0, a_max]: a ranking served with a random-traffic
    slice. sample(rng, req) → (weights [B, 3], the mixture's density [B] at them; the uniform part's is 0 outside
    the box, where a log-normal draw can land)."""
    lognormal, uniform = lognormal_behaviour(noise, centre), uniform_behaviour()

    def sample(rng: np.random.Generator, req):
        jittered, _ = lognormal(rng, req)
        random, uniform_density = uniform(rng, req)
        w = np.where((rng.random(len(jittered)) < share)[:, None], np.maximum(random, 1e-6), jittered)
        in_box = np.all(w <= RANKING_ACTION_HIGH, axis=1)
        around_centre = lognormal_density(w, np.asarray(centre, np.float32), noise)
        density = (1 - share) * around_centre + share * uniform_density * in_box
        return w, density.astype(np.float32)

    return sample


def two_mode_behaviour(first: np.ndarray, second: np.ndarray, noise: float = IMITATION_NOISE):
    """Each user served one of two rankings by a coin the state does not show (the user id's parity: even users
    ``first``), jittered log-normally by ``noise``: the learning tests' logs that hold a better and a worse action.
    sample(rng, req) → (weights [B, 3], density [B])."""
    first, second = np.asarray(first, np.float32), np.asarray(second, np.float32)
    return lognormal_behaviour(noise, lambda req: np.where((req.user % 2 == 0)[:, None], first, second))


@dataclass(frozen=True)
class Expert:
    """The oracle's best static ranking weights per cohort for V (``session_headroom`` over a simplex grid)."""

    cohort_weights: np.ndarray  # [n_cohorts, 3]
    static_weights: np.ndarray  # [3]: the best single vector for everyone

    def __call__(self, pipeline: Pipeline):
        """expert(req) → weights [B, 3] of each request's cohort."""
        cohort = pipeline.world.users.cohort
        return lambda req: self.cohort_weights[cohort[req.user]]


def oracle_expert(pipeline: Pipeline, resolution: int = 4, n_sessions: int = 300, seed: int = 0) -> Expert:
    """The best static and per-cohort weights for V on a resolution-``resolution`` simplex grid of the heads'
    contribution shares plus the default weights (``actors.world.oracle``), floored at ``EXPERT_FLOOR`` of each
    vector's largest entry so a log-normal jitter around them has a density everywhere."""
    scale = head_means(pipeline, sample_states(pipeline, 200, 2, seed=seed))
    family, _ = Family.ranking(ranking_grid(resolution, scale)).with_action(DEFAULT_PARAMS["ranking"])
    h = session_headroom(pipeline, family, OBJECTIVE, n_sessions, seed)
    grid = family.stage_grid("ranking")

    def floored(w):
        w = np.asarray(w, np.float32)
        return np.maximum(w, EXPERT_FLOOR * w.max())

    cohorts = np.stack([floored(grid[a]) for a in h.cohort_actions.values()])
    return Expert(cohorts, floored(grid[h.static_action]))


def behaviour(kind: str, pipeline: Pipeline, expert: Expert | None = None):
    """The behaviour policy μ of dataset ``kind`` (module docstring): sample(rng, req) → (weights, density)."""
    if kind == "exploratory":
        return uniform_behaviour()
    if kind in LOGNORMAL_BEHAVIOURS:
        centre, noise = LOGNORMAL_BEHAVIOURS[kind]
        return lognormal_behaviour(noise, centre)
    if kind == "misaligned_random":
        return random_slice_behaviour(*LOGNORMAL_BEHAVIOURS["misaligned"])
    if kind == "imitation":
        if expert is None:
            raise ValueError("the imitation dataset needs the oracle's expert (oracle_expert)")
        return lognormal_behaviour(IMITATION_NOISE, expert(pipeline))
    raise ValueError(f"unknown dataset {kind!r}; choose from {DATASETS}")


def policy_behaviour(policy, pipeline: Pipeline, noise: float = EXPLORATION_NOISE):
    """Exploration around ``policy(obs [B, d]) → weights [B, 3]``: a = max(π(s), f)·exp(noise·ε), the floor f =
    2 % of π(s)'s largest entry, and at least 2 % of the box's smallest bound (so the log-normal has a density
    where π puts a weight, or all of them, at 0)."""
    least = EXPERT_FLOOR * float(RANKING_ACTION_HIGH.min())

    def centre(req):
        w = np.asarray(policy(pipeline.context(req)), np.float32)
        return np.maximum(w, np.maximum(EXPERT_FLOOR * w.max(1, keepdims=True), least))

    return lognormal_behaviour(noise, centre)


def offline_rows(trajectories: pa.Table) -> pa.Table:
    """Trajectory rows (``actors.telemetry`` TRAJECTORY_SCHEMA, with logged observations) → one transition
    per request in RLlib's offline columns (``OFFLINE_SCHEMA``): the last step of a session is terminated
    and its ``new_obs`` repeats its ``obs`` (never bootstrapped). Rows whose observations were not logged, or
    windows that do not hold a whole session, are errors naming the session."""
    cols = {name: [] for name in OFFLINE_SCHEMA.names}
    for row in trajectories.select(
        ["session_id", "first_step", "n_steps", "session_steps", "observations", "actions", "rewards", "propensities"]
    ).to_pylist():
        sid, n = row["session_id"], row["n_steps"]
        if row["first_step"] != 0 or n != row["session_steps"]:
            raise ValueError(
                f"session {sid}: window of steps {row['first_step']}..{row['first_step'] + n} of "
                f"{row['session_steps']}; offline rows need whole sessions (raise the sessioniser's max_steps)"
            )
        obs = row["observations"]
        if obs is None or any(o is None for o in obs):
            raise ValueError(f"session {sid}: observations not logged (serve with context logging on)")
        cols["eps_id"] += [sid] * n
        cols["t"] += list(range(n))
        cols["obs"] += obs
        cols["new_obs"] += obs[1:] + obs[-1:]
        cols["actions"] += row["actions"]
        cols["rewards"] += row["rewards"]
        cols["terminateds"] += [False] * (n - 1) + [True]
        cols["truncateds"] += [False] * n
        cols["action_logp"] += np.log(np.maximum(np.asarray(row["propensities"], np.float64), 1e-30)).tolist()
    return pa.table(cols, schema=OFFLINE_SCHEMA)


def write_dataset(
    kind: str,
    env_config: dict,
    out_dir: str,
    days: int = 2,
    users_per_day: int = 500,
    seed: int = 0,
    expert: Expert | None = None,
    engine: str = "local",
    sample=None,
) -> dict:
    """Serve ``days`` × ``users_per_day`` sessions with dataset ``kind``'s behaviour policy (or ``sample(rng, req) →
    (weights, density)``, e.g. ``policy_behaviour``), log their events
    through the telemetry sink (``<out_dir>/events``), sessionise them (``<out_dir>/trajectories.parquet``) and
    write the transitions (``<out_dir>/rows.parquet``).

    ``engine``: "local" runs the sessioniser's pure function on the sink's events in this process; "ray" runs
    its Ray Data job (``sessionise_dataset``, the same function per user partition; the benchmark's datasets
    were written so). Measured: inside a test session's Ray (4 CPUs, Serve's settings) the Ray Data job's
    hash shuffle waited forever; a job on a cluster wants "ray" for logs that outgrow one process."""
    _, pipeline = build_world(env_config)
    events = os.path.join(out_dir, "events")
    sample = sample or behaviour(kind, pipeline, expert)
    logged = simulate_logs(env_config, events, days, users_per_day, seed=seed, behaviour=sample)
    if engine == "ray":
        refs = sessionise_dataset(events, os.path.join(out_dir, "trajectories")).to_arrow_refs()
        table = pa.concat_tables([t for t in ray.get(refs) if t.num_rows])
    elif engine == "local":
        table = sessionise(read_parquet_events(events))
        pq.write_table(table, os.path.join(out_dir, "trajectories.parquet"))
    else:
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    rows = offline_rows(table)
    path = os.path.join(out_dir, "rows.parquet")
    pq.write_table(rows, path)
    return {**logged, "dataset": kind, "transitions": rows.num_rows, "path": path}


def read_rows(path: str) -> dict[str, np.ndarray]:
    """A dataset's transitions (a Parquet file or folder, local or a storage URI) as NumPy columns (obs [N, d],
    actions [N, 3], rewards [N], new_obs, terminateds, eps_id, t, action_logp). Read on the caller with pyarrow:
    every row ends up here anyway, and a Ray Data read of the same file costs seconds of start-up."""
    table = storage.read_parquet(path)
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):  # equal-length float lists (obs, actions): one reshape, no Python per row
            out[name] = list_matrix(col, name, np.float32)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


class ActionSupport:
    """Where the logs hold actions: ranking weights are in it when within ``radius`` (unit-cube max-norm, a/a_max)
    of some logged action [N, 3] (scipy's k-d tree over the logged actions)."""

    def __init__(self, logged: np.ndarray, radius: float = 0.1):
        self.radius = radius
        self._tree = cKDTree(np.asarray(logged, np.float64).reshape(-1, 3) / RANKING_ACTION_HIGH)

    def contains(self, weights: np.ndarray) -> np.ndarray:
        """[B] bool: which of the ranking weights [B, 3] lie in the support."""
        a = np.asarray(weights, np.float64).reshape(-1, 3) / RANKING_ACTION_HIGH
        distance, _ = self._tree.query(a, p=np.inf, distance_upper_bound=self.radius)
        return np.isfinite(distance)


def support_fraction(weights: np.ndarray, logged: np.ndarray, radius: float = 0.1) -> float:
    """The share of policy actions [B, 3] within ``radius`` (unit-cube max-norm) of some logged action [N, 3]."""
    return float(ActionSupport(logged, radius).contains(weights).mean())


# ---------------------------------------------------------------------------------------------- ground truth
def eval_users(pipeline: Pipeline, n: int = 400, seed: int = 7) -> np.ndarray:
    """The fixed evaluation users every policy's true value is measured on."""
    return seed_sequence(seed, "offline-eval-users").integers(0, pipeline.world.users.n, n)


def true_value(pipeline: Pipeline, policy, users: np.ndarray, seed: int = 7) -> np.ndarray:
    """V(π) per session [n]: Σ_t r_t of whole simulated sessions of ``users`` served by ``policy(obs [B, d]) →
    weights [B, 3]`` (or one static weight vector [3]), common random numbers (``simulate_policy_sessions``)."""
    if callable(policy):
        served = lambda req: {"ranking": np.asarray(policy(pipeline.context(req)), np.float32)}  # noqa: E731
    else:
        served = static_policy("ranking", policy)
    return simulate_policy_sessions(pipeline, served, users, seed)["inner_return"]


@dataclass(frozen=True)
class SupportCeiling:
    """The best static weights inside the behaviour's highest-density region, and their value."""

    weights: np.ndarray  # [3]
    value: np.ndarray  # V per evaluation session [n]
    level: float  # the region's probability under the behaviour
    radius: float  # its radius in units of the behaviour's noise σ: √χ²₃(level)


def support_ceiling(
    kind: str,
    pipeline: Pipeline,
    users: np.ndarray,
    seed: int = 7,
    level: float = 0.95,
    n_angles: int = 24,
    n_radii: int = 3,
) -> SupportCeiling:
    """The best static vector w = w₀·exp(δ) with ‖δ‖ ≤ σ·√χ²₃(level): the best the behaviour's ``level``
    highest-density region holds (dataset ``kind``: w₀·exp(σ·ε), ε ∈ ℝ³).

    Ranking by Σ w·p is invariant to scaling w, i.e. to δ along (1, 1, 1), so only δ's part in the plane ⊥ (1, 1, 1)
    matters and the shortest δ of each ranking lies there: the search is a polar grid in that plane (``n_angles``
    directions × ``n_radii`` radii out to the edge, plus w₀), each point's V on ``users`` with common random
    numbers. Three choices to read it by: the region is the 3-D one (its projection on the plane, radius 2.80σ at
    95 %, holds 98 % of the logged rankings; the 2-D 95 % disk would be 2.45σ); the best of the grid is reported on
    the sessions it was picked on (biased up, a little: neighbouring points differ smoothly under common random
    numbers); and it is static, not per state. It measures what a learner that keeps near the logged actions can
    gain; BCQ's perturbation, TD3's extrapolation and online exploration are not bound by it."""
    if kind not in LOGNORMAL_BEHAVIOURS:
        raise ValueError(f"dataset {kind!r}: no log-normal behaviour around one vector ({tuple(LOGNORMAL_BEHAVIOURS)})")
    centre, noise = LOGNORMAL_BEHAVIOURS[kind]
    radius = float(np.sqrt(chi2.ppf(level, 3)))
    basis = np.linalg.qr(np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]).T)[0][:, 1:]  # ⊥ (1, 1, 1)
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    radii = radius * noise * np.arange(1, n_radii + 1) / n_radii
    deltas = [np.zeros(3)] + [r * basis @ [np.cos(a), np.sin(a)] for r in radii for a in angles]
    best = None
    for delta in deltas:
        w = (np.asarray(centre, np.float64) * np.exp(delta)).astype(np.float32)
        v = true_value(pipeline, w, users, seed)
        if best is None or v.mean() > best[1].mean():
            best = (w, v)
    return SupportCeiling(best[0], best[1], level, radius)


def behaviour_value(
    kind: str, pipeline: Pipeline, users: np.ndarray, expert: Expert | None = None, seed: int = 7
) -> np.ndarray:
    """V(μ) per session [n] of dataset ``kind``'s (stochastic) behaviour policy on ``users`` (its draws seeded)."""
    sample, rng = behaviour(kind, pipeline, expert), seed_sequence(seed, "behaviour-value", kind)
    served = lambda req: {"ranking": sample(rng, req)[0]}  # noqa: E731
    return simulate_policy_sessions(pipeline, served, users, seed)["inner_return"]
