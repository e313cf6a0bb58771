"""BC, CQL and IQL as RLlib ships them (configured, not rewritten), on the same logged datasets.

RLlib reads the transitions itself (``config.offline_data``: Ray Data, its OfflinePreLearner). Two things
differ from our own learners, both measured on Ray 2.60 (docs/offline_rl.md):

- CQL's and IQL's policies are tanh-squashed Gaussians whose bounds are fixed at [−1, 1] (the action space's
  bounds never reach the distribution), so they train on a copy of the rows with actions mapped to
  u = 2·a/a_max − 1 (kept 10⁻³ inside the edges; ``action_scale="log"``: a log-scaled box, ``to_unit``) under
  ``Box(−1, 1)``, and serve the mean m mapped back, a = a_max·(tanh(m) + 1)/2 (or, with ``selection_samples``,
  their critic's pick among the mean and samples of the policy). BC (a plain Gaussian) trains on the same copy and
  serves a_max·(clip(m, −1, 1) + 1)/2.
- Offline RLlib algorithms have no env runners: the trained module is the local learner's
  (``num_learners=0``), and CQL must be told it is offline (``_is_online = False``), else it builds an env.

    algo = ShippedOffline("cql", rows_path, observation_dim=37, seed=0)
    algo.train(); algo.policy_weights(obs); algo.q_estimate(initial_obs); algo.stop()
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.rllib.algorithms.bc import BCConfig
from ray.rllib.algorithms.cql import CQLConfig
from ray.rllib.algorithms.iql import IQLConfig
from ray.rllib.core import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.utils.schedules.scheduler import Scheduler

from actors.stages import RANKING_ACTION_HIGH

from .common import check_window, is_int
from .data import ActionSupport
from .gate import Sessions

SHIPPED = ("bc", "cql", "iql")
EDGE = 1e-3  # unit actions stay this far inside ±1 (atanh of ±1 is infinite)
ACTION_SCALES = ("linear", "log")
LOG_FLOOR = 1e-4  # the log box's lower edge, as a share of a_max
IQL_BETA = 3.0  # IQL's inverse temperature in the paper (Kostrikov et al. 2022, MuJoCo), on normalised rewards
IQL_RETURN_SPAN = 1000.0  # the paper's normalisation: rewards × 1000 / (max − min episode return)
SELECTION_CHUNK = 4096  # (state, action) rows per pass of the critics (``q_values``): activations that stay in cache


def check_scale(scale: str) -> str:
    """``scale`` if it is one of ``ACTION_SCALES``, else a ValueError naming the option."""
    if scale not in ACTION_SCALES:
        raise ValueError(f"action_scale must be one of {ACTION_SCALES}, got {scale!r}")
    return scale


def to_unit(actions: np.ndarray, scale: str = "linear") -> np.ndarray:
    """Ranking weights a ∈ [0, a_max]³ → the unit box u ∈ [−1 + ε, 1 − ε]³ the shipped learners act in.

    linear: u = 2·a/a_max − 1. log: u = 2·log(a/f)/log(a_max/f) − 1 with the floor f = ``LOG_FLOOR``·a_max (weights
    below it map to the lower edge): a weight's effect on the ranking is relative, and a log-normal behaviour around
    small weights, which the linear box puts against its edge, sits inside the log box with the same spread
    wherever it is centred."""
    a = np.asarray(actions, np.float64)
    if check_scale(scale) == "linear":
        unit = 2 * a / RANKING_ACTION_HIGH - 1
    else:
        floor = LOG_FLOOR * RANKING_ACTION_HIGH
        unit = 2 * np.log(np.maximum(a, floor) / floor) / np.log(1 / LOG_FLOOR) - 1
    return np.clip(unit, -1 + EDGE, 1 - EDGE).astype(np.float32)


def to_weights(unit: np.ndarray, scale: str = "linear") -> np.ndarray:
    """u ∈ [−1, 1]³ → ranking weights, the inverse of ``to_unit`` (log: u = −1 is the floor f, not 0)."""
    u = np.clip(np.asarray(unit, np.float64), -1, 1)
    if check_scale(scale) == "linear":
        return (RANKING_ACTION_HIGH * (u + 1) / 2).astype(np.float32)
    return (LOG_FLOOR * RANKING_ACTION_HIGH * np.exp((u + 1) / 2 * np.log(1 / LOG_FLOOR))).astype(np.float32)


def unit_rows(path: str, scale: str = "linear") -> str:
    """A copy of the rows at ``path`` with their actions in the unit box (``to_unit``; written once, beside it)."""
    out = os.path.splitext(path)[0] + ("_unit.parquet" if scale == "linear" else f"_unit_{scale}.parquet")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(path):
        return out
    table = pq.read_table(path)
    unit = to_unit(np.asarray(table.column("actions").to_pylist(), np.float32), scale)
    column = pa.array(unit.tolist(), pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("actions"), "actions", column)
    tmp = f"{out}.{os.getpid()}.tmp"  # one per writer: runs in parallel processes may convert the same rows
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


class IQLTemperatureConfig(IQLConfig):
    """RLlib's IQL config with its temperature ``beta`` allowed above 1.

    IQL inherits MARWIL's check that ``beta`` ∈ [0, 1] (ray-project/ray#64954, fix pending in #65895), though its
    learner reads ``beta`` as the inverse temperature of exp(beta · A), which the paper sets to 3 on its reward
    scale. Both checks run on beta capped at 1, which leaves IQL's own (beta > 0) exact."""

    def validate(self) -> None:
        beta, self.beta = self.beta, min(self.beta, 1.0)
        try:
            super().validate()
        finally:
            self.beta = beta


def check_selection(name: str, samples: int) -> int:
    """``samples`` if it is a count ≥ 0 that learner ``name`` can serve (CQL and IQL: a critic to select with)."""
    check_count("selection_samples", samples)
    if samples and name not in ("cql", "iql"):
        raise ValueError(f"selection_samples: {name} has no critic to select with (CQL and IQL have)")
    return samples


def check_positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    """``value`` (None: not given) a finite number > 0 (≥ 0 with ``allow_zero``), else a ValueError naming ``key``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        ok = False
    else:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{key} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_count(key: str, value: int, minimum: int = 0) -> int:
    """``value`` if it is an integer ≥ ``minimum``, else a ValueError naming ``key``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def iql_temperature(rows_path: str, beta: float = IQL_BETA) -> float:
    """IQL's advantage temperature on the rewards as logged: temperature = β · 1000 / (R_max − R_min).

    RLlib's IQL weights each logged action's log-likelihood by exp(temperature · A(s, a)) on the raw rewards (its
    default temperature, ``beta`` 0.1, is a constant). The paper's β = 3 applies to rewards rescaled by
    1000 / (R_max − R_min), R over the dataset's episodes; A scales with the rewards, so the same weighting on
    the raw rewards is the temperature above (about 10 on our session logs, where 0.1 weights every logged
    action alike and IQL reproduces the behaviour)."""
    table = pq.read_table(rows_path, columns=["eps_id", "t", "rewards"])
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    returns = Sessions.of(rows).padded(rows["rewards"].astype(np.float64)).sum(1)
    span = float(returns.max() - returns.min())
    if not span > 0:
        raise ValueError(f"{rows_path}: every episode has the same return ({returns.max():g}); IQL has no advantage")
    return beta * IQL_RETURN_SPAN / span


def polyak_per_call(tau: float, steps: int) -> float:
    """The Polyak rate for one target update after ``steps`` gradient steps that moves the target as far as
    ``steps`` updates at rate ``tau`` would toward a steady online network: 1 − (1 − τ)^steps.

    RLlib's learners update target networks in ``after_gradient_based_update``, once per ``update`` call, however
    many minibatches the call trains on (``dataset_num_iters_per_learner`` offline). Given τ 0.02 unchanged, the
    targets of a CQL run of 8 × 100 steps moved 1 − 0.98⁸ = 15 % of the way: its Q bootstrapped from a nearly
    untrained target, ~7 per session against a true ~37."""
    if not 0 < tau <= 1 or steps < 1:
        raise ValueError(f"need 0 < tau <= 1 and steps >= 1, got tau={tau}, steps={steps}")
    return 1 - (1 - tau) ** steps


def check_shipped(
    name: str,
    *,
    action_scale: str = "linear",
    selection_samples: int = 0,
    beta: float | None = None,
    min_q_weight: float | None = None,
    actor_lr: float | None = None,
    initial_alpha: float | None = None,
    target_entropy: float | None = None,
    tau: float = 0.02,
    num_actions: int = 10,
    bc_steps: int = 0,
    bc_actor_lr: float | None = None,
    **_: object,
) -> dict:
    """``shipped_config``'s options for learner ``name`` checked (a ValueError naming the option), before anything
    is read or built; returns the CQL-only ones that were given (the CQL config's keywords). RLlib's configs take
    any value, so every bound is checked here."""
    check_scale(action_scale)
    check_selection(name, selection_samples)
    rates = ("beta", beta), ("actor_lr", actor_lr), ("bc_actor_lr", bc_actor_lr), ("initial_alpha", initial_alpha)
    for key, value in (*rates, ("tau", tau)):
        check_positive(key, value)
    check_positive("min_q_weight", min_q_weight, allow_zero=True)  # 0: CQL's penalty off
    if tau > 1:
        raise ValueError(f"tau must be a Polyak rate in (0, 1], got {tau!r}")
    check_count("num_actions", num_actions, 1)
    check_count("bc_steps", bc_steps)
    # RLlib's Algorithm rebuilds its config from get_state(), which drops every attribute equal to −1 (its
    # DEPRECATED_VALUE): the options above are > 0 or ≥ 0; target_entropy may be negative
    if target_entropy is not None and not isinstance(target_entropy, str) and target_entropy == -1:
        raise ValueError(
            "target_entropy -1 would train at RLlib's default: its config drops every value equal to -1 "
            "(DEPRECATED_VALUE) when the algorithm is built; give e.g. -1.01"
        )
    if beta is not None and name != "iql":
        raise ValueError(f"beta is IQL's advantage temperature; {name} has none")
    cql_only = dict(
        min_q_weight=min_q_weight, actor_lr=actor_lr, initial_alpha=initial_alpha, target_entropy=target_entropy
    )
    cql_only = {k: v for k, v in cql_only.items() if v is not None}
    cloning = {k: v for k, v in (("bc_steps", bc_steps), ("bc_actor_lr", bc_actor_lr)) if v}
    if (cql_only or cloning) and name != "cql":
        raise ValueError(f"{', '.join([*cql_only, *cloning])}: CQL's; {name} has none")
    if bc_actor_lr is not None and not bc_steps:
        raise ValueError("bc_actor_lr is the actor's rate while it clones the logs: it needs bc_steps > 0")
    return cql_only


def shipped_config(
    name: str,
    rows_path: str | list[str],
    observation_dim: int,
    seed: int = 0,
    updates_per_iteration: int = 200,
    batch_size: int = 256,
    gamma: float = 1.0,
    hidden: tuple[int, ...] = (128, 128),
    tau: float = 0.02,
    num_actions: int = 10,
    beta: float | None = None,
    action_scale: str = "linear",
    min_q_weight: float | None = None,
    actor_lr: float | None = None,
    initial_alpha: float | None = None,
    target_entropy: float | None = None,
    selection_samples: int = 0,
    bc_steps: int = 0,
    bc_actor_lr: float | None = None,
):
    """The RLlib config of ``name`` ∈ {"bc", "cql", "iql"} on the unit-action copy of ``rows_path`` (one file of
    rows, or several: the logs first, then what was added to them).

    CQL: Polyak rate ``tau`` per gradient step as our learners'. RLlib updates target networks once per
    ``update`` call, here once per ``train()`` of ``updates_per_iteration`` steps (at least 2), so the rate it is
    given is ``polyak_per_call`` for those steps; ``bc_iters=0``: RLlib 2.60's CQL learner counts its
    behaviour-cloning steps in a metric summed since its last reduce, i.e. within one ``train()`` call, so its
    default of 20 000 would clone the logs in every call and never run SAC's actor (and no value is a warm start:
    below the steps per call it clones at the start of each call); ``lr=None`` (it has actor/critic/alpha rates
    of its own);
    ``num_actions`` sampled actions per state in its penalty; ``min_q_weight`` its penalty's weight (RLlib's
    default 5); ``actor_lr``, ``initial_alpha`` and ``target_entropy`` its SAC actor's (RLlib's 1e-4, 1.0 and
    −dim A). IQL: ``beta``, its advantage temperature on the raw rewards (default: ``iql_temperature``, the
    paper's β on the paper's reward scale); its targets are RLlib's default, a full copy per call. Every learner
    gets ``updates_per_iteration`` minibatches of ``batch_size`` per ``train()``; the mapped data are materialised
    once (IQL's default re-runs its pre-learner every iteration). ``action_scale``: the unit box's scale
    (``to_unit``). ``selection_samples``: how CQL's and IQL's policy is served (``ShippedOffline``), not trained;
    ``bc_steps``: CQL's actor clones the logs for its first steps, at the rate ``bc_actor_lr`` (default
    ``actor_lr``; ``ShippedOffline.train``); these checked here with the rest.
    """
    cql_only = check_shipped(
        name,
        action_scale=action_scale,
        selection_samples=selection_samples,
        beta=beta,
        min_q_weight=min_q_weight,
        actor_lr=actor_lr,
        initial_alpha=initial_alpha,
        target_entropy=target_entropy,
        tau=tau,
        num_actions=num_actions,
        bc_steps=bc_steps,
        bc_actor_lr=bc_actor_lr,
    )
    paths = [rows_path] if isinstance(rows_path, str) else list(rows_path)
    steps = max(int(updates_per_iteration), 2)  # 1 breaks CQL's local learner
    if name == "bc":
        config = BCConfig().training(train_batch_size_per_learner=batch_size, lr=1e-3)
    elif name == "cql":
        config = CQLConfig().training(
            train_batch_size_per_learner=batch_size,
            gamma=gamma,
            lr=None,
            tau=polyak_per_call(tau, steps),
            bc_iters=0,
            num_actions=num_actions,
            num_steps_sampled_before_learning_starts=0,
            **cql_only,
        )
    elif name == "iql":
        config = IQLTemperatureConfig().training(
            train_batch_size_per_learner=batch_size,
            gamma=gamma,
            beta=iql_temperature(paths[0]) if beta is None else beta,
        )
    else:
        raise ValueError(f"unknown shipped offline learner {name!r}; choose from {SHIPPED}")
    config = (
        config.environment(
            observation_space=gym.spaces.Box(-np.inf, np.inf, (observation_dim,), np.float32),
            action_space=gym.spaces.Box(-1.0, 1.0, (len(RANKING_ACTION_HIGH),), np.float32),
        )
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        # RLlib's catalog: an encoder (fcnet_hiddens, the last width its output) then a head: widths (h1, h2)
        # give the same MLP as ours, (s[, a]) → h1 → h2 → out
        .rl_module(model_config={"fcnet_hiddens": [hidden[0]], "head_fcnet_hiddens": list(hidden[1:])})
        .offline_data(
            input_=[unit_rows(path, action_scale) for path in paths],
            dataset_num_iters_per_learner=steps,
            # fractional CPUs: with whole ones the pre-learner actor starves the read tasks on a 1–2 CPU Ray (hangs)
            input_read_method_kwargs={"num_cpus": 0.25},
            map_batches_kwargs={"concurrency": 1, "num_cpus": 0.25},
            iter_batches_kwargs={"prefetch_batches": 1},
            materialize_data=False,
            materialize_mapped_data=True,
        )
        .reporting(min_time_s_per_iteration=0, min_train_timesteps_per_iteration=0)
        .debugging(seed=seed, log_level="ERROR")
    )
    if name == "cql":
        config._is_online = False  # CQL's config builds an env otherwise ("config.env is not provided")
    # RLlib reads the row files in parallel Ray Data tasks, whose blocks arrive in whatever order they finish: with two
    # or more files (an -EE learner's window) the minibatch stream, and so the training, differed from run to run
    # (a probe of IQL-EE's CI test: 23.24 and 23.44 in two runs; with the order kept 23.44 twice). Ray Data's
    # process-wide context keeps the order instead.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return config


class ShippedOffline:
    """One of RLlib's offline learners behind the interface our own offline learners have."""

    def __init__(self, name: str, rows_path: str, observation_dim: int, seed: int = 0, **options):
        config = shipped_config(name, rows_path, observation_dim, seed, **options)
        if name == "iql":  # the logs' temperature, kept when rows are added
            options = {**options, "beta": config.beta}
        self._hold(name, config.build_algo(), options)
        self._build = {"paths": [rows_path], "observation_dim": observation_dim, "seed": seed, "options": options}

    @classmethod
    def wrap(cls, name: str, algo, **options) -> ShippedOffline:
        """The interface around an already built (or restored) RLlib algorithm of learner ``name``, trained with
        ``shipped_config``'s ``options``."""
        check_shipped(name, **options)
        self = cls.__new__(cls)
        self._hold(name, algo, options)
        return self

    def _hold(self, name: str, algo, options: dict) -> None:
        """What serving and training need of the (checked) options: the unit box's ``action_scale``,
        ``selection_samples`` and CQL's ``bc_steps`` and ``bc_actor_lr``."""
        self.name, self.algo, self.action_scale = name, algo, options.get("action_scale", "linear")
        self.selection_samples = options.get("selection_samples", 0)
        self.bc_steps, self.bc_actor_lr = options.get("bc_steps", 0), options.get("bc_actor_lr")
        self._build, self._added, self._support = None, None, None

    def add_rows(self, path: str, window: int | None = None) -> int:
        """Grows the dataset by the rows at ``path`` (an online exploration round's logs, copied: the round's folder
        may go). RLlib's offline data are fixed when an algorithm is built, so the algorithm is rebuilt on the rows
        (``window``: the last ``window`` row sets, the logs the first; None: all of them) and handed the learner's
        state: networks and their targets, optimisers, and CQL's entropy weight α (which SAC's learner holds outside
        both). The rebuild seeds torch, NumPy and ``random`` with the config's seed again, as every build does, so
        each round's sampling noise and minibatch order restart from that seed. Returns the number of rows it trains
        on."""
        if self._build is None:
            raise ValueError(f"{self.name}: a wrapped algorithm has no build arguments to grow its dataset with")
        check_window(window)
        if self._added is None:
            self._added = tempfile.TemporaryDirectory(prefix=f"{self.name}-added-")
        copy = os.path.join(self._added.name, f"rows_{len(self._build['paths'])}.parquet")
        shutil.copyfile(path, copy)
        self._build["paths"].append(copy)
        b = self._build
        paths = b["paths"] if window is None else b["paths"][-window:]
        algo = shipped_config(self.name, paths, b["observation_dim"], b["seed"], **b["options"]).build_algo()
        old, new = self.algo.learner_group._learner, algo.learner_group._learner
        new.set_state(old.get_state(components=[COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER]))
        for module_id, log_alpha in getattr(old, "curr_log_alpha", {}).items():
            new.curr_log_alpha[module_id].data.copy_(log_alpha.data)
        algo._iteration = self.algo.iteration  # a checkpoint of the rebuilt algorithm counts on from here
        self.algo.stop()
        self.algo, self._support = algo, None
        return sum(pq.read_metadata(p).num_rows for p in paths)

    @property
    def module(self):
        return self.algo.learner_group._learner.module[DEFAULT_MODULE_ID]

    @property
    def steps_per_call(self) -> int:
        return self.algo.config.dataset_num_iters_per_learner

    @property
    def steps(self) -> int:
        """Gradient steps trained: RLlib's iteration count (checkpointed with the algorithm, carried over by
        ``add_rows``' rebuild) times the steps per call."""
        return self.algo.iteration * self.steps_per_call

    def clone_logs(self, on: bool) -> None:
        """Switch CQL's actor loss between cloning the logs (on) and SAC's. RLlib 2.60's CQL learner counts its
        ``bc_iters`` in a metric summed since its last reduce, i.e. within one ``train()`` call, so no config value
        is the paper's warm start; the learner's (frozen) config is set here instead: above a call's steps it clones
        throughout, 0 runs SAC. The actor's optimiser runs at ``bc_actor_lr`` while cloning (when given) and at
        ``actor_lr`` otherwise, set before each call: RLlib resets an optimiser's rate from its registered scheduler
        after each update call (one per ``train()``), and a restored optimiser state brings the rate it was saved
        at, so both the rate and the scheduler are replaced."""
        if self.name != "cql":
            raise ValueError(f"clone_logs: CQL's actor loss; {self.name} has none to switch")
        learner = self.algo.learner_group._learner
        object.__setattr__(learner.config, "bc_iters", 10**9 if on else 0)
        rate = self.bc_actor_lr if on and self.bc_actor_lr is not None else learner.config.actor_lr
        optimizer = learner.get_optimizer(DEFAULT_MODULE_ID, "policy")
        learner._optimizer_lr_schedules[optimizer] = Scheduler(rate, framework="torch", device=learner._device)
        learner._set_optimizer_lr(optimizer, rate)

    def before_call(self) -> None:
        """With ``bc_steps``, CQL's actor clones the logs in every ``train()`` call that starts before that many steps
        (the CQL paper's warm start, in whole calls); the offline job runs this before each of its calls."""
        if self.name == "cql" and self.bc_steps:
            self.clone_logs(self.steps < self.bc_steps)

    def train(self) -> dict:
        """One ``train()`` call of ``steps_per_call`` gradient steps (after ``before_call``)."""
        self.before_call()
        return self.algo.train()

    @torch.no_grad()
    def _unit_action(self, obs: np.ndarray) -> torch.Tensor:
        """The served action in the unit box [B, 3]: the distribution's mean, or with ``selection_samples`` N > 0
        the critic's pick among that mean and N actions sampled from the policy (``_select``)."""
        obs = torch.as_tensor(obs, dtype=torch.float32)
        inputs = self.module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        mean = inputs.chunk(2, dim=-1)[0]
        if self.name == "bc":
            return mean
        if not self.selection_samples:
            return torch.tanh(mean)
        return self._select(obs, inputs)

    @property
    def support(self) -> ActionSupport:
        """The support of the actions it trains on (its unit rows, mapped back to weights)."""
        if self._support is None:
            paths = self.algo.config.input_
            paths = [paths] if isinstance(paths, str) else list(paths)
            if missing := [p for p in paths if not os.path.exists(p)]:
                raise FileNotFoundError(f"{self.name}: selection_samples needs the rows it trained on; gone: {missing}")
            unit = np.concatenate([np.stack(pq.read_table(p, columns=["actions"])[0].to_numpy(False)) for p in paths])
            self._support = ActionSupport(to_weights(unit, self.action_scale))
        return self._support

    def _select(self, obs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """argmax min(Q1, Q2)(s, a) over a ∈ {tanh(μ(s)), a_1..a_N} within the logs' support, a_i ~ π(·|s) — IDQL's
        extraction (Hansen-Estruch et al. 2023: sample a behaviour model, let the critic choose) on the policy's own
        samples; the mean where none is in the support.

        IDQL's behaviour model is generative, its samples logged-like; IQL's policy is a unimodal Gaussian, which on
        a multimodal behaviour spans the space between the modes (on the two-mode test's logs every pick left the
        logs), so candidates farther than the support's radius from every logged action are dropped
        (``ActionSupport``). The samples come from torch's generator seeded with the config's seed in every call
        (the caller's stream is left as it was), so the same batch of states is served the same actions (a state's
        candidates depend on its row in the batch). The filter's radius is the benchmark's support measure: looser
        than the behaviour's 95 % region on a narrow log-normal behaviour (docs/offline_rl.md)."""
        n, b = self.selection_samples, len(obs)
        dist = self.module.get_inference_action_dist_cls().from_logits(inputs.repeat_interleave(n, 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.algo.config.seed or 0)
            sampled = dist.sample().reshape(b, n, -1)
        candidates = torch.cat([torch.tanh(inputs.chunk(2, dim=-1)[0])[:, None], sampled], 1).clamp(-1 + EDGE, 1 - EDGE)
        flat = candidates.flatten(0, 1)
        inside = torch.as_tensor(self.support.contains(to_weights(flat.numpy(), self.action_scale)))
        q = torch.full((b * (n + 1),), -torch.inf)  # the critics pass over the candidates in the support only
        if inside.any():
            q[inside] = self.q_values(obs[inside.nonzero()[:, 0] // (n + 1)], flat[inside])
        best = q.reshape(b, n + 1).argmax(1)
        return candidates[torch.arange(b), torch.where(inside.reshape(b, n + 1).any(1), best, 0)]

    @torch.no_grad()
    def q_values(self, obs: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2)(s, u) [B] at states [B, d] and unit-box actions [B, 3] (RLlib's ``compute_q_values``), in
        passes of ``SELECTION_CHUNK`` rows."""
        pairs = zip(obs.split(SELECTION_CHUNK), unit.split(SELECTION_CHUNK))
        return torch.cat([self.module.compute_q_values({Columns.OBS: o, Columns.ACTIONS: a}) for o, a in pairs])

    def policy_weights(self, obs: np.ndarray) -> np.ndarray:
        """The served policy (``_unit_action``) as ranking weights [B, 3]."""
        return to_weights(self._unit_action(obs).numpy(), self.action_scale)

    @torch.no_grad()
    def q_estimate(self, initial_obs: np.ndarray) -> float:
        """mean_s0 Q(s0, π(s0)) (RLlib's ``compute_q_values``: the min of the twin critics) at the served action;
        NaN for BC."""
        if self.name == "bc":
            return float("nan")
        unit = self._unit_action(initial_obs).clamp(-1 + EDGE, 1 - EDGE)
        return float(self.q_values(torch.as_tensor(initial_obs, dtype=torch.float32), unit).mean())

    def stop(self) -> None:
        """Stop the algorithm and collect its Ray Data iterators while Ray is up (collected after a shutdown,
        each prints a "Ray is not initialized" traceback)."""
        self.algo.stop()
        self.algo = None
        gc.collect()
        if self._added is not None:
            self._added.cleanup()
            self._added = None
