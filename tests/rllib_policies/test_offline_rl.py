"""Offline RL for fusion ranking (rllib_policies.offline): the datasets' rows, each learner's mechanism on
hand-built data (the CVAE reconstructs logged actions; BCQ's actions stay within the data's support where TD3's
leave it; CQL's penalty lowers Q on actions the data never hold; the twin critics' targets take the minimum),
the gate's estimators and bad inputs, and a CI-sized learning test on a tiny world."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from actors.cascade import build_world
from actors.stages import RANKING_ACTION_HIGH
from actors.telemetry.sessionise import sessionise
from actors.telemetry.sinks import read_parquet_events
from rllib_policies.envs import SessionEnv
from rllib_policies.offline.bcq import BCQConfig, ConditionalVAE
from rllib_policies.offline.data import (
    MISALIGNED_WEIGHTS,
    OFFLINE_SCHEMA,
    RANDOM_SLICE,
    ActionSupport,
    behaviour,
    eval_users,
    offline_rows,
    oracle_expert,
    read_rows,
    support_ceiling,
    support_fraction,
    true_value,
    two_mode_behaviour,
    write_dataset,
)
from rllib_policies.offline.experiment import (
    EXPLORING,
    OfflineSpec,
    build_learner,
    check_options,
    explore,
    run_offline,
)
from rllib_policies.offline.gate import GateDecision, GateEstimate, Sessions, doubly_robust, fitted_q, gate, live_value
from rllib_policies.offline.registry import own_config
from rllib_policies.offline.shipped import (
    ACTION_SCALES,
    IQL_BETA,
    IQLTemperatureConfig,
    ShippedOffline,
    iql_temperature,
    polyak_per_call,
    shipped_config,
    to_unit,
    to_weights,
    unit_rows,
)
from rllib_policies.outer_controller.logs import simulate_logs

TINY = {"world": {"n_items": 1500, "n_users": 300}, "pipeline": {"k_matching": 100, "k_pre_ranking": 20, "k_slate": 6}}
D_OBS = 37  # the request context's width (ObservationSpec.context_dim)


# ---------------------------------------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def concurrent_rows(tmp_path_factory):
    """Concurrent-regime rows of one simulated day through the telemetry path (sink → sessionise → rows)."""
    root = tmp_path_factory.mktemp("concurrent")
    _, pipeline = build_world(TINY)
    simulate_logs(TINY, str(root / "events"), days=1, users_per_day=40, behaviour=behaviour("concurrent", pipeline))
    trajectories = sessionise(read_parquet_events(str(root / "events")))
    path = str(root / "rows.parquet")
    pq.write_table(offline_rows(trajectories), path)
    return trajectories, path


def test_offline_rows_are_one_transition_per_request(concurrent_rows):
    trajectories, path = concurrent_rows
    rows = read_rows(path)
    assert pq.read_schema(path).names == OFFLINE_SCHEMA.names
    assert len(rows["rewards"]) == sum(trajectories.column("n_steps").to_pylist())
    s = Sessions.of(rows)
    assert s.index.shape[0] == trajectories.num_rows
    last = rows["terminateds"]
    assert last.sum() == trajectories.num_rows  # one terminal step per session
    # new_obs is the next step's obs within a session
    cont = np.flatnonzero(~last)
    np.testing.assert_array_equal(rows["new_obs"][cont], rows["obs"][cont + 1])
    # the behaviour's log density is logged: log-normal around (1, 1, 10) with σ 0.3
    w = rows["actions"]
    eps = np.log(w / np.array([1.0, 1.0, 10.0]))
    expected = (-0.5 * (eps / 0.3) ** 2 - np.log(np.sqrt(2 * np.pi) * 0.3 * w)).sum(1)
    np.testing.assert_allclose(rows["action_logp"], expected, rtol=1e-4, atol=1e-3)


def _trajectory(**overrides) -> pa.Table:
    row = {
        "session_id": "7-1",
        "first_step": 0,
        "n_steps": 2,
        "session_steps": 2,
        "observations": [[0.0] * 3, [1.0] * 3],
        "actions": [[1.0, 1.0, 10.0]] * 2,
        "rewards": [1.0, 2.0],
        "propensities": [0.5, 0.5],
        **overrides,
    }
    return pa.Table.from_pylist([row])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"first_step": 2, "session_steps": 4}, r"session 7-1: window of steps 2\.\.4 of 4; offline rows need whole"),
        ({"session_steps": 5}, r"session 7-1: window of steps 0\.\.2 of 5"),
        ({"observations": [[0.0] * 3, None]}, r"session 7-1: observations not logged"),
        ({"observations": None}, r"session 7-1: observations not logged"),
    ],
)
def test_offline_rows_refuse_what_is_not_a_whole_logged_session(overrides, match):
    with pytest.raises(ValueError, match=match):
        offline_rows(_trajectory(**overrides))


def test_behaviour_names_are_checked():
    _, pipeline = build_world(TINY)
    with pytest.raises(ValueError, match=r"unknown dataset 'random'; choose from \('exploratory'"):
        behaviour("random", pipeline)
    with pytest.raises(ValueError, match="the imitation dataset needs the oracle's expert"):
        behaviour("imitation", pipeline)


def test_the_misaligned_behaviour_explores_around_long_view_weights():
    _, pipeline = build_world(TINY)
    w, _ = behaviour("misaligned", pipeline)(np.random.default_rng(0), SimpleNamespace(user=np.arange(4000)))
    np.testing.assert_allclose(np.exp(np.log(w).mean(0)), MISALIGNED_WEIGHTS, rtol=0.03)
    np.testing.assert_allclose(np.log(w).std(0), 0.3, rtol=0.05)


def test_the_random_slice_serves_uniform_weights_on_a_tenth_and_logs_the_mixtures_density():
    """Against scipy.stats: (1 − share)·Π lognorm(σ 0.3, scale = the ranking's weight) + share·Π uniform(0, a_max),
    whose uniform part is 0 where a log-normal draw leaves the box."""
    from scipy import stats

    _, pipeline = build_world(TINY)
    w, density = behaviour("misaligned_random", pipeline)(
        np.random.default_rng(0), SimpleNamespace(user=np.arange(20000))
    )
    jittered = np.all(np.abs(np.log(w / MISALIGNED_WEIGHTS)) < 5 * 0.3, axis=1)  # a uniform draw lands here rarely
    assert (~jittered).mean() == pytest.approx(RANDOM_SLICE, abs=0.01)
    lognormal = stats.lognorm(s=0.3, scale=MISALIGNED_WEIGHTS).pdf(w).prod(1)
    uniform = stats.uniform(0, RANKING_ACTION_HIGH).pdf(w).prod(1)
    np.testing.assert_allclose(density, (1 - RANDOM_SLICE) * lognormal + RANDOM_SLICE * uniform, rtol=1e-4)
    outside = np.any(w > RANKING_ACTION_HIGH, axis=1)
    assert outside.sum() > 50  # w_long_view = exp(0.3·ε) > 2 about 1 % of the time
    np.testing.assert_allclose(density[outside], (1 - RANDOM_SLICE) * lognormal[outside], rtol=1e-4)
    assert np.all(w > 0)


def test_action_support_holds_actions_within_its_radius_of_a_logged_one():
    support = ActionSupport(np.array([[1.0, 1.0, 10.0]]))
    step = 0.1 * RANKING_ACTION_HIGH  # the radius, per weight
    inside, outside = np.array([1.0, 1.0, 10.0]) + 0.99 * step, np.array([1.0, 1.0, 10.0]) + [0, 0, 1.01 * step[2]]
    assert support.contains(np.stack([inside, outside])).tolist() == [True, False]


def test_support_fraction_counts_actions_near_logged_ones():
    logged = np.array([[1.0, 1.0, 10.0]])
    near, far = logged * 1.05, np.array([[2.0, 0.0, 40.0]])
    assert support_fraction(np.concatenate([near, far]), logged) == 0.5


# ---------------------------------------------------------------------------------------------- hand-built data
def hand_built_rows(path, n: int = 3000, seed: int = 0, one_step: bool = True, span=(0.35, 0.65)) -> str:
    """One-step sessions: obs ~ N(0, I) [37]; logged unit actions ā ∈ [0.35, 0.65]³ (``span``: a narrow support in
    the middle of the box); reward = Σ ā + 0.1·noise — higher toward the box's far corner, which the data never
    hold."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, D_OBS)).astype(np.float32)
    unit = rng.uniform(*span, (n, 3)).astype(np.float32)
    reward = (unit.sum(1) + 0.1 * rng.standard_normal(n)).astype(np.float32)
    table = pa.table(
        {
            "eps_id": [f"e{i}" for i in range(n)],
            "t": np.zeros(n, np.int64),
            "obs": pa.array(obs.tolist(), pa.list_(pa.float32())),
            "actions": pa.array((unit * RANKING_ACTION_HIGH).tolist(), pa.list_(pa.float32())),
            "rewards": reward,
            "new_obs": pa.array(obs.tolist(), pa.list_(pa.float32())),
            "terminateds": np.ones(n, bool),
            "truncateds": np.zeros(n, bool),
            "action_logp": np.full(n, float(-np.log(0.3**3 * RANKING_ACTION_HIGH.prod())), np.float32),
        },
        schema=OFFLINE_SCHEMA,
    )
    out = str(path / "rows.parquet")
    pq.write_table(table, out)
    return out


def build_own(name: str, rows_path: str, updates: int = 200, **options):
    return (
        own_config(name, options)
        .environment(SessionEnv, env_config={**TINY, "seed": 0})
        .offline_rl(dataset=rows_path, updates_per_iteration=updates, batch_size=128, hidden=(64, 64))
        .debugging(seed=0, log_level="ERROR")
        .build_algo()
    )


def test_the_cvae_reconstructs_logged_actions():
    """Actions that depend on the state (ā = sigmoid(s·v)): the decoder's reconstructions and its prior samples
    come close to each state's logged action, far closer than the actions' own spread."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rng.standard_normal((2000, 8)), dtype=torch.float32)
    act = torch.sigmoid(obs[:, :3] * 2)
    vae = ConditionalVAE(8, 3, (64, 64))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(600):
        i = torch.randint(0, 2000, (256,))
        mean, log_std = vae.encode(obs[i], act[i])
        z = mean + log_std.exp() * torch.randn_like(mean)
        kl = (-0.5 * (1 + 2 * log_std - mean**2 - (2 * log_std).exp())).sum(-1).mean()
        loss = ((vae.decode(obs[i], z) - act[i]) ** 2).sum(-1).mean() + 0.5 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mean, _ = vae.encode(obs, act)
        recon = ((vae.decode(obs, mean) - act) ** 2).sum(-1).mean()
        prior = ((vae.decode(obs, torch.zeros(len(obs), 6)) - act) ** 2).sum(-1).mean()
    spread = ((act - act.mean(0)) ** 2).sum(-1).mean()
    assert recon < 0.1 * spread
    assert prior < 0.2 * spread


def test_bcq_stays_within_the_data_support_where_td3_leaves_it(ray_session, tmp_path):
    path = hand_built_rows(tmp_path)
    logged = read_rows(path)["actions"]
    obs = np.random.default_rng(1).standard_normal((200, D_OBS)).astype(np.float32)
    out = {}
    for name in ("td3", "bcq"):
        algo = build_own(name, path)
        try:
            for _ in range(3):
                algo.train()
            out[name] = algo.policy_weights(obs)
        finally:
            algo.stop()
    unit = {k: v / RANKING_ACTION_HIGH for k, v in out.items()}
    assert support_fraction(out["bcq"], logged, radius=0.1) >= 0.9
    assert np.all(unit["bcq"] <= 0.65 + 0.05 + 1e-6)  # at most Φ beyond the generator's proposals
    assert support_fraction(out["td3"], logged, radius=0.1) <= 0.1  # TD3 climbs the extrapolated Q
    assert unit["td3"].mean() > 0.8


@pytest.mark.parametrize(
    "name, options, weight",
    [
        ("td3", {"target_noise": 0.0}, 1.0),
        ("bcq", {"lam": 1.0}, 1.0),
        ("uwac", {"target_noise": 0.0}, 0.25),  # U ≡ 1 at the logged pairs, ≡ 4 at the targets: w = β·1/4
    ],
)
def test_the_targets_take_the_twin_critics_minimum(ray_session, tmp_path, name, options, weight):
    path = hand_built_rows(tmp_path, n=256)
    rows = read_rows(path)
    batch = {
        "obs": torch.as_tensor(rows["obs"][:64]),
        "actions": torch.as_tensor(rows["actions"][:64] / RANKING_ACTION_HIGH),
        "rewards": torch.zeros(64),
        "new_obs": torch.as_tensor(rows["obs"][:64]),
        "terminateds": torch.zeros(64),
    }
    algo = build_own(name, path, updates=1, **options)
    try:
        learner = algo.learner_group._learner
        module = learner.module["default_policy"].unwrapped()
        if name == "uwac":  # known uncertainties: Ū from the logged (s, ā), U at the targets (s', ã')
            module.uncertainty = lambda o, a, k: torch.full((len(o),), 1.0 if o is batch["obs"] else 4.0)
            for layer in module.critic.modules():
                if isinstance(layer, torch.nn.Dropout):  # the regression pass then equals the q1, q2 below
                    layer.p = 0.0
        with torch.no_grad():  # Q¹' ≡ 5, Q²' ≡ 3 (constant heads): the target must use 3
            for head, value in ((module.target_critic.q1, 5.0), (module.target_critic.q2, 3.0)):
                head[-1].weight.zero_()
                head[-1].bias.fill_(value)
            q1, q2 = module.critic(batch["obs"], batch["actions"])
        loss = learner.compute_loss_for_module(module_id="default_policy", config=None, batch=batch, fwd_out={})
        critic_part = learner.metrics.peek(("default_policy", "critic_loss"))
        expected = weight * float(((q1 - 3.0) ** 2).mean() + ((q2 - 3.0) ** 2).mean())
        assert critic_part == pytest.approx(expected, rel=1e-4)
        assert torch.isfinite(loss)
    finally:
        algo.stop()


def test_a_restored_td3_goes_on_counting_its_steps_instead_of_cloning_again(ray_session, tmp_path):
    """The gradient-step count (``bc_steps``, the policy delay) is part of the learner's checkpointed state."""
    from ray.rllib.algorithms.algorithm import Algorithm

    algo = build_own("td3", hand_built_rows(tmp_path, n=200), updates=20, bc_steps=30)
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = Algorithm.from_checkpoint(path)
    try:
        assert restored.learner_group._learner.steps == 20
        # steps 20–39: TD3's ascent from step 30 (the run before the checkpoint only cloned, so logged no actor_loss)
        assert "actor_loss" in restored.train()["learners"]["default_policy"]
        assert restored.learner_group._learner.steps == 40
    finally:
        restored.stop()


def test_uwac_uncertainty_rises_off_the_data_and_lowers_the_weights_there(ray_session, tmp_path):
    """UWAC trained on the narrow-support data: the critics' dropout variance at the box's far corner (never
    logged) exceeds the variance at logged actions, so the corner's weight β·Ū/U falls below theirs. By how much:
    1.22× when this test was written (0.026 against 0.021; ReLU critics extrapolate smoothly), so on its own the
    weighting barely holds the actor in. The mean network's estimate does not depend on the dropout draws."""
    path = hand_built_rows(tmp_path)
    algo = build_own("uwac", path)
    try:
        for _ in range(2):
            result = algo.train()
        module = algo.learner_group._learner.module["default_policy"].unwrapped()
        torch.manual_seed(0)
        obs = torch.as_tensor(np.random.default_rng(3).standard_normal((300, D_OBS)), dtype=torch.float32)
        seen = module.uncertainty(obs, torch.full((300, 3), 0.5), 50).mean()
        corner = module.uncertainty(obs, torch.full((300, 3), 1.0), 50).mean()
        estimates = [algo.q_estimate(obs.numpy()) for _ in range(2)]
    finally:
        algo.stop()
    assert np.isfinite(result["learners"]["default_policy"]["target_weight"])
    assert corner > 1.1 * seen, (float(corner), float(seen))
    assert estimates[0] == estimates[1]


def test_bcq_ee_explores_around_its_policy_and_grows_its_dataset(ray_session, concurrent_rows, tmp_path):
    _, path = concurrent_rows
    _, pipeline = build_world(TINY)
    algo = build_own("bcq", path, updates=20)
    try:
        algo.train()
        before = len(algo.columns["rewards"])
        served = explore(algo, pipeline, OfflineSpec(env_config=TINY, exploration_sessions=20), str(tmp_path), seed=1)
        rows = read_rows(str(tmp_path / "rows.parquet"))
        assert served == 20
        assert len(algo.columns["rewards"]) == before + len(rows["rewards"])
        centre = algo.policy_weights(rows["obs"])  # the policy the round served around (not trained since)
        log_ratio = np.log(rows["actions"] / np.maximum(centre, 0.02 * centre.max(1, keepdims=True)))
        assert abs(log_ratio.mean()) < 0.1
        assert log_ratio.std() == pytest.approx(0.3, rel=0.2)
        algo.train()  # on the grown dataset
    finally:
        algo.stop()


def test_a_data_window_keeps_the_last_row_sets(ray_session, tmp_path):
    """``add_rows(window=k)``: the logs are the first row set, each call adds one, training sees the last k."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    logs = hand_built_rows(tmp_path, n=300)
    a, b = hand_built_rows(tmp_path / "a", n=200, seed=1), hand_built_rows(tmp_path / "b", n=100, seed=2)
    algo = build_own("bcq", logs, updates=2)
    try:
        assert algo.add_rows(a, window=2) == 500
        assert algo.add_rows(b, window=2) == 300
        np.testing.assert_array_equal(
            algo.columns["rewards"], np.concatenate([read_rows(p)["rewards"] for p in (a, b)])
        )
        assert algo.add_rows(logs) == 600  # no window: every set
        with pytest.raises(ValueError, match="window must be None"):
            algo.add_rows(a, window=0)
        assert len(algo.columns["rewards"]) == 600 and algo.row_sets == [200, 100, 300]  # nothing changed
    finally:
        algo.stop()


@pytest.mark.parametrize(
    "window, match",
    [(0, "window must be None"), (-1, "window must be None"), (1.5, "window must be None"), (True, "got True")],
)
def test_a_data_window_is_a_positive_int(window, match):
    with pytest.raises(ValueError, match=match):
        OfflineSpec(data_window=window).exploration_iterations()


@pytest.mark.parametrize("iterations, rounds, expected", [(8, 2, [3, 5]), (8, 1, [4]), (3, 2, [1, 2]), (8, 0, [])])
def test_bcq_ee_explores_at_evenly_spaced_iterations(iterations, rounds, expected):
    assert OfflineSpec(iterations=iterations, exploration_rounds=rounds).exploration_iterations() == expected


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("cql_ee", {"cql": {"bc_steps": 800}}, [10, 11, 13, 14]),  # after 8 iterations of 100 steps cloning the logs
        ("cql_ee", {"cql": {"bc_steps": 750}}, [10, 11, 13, 14]),  # a warm start ending within an iteration: its end
        ("cql_ee", {}, [3, 6, 10, 13]),
        ("bcq_ee", {"cql": {"bc_steps": 800}}, [3, 6, 10, 13]),  # another learner's warm start is not BCQ-EE's
        ("cql", {"cql": {"bc_steps": 800}}, []),  # an offline learner serves nothing
    ],
)
def test_an_ee_learners_rounds_come_after_its_warm_start(name, options, expected):
    spec = OfflineSpec(iterations=16, updates_per_iteration=100, exploration_rounds=4, options=options)
    assert spec.explore_after(name) == expected


@pytest.mark.parametrize(
    "iterations, rounds, match",
    [
        (2, 2, r"exploration_rounds must be in \[0, iterations\) = \[0, 2\), got 2"),
        (1, 1, r"exploration_rounds must be in \[0, iterations\) = \[0, 1\), got 1"),
        (8, -1, r"got -1"),
    ],
)
def test_bcq_ee_needs_training_after_every_round(iterations, rounds, match):
    with pytest.raises(ValueError, match=match):
        OfflineSpec(iterations=iterations, exploration_rounds=rounds).exploration_iterations()


@pytest.mark.parametrize(
    "iterations, bc_steps, match",
    [
        (5, 600, r"exploration_rounds must be in \[0, iterations − 3 of warm start\) = \[0, 2\), got 2"),
        (5, 900, r"a warm start of 5 of 5 iterations leaves none for exploration rounds"),
        (5, "600", r"warm_steps \(bc_steps\) must be an integer >= 0, got '600'"),
        (5, 600.5, r"warm_steps \(bc_steps\) must be an integer >= 0, got 600.5"),
        (5, -200, r"warm_steps \(bc_steps\) must be an integer >= 0, got -200"),
    ],
)
def test_an_ee_learners_rounds_need_iterations_after_its_warm_start(iterations, bc_steps, match):
    options = {"cql": {"bc_steps": bc_steps}}
    spec = OfflineSpec(iterations=iterations, updates_per_iteration=200, exploration_rounds=2, options=options)
    with pytest.raises(ValueError, match=match):
        spec.explore_after("cql_ee")


@pytest.mark.parametrize(
    "options, match",
    [
        (
            {"bcq_ee": {}},
            r"options for 'bcq_ee': no such offline learner .* an -EE learner takes its",
        ),
        ({"bcq": {"phi": 0.1}}, r"bcq has no option\(s\) \['phi'\]"),
        ({"iql": {"temperature": 3.0}}, r"iql has no option\(s\) \['temperature'\]; RLlib's learners take"),
        ({"cql": {"min_q_weight": -1}}, "min_q_weight must be a finite number >= 0, got -1"),  # values too
        ({"iql": {"selection_samples": -2}}, "selection_samples must be an integer >= 0, got -2"),
        ({"bc": {"min_q_weight": 1.0}}, "min_q_weight: CQL's; bc has none"),
    ],
)
def test_benchmark_options_are_checked_before_any_run(options, match):
    with pytest.raises(ValueError, match=match):
        check_options(options)
    check_options({"bcq": {"action_flexibility": 0.1}, "cql": {"min_q_weight": 1.0, "num_actions": 8}})


def test_uwac_takes_td3s_options_and_refuses_unknown_ones():
    config = own_config("uwac", {"beta": 2.0, "policy_delay": 3})
    assert (config.beta, config.policy_delay) == (2.0, 3)
    with pytest.raises(ValueError, match=r"uwac has no option\(s\) \['lam'\]"):
        own_config("uwac", {"lam": 0.5})


@pytest.mark.slow  # RLlib's own CQL, two algorithms built on Ray Data (about 70 s); the wrapper: the BC test below
def test_cql_penalty_lowers_q_on_actions_the_data_never_hold(ray_session, tmp_path):
    """RLlib's CQL against the same learner with its penalty off (min_q_weight 0): at the box's far corner —
    higher reward by extrapolation, absent from the data — CQL's Q is lower, and below its Q at logged actions."""
    path = hand_built_rows(tmp_path, n=2000)
    obs = np.random.default_rng(2).standard_normal((100, D_OBS)).astype(np.float32)
    corner = torch.full((100, 3), 0.95)
    seen = torch.full((100, 3), 0.0)  # unit 0.5 → u = 0
    q = {}
    for weight in (5.0, 0.0):
        learner = ShippedOffline("cql", path, D_OBS, seed=0, updates_per_iteration=60, batch_size=128, num_actions=4)
        learner.algo.config._is_frozen = False
        try:
            learner.algo.learner_group._learner.config._is_frozen = False
            learner.algo.learner_group._learner.config.min_q_weight = weight
            for _ in range(2):
                learner.train()
            module, o = learner.module, torch.as_tensor(obs)
            with torch.no_grad():
                q[weight] = {
                    "corner": float(module.compute_q_values({"obs": o, "actions": corner}).mean()),
                    "seen": float(module.compute_q_values({"obs": o, "actions": seen}).mean()),
                }
        finally:
            learner.stop()
    assert q[5.0]["corner"] < q[0.0]["corner"] - 0.2
    assert q[5.0]["corner"] < q[5.0]["seen"]


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_unit_rows_round_trip(tmp_path, scale):
    path = hand_built_rows(tmp_path, n=50)
    unit = read_rows(unit_rows(path, scale))["actions"]
    assert unit.min() >= -1 and unit.max() <= 1
    np.testing.assert_allclose(to_weights(unit, scale), read_rows(path)["actions"], rtol=1e-5, atol=1e-4)


def test_the_log_box_puts_small_weights_inside_where_the_linear_box_puts_them_at_its_edge():
    unit = {scale: to_unit(MISALIGNED_WEIGHTS[None], scale)[0] for scale in ACTION_SCALES}
    assert unit["linear"][2] < -0.99  # w_purchase 0.05 of 40
    assert np.all(np.abs(unit["log"]) < 0.9)


def test_iqls_temperature_is_the_papers_beta_on_the_papers_reward_scale(tmp_path):
    """Two-step episodes: temperature = β · 1000 / (max − min episode return), the return summed per episode."""
    path = hand_built_rows(tmp_path, n=200)
    table = pq.read_table(path)
    episodes = pa.array([f"e{i // 2}" for i in range(200)])
    table = table.set_column(table.schema.get_field_index("eps_id"), "eps_id", episodes)
    table = table.set_column(table.schema.get_field_index("t"), "t", pa.array(np.arange(200) % 2))
    pq.write_table(table, path)
    returns = read_rows(path)["rewards"].astype(np.float64).reshape(100, 2).sum(1)
    assert iql_temperature(path) == pytest.approx(IQL_BETA * 1000 / (returns.max() - returns.min()), rel=1e-5)
    assert shipped_config("iql", path, D_OBS).beta == pytest.approx(iql_temperature(path))
    assert shipped_config("iql", path, D_OBS, beta=0.5).beta == 0.5


def test_cqls_targets_move_per_train_call_as_far_as_per_step_polyak_would(tmp_path):
    steps, tau = 100, 0.02
    target, online = 0.0, 1.0
    for _ in range(steps):
        target += tau * (online - target)
    assert polyak_per_call(tau, steps) == pytest.approx(target)
    config = shipped_config("cql", hand_built_rows(tmp_path, n=20), D_OBS, updates_per_iteration=steps, tau=tau)
    assert config.tau == pytest.approx(target)
    with pytest.raises(ValueError, match="need 0 < tau <= 1"):
        polyak_per_call(0.0, 10)


def test_iql_at_the_papers_temperature_favours_the_logged_actions_that_earned_more(ray_session, tmp_path):
    """Reward Σ ā over logged ā ∈ [0.15, 0.45]³: at RLlib's default temperature (0.1) IQL clones the logged mean
    (ā ≈ 0.3); at the paper's, on the paper's reward scale, it moves toward the better logged actions."""
    path = hand_built_rows(tmp_path, n=2000, span=(0.15, 0.45))  # off the box's centre, where an untrained tanh sits
    obs = read_rows(path)["obs"][:200]
    mean = {}
    for beta in (0.1, None):
        learner = ShippedOffline("iql", path, D_OBS, seed=0, updates_per_iteration=50, batch_size=128, beta=beta)
        try:
            for _ in range(4):
                learner.train()
            mean[beta] = float((learner.policy_weights(obs) / RANKING_ACTION_HIGH).mean())
        finally:
            learner.stop()
    assert abs(mean[0.1] - 0.3) < 0.03  # measured 0.293
    assert mean[None] > mean[0.1] + 0.025  # measured 0.345: half that shift


def test_rllib_updates_cqls_targets_once_per_train_call(ray_session, tmp_path):
    """The premise of ``polyak_per_call``: one ``train()`` of several minibatches is one target update."""
    learner = ShippedOffline("cql", hand_built_rows(tmp_path, n=300), D_OBS, updates_per_iteration=4, batch_size=32)
    try:
        result = learner.train()
    finally:
        learner.stop()
    assert result["learners"]["default_policy"]["num_target_updates"] == 1


def test_a_shipped_learner_grows_its_dataset_and_keeps_what_it_learned(ray_session, tmp_path):
    """CQL-EE's and IQL-EE's rounds: ``add_rows`` rebuilds RLlib's algorithm on the logs plus a copy of the round's
    rows (its folder may go) and hands over the networks, optimisers and CQL's entropy weight α; a wrapped algorithm,
    with nothing to rebuild from, refuses."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "round").mkdir()
    logs = hand_built_rows(tmp_path / "logs", n=300)
    added = hand_built_rows(tmp_path / "round", n=200, seed=1)
    obs = read_rows(logs)["obs"][:50]
    learner = ShippedOffline("cql", logs, D_OBS, updates_per_iteration=4, batch_size=32)
    try:
        learner.train()
        before = (
            learner.policy_weights(obs),
            float(learner.algo.learner_group._learner.curr_log_alpha["default_policy"]),
        )
        assert learner.add_rows(added) == 500
        shutil.rmtree(tmp_path / "round")
        after = learner.policy_weights(obs), float(learner.algo.learner_group._learner.curr_log_alpha["default_policy"])
        learner.train()  # on the copy
        assert len(learner.algo.config.input_) == 2
        assert learner.add_rows(logs, window=1) == 300  # the last row set only
        assert len(learner.algo.config.input_) == 1
        with pytest.raises(ValueError, match="cql: a wrapped algorithm has no build arguments"):
            ShippedOffline.wrap("cql", learner.algo).add_rows(logs)
    finally:
        learner.stop()
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1] != 0.0


def test_iql_accepts_a_temperature_above_one_and_refuses_one_at_or_below_zero():
    def config(beta):
        return IQLTemperatureConfig().training(beta=beta).offline_data(dataset_num_iters_per_learner=2)

    hot = config(10.0)
    hot.validate()  # RLlib's IQLConfig: "`beta` must be within 0.0 and 1.0!"
    assert hot.beta == 10.0
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            config(beta).validate()


def test_iqls_temperature_needs_returns_that_differ(tmp_path):
    path = hand_built_rows(tmp_path, n=20)
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("rewards"), "rewards", pa.array(np.ones(20, np.float32)))
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="every episode has the same return"):
        iql_temperature(path)


@pytest.mark.parametrize(
    "name, option, match",
    [
        ("bc", {"beta": 3.0}, "beta is IQL's advantage temperature; bc has none"),
        ("cql", {"beta": 3.0}, "beta is IQL's advantage temperature; cql has none"),
        ("bc", {"min_q_weight": 1.0}, "min_q_weight: CQL's; bc has none"),
        ("iql", {"min_q_weight": 1.0}, "min_q_weight: CQL's; iql has none"),
        ("iql", {"actor_lr": 1e-3, "target_entropy": -9.0}, "actor_lr, target_entropy: CQL's; iql has none"),
        ("cql", {"action_scale": "sqrt"}, r"action_scale must be one of \('linear', 'log'\), got 'sqrt'"),
        ("bc", {"selection_samples": 8}, "selection_samples: bc has no critic to select with"),
        ("iql", {"selection_samples": -1}, "selection_samples must be an integer >= 0, got -1"),
        ("cql", {"selection_samples": 2.5}, "selection_samples must be an integer >= 0, got 2.5"),
        ("iql", {"selection_samples": True}, "selection_samples must be an integer >= 0, got True"),
        # RLlib drops a config attribute equal to −1 when it builds the algorithm: refused, not trained at 5
        ("cql", {"min_q_weight": -1.0}, "min_q_weight must be a finite number >= 0, got -1.0"),
        ("cql", {"min_q_weight": float("nan")}, "min_q_weight must be a finite number >= 0, got nan"),
        ("cql", {"actor_lr": 0.0}, "actor_lr must be a finite number > 0, got 0.0"),
        ("cql", {"initial_alpha": "1"}, "initial_alpha must be a finite number > 0, got '1'"),
        ("cql", {"num_actions": 0}, "num_actions must be an integer >= 1, got 0"),
        ("iql", {"beta": -3.0}, "beta must be a finite number > 0, got -3.0"),
        ("cql", {"tau": float("inf")}, "tau must be a finite number > 0, got inf"),
        ("cql", {"bc_steps": -1}, "bc_steps must be an integer >= 0, got -1"),
        ("cql", {"tau": 2.5}, r"tau must be a Polyak rate in \(0, 1\], got 2.5"),
        ("cql", {"target_entropy": -1}, "target_entropy -1 would train at RLlib's default"),
        ("iql", {"bc_steps": 100}, "bc_steps: CQL's; iql has none"),
        ("iql", {"bc_steps": 100, "bc_actor_lr": 1e-3}, "bc_steps, bc_actor_lr: CQL's; iql has none"),
        ("cql", {"bc_actor_lr": 1e-3}, "bc_actor_lr is the actor's rate while it clones the logs: it needs bc_steps"),
        ("cql", {"bc_steps": 100, "bc_actor_lr": 0.0}, "bc_actor_lr must be a finite number > 0, got 0.0"),
    ],
)
def test_a_shipped_learner_refuses_another_learners_option_and_bad_values(tmp_path, name, option, match):
    with pytest.raises(ValueError, match=match):
        shipped_config(name, hand_built_rows(tmp_path, n=20), D_OBS, **option)


def test_cql_is_built_without_rllibs_behaviour_cloning(tmp_path):
    # RLlib's default (20 000) counts within each train() call: its actor would clone the logs for ever
    assert shipped_config("cql", hand_built_rows(tmp_path, n=20), D_OBS).bc_iters == 0


def test_cqls_bc_steps_clone_the_logs_in_the_calls_that_start_before_them(ray_session, tmp_path):
    """RLlib 2.60 counts CQL's ``bc_iters`` within one ``train()`` call, so ``bc_steps`` switches its learner's
    actor loss per call: cloning (``bc_iters`` above any call's steps) while fewer steps than ``bc_steps`` are done,
    then SAC's (0), the actor at ``bc_actor_lr`` while cloning and at ``actor_lr`` after, read at each gradient step
    (RLlib resets the rate from its scheduler after each call, and a rebuild by ``add_rows`` restores the optimiser
    state saved at the old rate); the count goes on from a restored algorithm's iteration."""
    path = hand_built_rows(tmp_path, n=40)
    learner = ShippedOffline(
        "cql", path, D_OBS, updates_per_iteration=2, batch_size=8, bc_steps=5, bc_actor_lr=1e-3, actor_lr=2e-4
    )
    rates = []

    def record_rates():  # the actor's rate at every optimiser step of the (rebuilt) in-process learner
        inner = learner.algo.learner_group._learner
        apply, actor = inner.apply_gradients, inner.get_optimizer(DEFAULT_MODULE_ID, "policy")
        inner.apply_gradients = lambda grads: (rates.append(actor.param_groups[0]["lr"]), apply(grads))[1]
        return inner.config

    config = record_rates()
    assert config.get_config_for_module(DEFAULT_MODULE_ID) is config  # what CQL's loss reads
    try:
        seen = []
        for call in range(4):
            if call == 2:  # a rebuild while cloning: its optimiser state comes at the cloning rate
                learner.add_rows(path)
                config = record_rates()
            learner.train()
            seen.append((learner.steps, config.bc_iters))
        assert seen == [(2, 10**9), (4, 10**9), (6, 10**9), (8, 0)]
        assert rates == [1e-3] * 6 + [2e-4] * 2
        assert ShippedOffline.wrap("cql", learner.algo, bc_steps=5).steps == 8
    finally:
        learner.stop()


@pytest.mark.parametrize("name", ["bc", "cql", "iql"])
def test_rllibs_offline_algorithms_restore_from_their_checkpoints(ray_session, tmp_path, name):
    """RLlib 2.60's ``Algorithm.restore_from_path`` syncs EnvRunners that its offline algorithms (BC, CQL, IQL) do not
    have (``AttributeError`` on ``None``); ``restore_checkpoint`` restores them (the offline job's ``--resume`` and
    its served checkpoint) with their iteration and weights."""
    from rllib_policies.jobs import restore_checkpoint, save_checkpoint

    path = hand_built_rows(tmp_path, n=40)
    obs = read_rows(path)["obs"][:5]
    learner = ShippedOffline(name, path, D_OBS, updates_per_iteration=2, batch_size=8)
    try:
        learner.train()
        restored = ShippedOffline.wrap(name, restore_checkpoint(save_checkpoint(learner.algo, str(tmp_path / "c"))))
        try:
            assert restored.algo.iteration == 1 and restored.steps == 2
            np.testing.assert_array_equal(restored.policy_weights(obs), learner.policy_weights(obs))
        finally:
            restored.stop()
    finally:
        learner.stop()


def test_the_support_ceiling_stays_in_the_behaviours_region_and_beats_its_centre():
    _, pipeline = build_world(TINY)
    users = eval_users(pipeline, 30, 7)
    ceiling = support_ceiling("misaligned", pipeline, users, n_angles=4, n_radii=1)
    assert ceiling.radius == pytest.approx(2.7955, abs=1e-4)  # √χ²₃(0.95)
    delta = np.log(ceiling.weights.astype(np.float64) / MISALIGNED_WEIGHTS)
    assert abs(delta.mean()) < 1e-5  # in the plane ⊥ (1, 1, 1), where the ranking changes
    assert np.linalg.norm(delta) == pytest.approx(0.3 * ceiling.radius, abs=1e-5) or np.allclose(delta, 0, atol=1e-6)
    assert ceiling.value.mean() >= true_value(pipeline, MISALIGNED_WEIGHTS, users).mean()
    with pytest.raises(ValueError, match="dataset 'exploratory': no log-normal behaviour"):
        support_ceiling("exploratory", pipeline, users)


def test_a_shipped_learner_trains_through_the_wrapper_and_acts_in_the_box(ray_session, tmp_path):
    """RLlib's BC through ``ShippedOffline`` (the wrapper BC, CQL and IQL share): it trains on the unit-action copy,
    and its policy maps back to weights inside the box; BC has no critic, so no Q estimate."""
    path = hand_built_rows(tmp_path, n=300)
    learner = ShippedOffline("bc", path, D_OBS, seed=0, updates_per_iteration=5, batch_size=64)
    try:
        learner.train()
        obs = read_rows(path)["obs"][:20]
        weights = learner.policy_weights(obs)
        assert weights.shape == (20, 3) and np.all(weights >= 0) and np.all(weights <= RANKING_ACTION_HIGH)
        assert np.isnan(learner.q_estimate(obs))
    finally:
        learner.stop()


def test_iqls_critic_selection_serves_its_highest_q_candidate_the_same_way_each_call(ray_session, tmp_path):
    """``selection_samples`` N: in every state the served action is the candidate (the policy's mean and N samples)
    within the logs' support with the highest min-of-twins Q, so, the mean being inside here (the logs fill the
    middle of the box), its Q is at least the mean's and above it where a sample wins; the samples are seeded, so a
    second call serves the same actions; N = 0 serves the mean."""
    path = hand_built_rows(tmp_path, n=400)
    learner = ShippedOffline("iql", path, D_OBS, seed=0, updates_per_iteration=50, batch_size=64, selection_samples=16)
    try:
        learner.train()
        obs = read_rows(path)["obs"][:64]
        selected = learner.policy_weights(obs)
        np.testing.assert_array_equal(selected, learner.policy_weights(obs))
        assert learner.support.contains(selected).all()
        learner.selection_samples = 0
        mean = learner.policy_weights(obs)
        learner._support, learner.selection_samples = ActionSupport(mean, radius=1e-4), 16  # only the means inside
        np.testing.assert_allclose(learner.policy_weights(obs), mean, atol=1e-5)
        learner._support = ActionSupport(np.zeros((1, 3)), radius=1e-4)  # none inside: the mean
        np.testing.assert_allclose(learner.policy_weights(obs), mean, atol=1e-5)
        q = {
            key: learner.q_values(torch.as_tensor(obs), torch.as_tensor(to_unit(weights))).numpy()
            for key, weights in (("selected", selected), ("mean", mean))
        }
    finally:
        learner.stop()
    assert np.all(q["selected"] >= q["mean"] - 1e-4)
    assert np.mean(q["selected"] > q["mean"] + 1e-4) > 0.5  # a sample beats the mean in most states
    assert np.all((selected >= 0) & (selected <= RANKING_ACTION_HIGH))


# ---------------------------------------------------------------------------------------------- the gate
def test_fqe_and_dr_recover_a_known_value_and_the_gate_holds_a_worse_policy(tmp_path):
    """One-step data, reward = Σ ā: the policy ā ≡ 0.6 is worth 1.8, ā ≡ 0.4 is worth 1.2; the logs' own mean is
    1.5. FQE and DR recover both values; the gate promotes the better policy and holds the worse one."""
    rows = read_rows(hand_built_rows(tmp_path, n=3000))
    for level, value in ((0.6, 1.8), (0.4, 1.2)):
        policy = lambda obs, level=level: np.tile(level * RANKING_ACTION_HIGH, (len(obs), 1))  # noqa: E731
        q = fitted_q(rows, policy, RANKING_ACTION_HIGH, steps=600, hidden=(64, 64))
        dr = doubly_robust(rows, policy, q, RANKING_ACTION_HIGH, bandwidth=0.05)
        assert dr.value == pytest.approx(value, abs=0.1)
        decision = gate(rows, policy, RANKING_ACTION_HIGH, by="fqe", n_boot=1, steps=2000, hidden=(64, 64))
        assert decision.fqe.value == pytest.approx(value, abs=0.1)
        assert decision.live.value == pytest.approx(1.5, abs=0.02)
        assert decision.promote == (value > 1.5), decision.reason


def test_fqe_is_seeded_in_a_generator_of_its_own(tmp_path):
    """FQE seeds torch with its seed, and the caller's stream (a learner gated between its training calls) goes on
    as if it had not run; the same seed fits the same Q̂."""
    rows = read_rows(hand_built_rows(tmp_path, n=200))
    policy = lambda obs: np.tile(0.5 * RANKING_ACTION_HIGH, (len(obs), 1))  # noqa: E731
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fits = [fitted_q(rows, policy, RANKING_ACTION_HIGH, steps=5, hidden=(8,), seed=1) for _ in range(2)]
    assert torch.equal(torch.rand(3), expected)
    obs, weights = rows["obs"][:4], rows["actions"][:4]
    assert np.array_equal(fits[0](obs, weights), fits[1](obs, weights))


def test_the_gate_asks_the_policy_once_per_array_of_states(tmp_path):
    """FQE's full fit and its bootstrap refits all need the actions at the rows' next states: a policy that costs a
    critic pass per call (IQL's selection) is asked once for them, once for the rows' states, once for the starts."""
    rows = read_rows(hand_built_rows(tmp_path, n=300))
    calls = []

    def policy(obs):
        calls.append(len(obs))
        return np.tile(0.5 * RANKING_ACTION_HIGH, (len(obs), 1))

    gate(rows, policy, RANKING_ACTION_HIGH, n_boot=3, steps=20, hidden=(8,))
    assert sorted(calls) == [300, 300, 300]  # one-step sessions: every row is a start


def test_dr_abstains_when_the_policy_leaves_the_data():
    rng = np.random.default_rng(0)
    n = 500
    rows = {
        "eps_id": np.array([f"e{i}" for i in range(n)]),
        "t": np.zeros(n, np.int64),
        "obs": rng.standard_normal((n, 4)).astype(np.float32),
        "actions": np.tile([1.0, 1.0, 20.0], (n, 1)).astype(np.float32),
        "rewards": rng.random(n).astype(np.float32),
        "terminateds": np.ones(n, bool),
        "action_logp": np.zeros(n),
    }
    rows["new_obs"] = rows["obs"]
    far = lambda obs: np.tile([2.0, 0.0, 0.0], (len(obs), 1))  # noqa: E731
    zero_q = lambda obs, a: np.zeros(len(obs))  # noqa: E731
    est = doubly_robust(rows, far, zero_q, RANKING_ACTION_HIGH, bandwidth=0.05)
    assert est.abstained and "outside the logged support" in est.reason and np.isnan(est.value)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda rows: gate(rows, None, RANKING_ACTION_HIGH, by="ips"), r"gate by must be 'dr' or 'fqe', got 'ips'"),
        (lambda rows: Sessions.of({**rows, "t": rows["t"] + 1}), r"every session needs its step t = 0"),
    ],
)
def test_gate_bad_input(call, match):
    rows = {"eps_id": np.array(["a", "b"]), "t": np.zeros(2, np.int64)}
    with pytest.raises(ValueError, match=match):
        call(rows)


def test_live_value_is_the_logged_mean_session_return():
    rows = {
        "eps_id": np.array(["a", "a", "b"]),
        "t": np.array([0, 1, 0]),
        "rewards": np.array([1.0, 2.0, 5.0]),
    }
    est = live_value(rows)
    assert est.value == pytest.approx(4.0)
    assert est.low < 4.0 < est.high


@pytest.mark.parametrize(
    "configure, match",
    [
        (lambda c: c, r"offline_rl\(dataset=…\) is required"),
        (lambda c: c.offline_rl(dataset="x", batch_size=0), r"batch_size must be >= 1, got 0"),
        (lambda c: c.offline_rl(dataset="x", tau=0.0), r"tau must be in \(0, 1\], got 0.0"),
        (lambda c: c.offline_rl(dataset="x").bcq(action_flexibility=2.0), r"action_flexibility must be in \[0, 1\]"),
        (lambda c: c.offline_rl(dataset="x").bcq(lam=-1.0), r"lam must be in \[0, 1\], got -1.0"),
    ],
)
def test_bad_offline_configs_name_the_option(configure, match):
    config = BCQConfig().environment(SessionEnv, env_config=TINY)
    with pytest.raises(ValueError, match=match):
        configure(config).validate()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dropout": 1.0}, r"dropout must be in \(0, 1\), got 1.0"),
        ({"dropout_samples": 1}, r"dropout_samples must be >= 2 \(a variance\), got 1"),
        ({"beta": 0.0}, r"beta and max_weight must be > 0, got 0.0 and 1.5"),
        ({"bc_steps": -1}, r"bc_steps must be an int >= 0, got -1"),
        ({"bc_steps": 2.5}, r"bc_steps must be an int >= 0, got 2.5"),
    ],
)
def test_bad_uwac_options_name_the_option(options, match):
    config = own_config("uwac", options).environment(SessionEnv, env_config=TINY).offline_rl(dataset="x")
    with pytest.raises(ValueError, match=match):
        config.validate()


def test_an_unknown_offline_learner_is_named():
    with pytest.raises(ValueError, match=r"unknown offline learner 'ddpg'; ours are \('td3', 'bcq', 'uwac'\)"):
        own_config("ddpg")


# ---------------------------------------------------------------------------------------------- learning test
class GapNotClosed(AssertionError):
    """The learning test's verdict, apart from its preconditions (a CQL expected failure catches only this)."""


def _tiny_spec(**overrides) -> OfflineSpec:
    """The learning tests' budget: iterations of 200 steps of 128 on networks of (64, 64)."""
    return OfflineSpec(env_config=TINY, updates_per_iteration=200, batch_size=128, hidden=(64, 64), **overrides)


@pytest.fixture(scope="module")
def two_mode_logs(tmp_path_factory):
    """A tiny world's logs from a two-mode behaviour (each user's mode fixed by an unobserved coin): half the
    sessions ranked by long views only (the world's worst static corner), half by the default weights. Returns
    (rows path, start = the behaviour's value, oracle = the better mode's, evaluation users)."""
    tmp_path = tmp_path_factory.mktemp("two-mode")
    _, pipeline = build_world(TINY)
    bad, good = np.array([0.05, 1.0, 0.05], np.float32), np.array([1.0, 1.0, 10.0], np.float32)
    path = write_dataset("two_mode", TINY, str(tmp_path), 2, 150, sample=two_mode_behaviour(bad, good))["path"]
    users = eval_users(pipeline, 300)
    values = [true_value(pipeline, w, users).mean() for w in (bad, good)]
    return path, float(np.mean(values)), float(max(values)), users


@pytest.mark.parametrize(
    "name, options",
    [
        ("bcq", {}),
        ("iql", {}),
        ("iql", {"selection_samples": 256}),
        pytest.param(  # RLlib's CQL: about 40 s here
            "cql",
            {},
            marks=[
                pytest.mark.slow,
                pytest.mark.xfail(
                    strict=True,
                    raises=GapNotClosed,
                    reason="CQL's actor picks the worse mode (measured: 22.52 at min_q_weight 5 and 22.39 at 1, "
                    "below the start 22.90; at 0.2 it leaves the logs, support 0.3 %); docs/offline_rl.md",
                ),
            ],
        ),
    ],
)
def test_offline_learning_test_closes_half_its_gap_from_a_two_mode_behaviour(ray_session, two_mode_logs, name, options):
    """Start = the two-mode behaviour's value; oracle = the better mode's. A learner that keeps to the data closes
    ≥ 50 % of the gap by choosing, in every state, the mode its critic prefers among the ones the data hold (BCQ:
    the critic picks among generated actions; IQL: the advantage weights; CQL: the conservative critic's
    maximiser), and its actions are logged ones. On this world an untrained network's box-centre weights (1, 1,
    20) rank about as well as the better mode, and so does the modes' average (what BC fits): the support check
    is what they fail. With ``selection_samples`` IQL's policy picks among its samples within the logs' support,
    so its untrained picks are logged actions, chosen by an untrained critic: the value check is what it would
    fail. Either way the untrained learner is asserted to fail the test."""
    path, start, oracle, users = two_mode_logs
    _, pipeline = build_world(TINY)
    rows = read_rows(path)
    initial = rows["obs"][rows["t"] == 0]
    learner = build_learner(name, path, seed=0, spec=_tiny_spec(options={name: options}))
    try:
        untrained = true_value(pipeline, learner.policy_weights, users).mean()
        untrained_support = support_fraction(learner.policy_weights(initial), rows["actions"])
        for _ in range(3):
            learner.train()
        trained = true_value(pipeline, learner.policy_weights, users).mean()
        support = support_fraction(learner.policy_weights(initial), rows["actions"])
    finally:
        learner.stop()
    gap = oracle - start
    assert gap > 0.5
    assert untrained_support <= 0.1 or (untrained - start) / gap < 0.5, (untrained, untrained_support)
    if (trained - start) / gap < 0.5:
        raise GapNotClosed(f"start {start:.2f}, oracle {oracle:.2f}, trained {trained:.2f}")
    if support < 0.5:  # BCQ's perturbation (Φ 0.05 of the box) takes some past the 0.1 radius
        raise GapNotClosed(f"support {support:.0%}: its actions are not logged ones")


@pytest.fixture(scope="module")
def misaligned_logs(tmp_path_factory):
    """A tiny world's logs from the misaligned behaviour (long-view weights, (0.05, 1, 0.05)·exp(0.3·ε)). Returns
    (rows path, start = the behaviour's value, oracle = the oracle's best static value, evaluation users)."""
    tmp_path = tmp_path_factory.mktemp("misaligned")
    _, pipeline = build_world(TINY)
    path = write_dataset("misaligned", TINY, str(tmp_path), 2, 150)["path"]
    users = eval_users(pipeline, 300)
    oracle = true_value(pipeline, oracle_expert(pipeline, n_sessions=300).static_weights, users).mean()
    return path, float(true_value(pipeline, MISALIGNED_WEIGHTS, users).mean()), float(oracle), users


@pytest.mark.parametrize("name", ["td3", "uwac"])
def test_an_unconstrained_learner_started_at_the_behaviour_closes_half_its_gap(ray_session, misaligned_logs, name):
    """TD3 and UWAC leave the data by design, so the two-mode test's support check is not theirs; on this world an
    untrained actor's box centre ranks near the oracle, so they start from the logged behaviour instead: 600
    steps of behaviour cloning (``bc_steps``) while the critics learn, asserted to leave the policy at the
    behaviour (logged actions, at most a quarter of the gap), then 400 steps of TD3 (UWAC) that must close half."""
    path, start, oracle, users = misaligned_logs
    _, pipeline = build_world(TINY)
    rows = read_rows(path)
    initial = rows["obs"][rows["t"] == 0]
    learner = build_learner(name, path, seed=0, spec=_tiny_spec(options={name: {"bc_steps": 600}}))
    try:
        for _ in range(3):
            learner.train()
        cloned = true_value(pipeline, learner.policy_weights, users).mean()
        cloned_support = support_fraction(learner.policy_weights(initial), rows["actions"])
        for _ in range(2):
            learner.train()
        trained = true_value(pipeline, learner.policy_weights, users).mean()
    finally:
        learner.stop()
    gap = oracle - start
    assert gap > 0.5
    assert (cloned - start) / gap <= 0.25 and cloned_support >= 0.5, (start, cloned, oracle, cloned_support)
    if (trained - start) / gap < 0.5:
        raise GapNotClosed(f"start {start:.2f}, oracle {oracle:.2f}, cloned {cloned:.2f}, trained {trained:.2f}")


def test_cql_started_at_the_behaviour_closes_half_its_gap(ray_session, misaligned_logs):
    """CQL's learning test on the misaligned logs, its full-scale row's recipe at CI size: 600 steps cloning the logs
    (``bc_steps``, actor rate 1e-3) while the critics learn, then 200 steps of CQL at ``min_q_weight`` 0.01, which
    must close half the gap from the cloned policy to the oracle. The cloned policy is asserted to be at logged
    actions (support ≥ 50 %: not the untrained network's box centre, which ranks near the oracle), where a frozen
    policy would stay. CQL's value falls again after its rise (docs/offline_rl.md: at full scale checkpoint
    selection serves the peak; at this size FQE on 300 sessions rates the clone highest), so the budget is fixed.
    At RLlib's default penalty, 5, the same steps end below the clone (a probe: 21.87 against 22.53)."""
    path, start, oracle, users = misaligned_logs
    _, pipeline = build_world(TINY)
    rows = read_rows(path)
    initial = rows["obs"][rows["t"] == 0]
    options = {"min_q_weight": 0.01, "bc_steps": 600, "actor_lr": 1e-3}
    learner = build_learner("cql", path, seed=0, spec=_tiny_spec(options={"cql": options}))
    try:
        for _ in range(3):
            learner.train()
        cloned = true_value(pipeline, learner.policy_weights, users).mean()
        cloned_support = support_fraction(learner.policy_weights(initial), rows["actions"])
        learner.train()
        trained = true_value(pipeline, learner.policy_weights, users).mean()
    finally:
        learner.stop()
    assert oracle - cloned > 0.5 and cloned_support >= 0.5, (start, cloned, oracle, cloned_support)
    if (trained - cloned) / (oracle - cloned) < 0.5:
        raise GapNotClosed(f"start {start:.2f}, cloned {cloned:.2f}, oracle {oracle:.2f}, trained {trained:.2f}")


@pytest.mark.parametrize(
    "name, options, iterations, leaves_logs",
    [
        ("bcq_ee", {}, 3, True),
        # seed 0 of three probed at this size (its policy 78 % of the gap, 69 % of its actions still near logged ones);
        # seeds 1 and 2: -35 % and 92 % (docs/offline_rl.md: IQL-EE's rounds move it in jumps, and back)
        ("iql_ee", {"selection_samples": 256}, 3, False),
        # CQL's recipe (the test above): 600 steps cloning the logs, then CQL, its rounds after the clone
        ("cql_ee", {"min_q_weight": 0.01, "bc_steps": 600, "actor_lr": 1e-3}, 6, False),
    ],
)
def test_an_exploring_learner_closes_half_its_gap_by_exploring_past_the_logs(
    ray_session, misaligned_logs, tmp_path, name, options, iterations, leaves_logs
):
    """BCQ-EE, IQL-EE (IQL served by its critic's pick among its samples) and CQL-EE on the misaligned logs: after
    the offline phase (BCQ's and IQL's first iteration; CQL-EE's clone of the logs) the policy keeps to the logged
    actions (support ≥ 50 %: the untrained network's lucky box centre is gone); then two online rounds of 100
    sessions served around it (CQL-EE's after an iteration of CQL), each followed by training on the last two row
    sets, must close half the gap from the behaviour (CQL-EE's: from its clone; BCQ-EE's actions must end away
    from the logged ones). At this size CQL alone closes half its gap in its first iteration after the clone (the
    test above), so CQL-EE's case asserts only that the rounds do not lose it; its full-scale row measures what
    they add."""
    path, start, oracle, users = misaligned_logs
    _, pipeline = build_world(TINY)
    offline = EXPLORING[name]
    spec = _tiny_spec(
        iterations=iterations,
        exploration_sessions=100,
        exploration_rounds=2,
        data_window=2,
        options={offline: options},
    )
    rows = read_rows(path)
    initial = rows["obs"][rows["t"] == 0]
    learner = build_learner(offline, path, seed=0, spec=spec)
    explore_after = spec.explore_after(name)
    offline_at = -(-options.get("bc_steps", 0) // spec.updates_per_iteration) or explore_after[0]  # the clone's end
    try:
        for i in range(1, spec.iterations + 1):  # as run_offline: train, then explore after the rounds' iterations
            learner.train()
            if i == offline_at:
                offline_support = support_fraction(learner.policy_weights(initial), rows["actions"])
                offline_value = true_value(pipeline, learner.policy_weights, users).mean()
            if i in explore_after:
                explore(learner, pipeline, spec, str(tmp_path / f"round-{i}"), seed=1000 + i)
        trained = true_value(pipeline, learner.policy_weights, users).mean()
        support = support_fraction(learner.policy_weights(initial), rows["actions"])
    finally:
        learner.stop()
    base = offline_value if options.get("bc_steps") else start  # a clone above the behaviour starts the gap there
    assert offline_support >= 0.5 and oracle - base > 0.5, (offline_support, start, offline_value, oracle)
    if (trained - base) / (oracle - base) < 0.5:
        raise GapNotClosed(
            f"start {start:.2f}, before the rounds {offline_value:.2f}, oracle {oracle:.2f}, trained {trained:.2f}"
        )
    assert support < 0.5 or not leaves_logs, support  # its gain is past the logged actions: what the rounds served


@pytest.mark.parametrize(
    "scripted, served",
    [([5.0, 9.0, 7.0], 1), ([9.0, np.nan, 9.0], 2), ([np.nan, np.nan, np.nan], 2)],  # a tie or none: the later
    ids=["highest", "tie", "all-abstain"],
)
def test_checkpoint_selection_serves_the_iterate_with_the_highest_gate_lower_bound(
    ray_session, misaligned_logs, monkeypatch, scripted, served
):
    """``select_from``: the gate runs at each evaluated iterate from there on, and the run's value, weights and
    verdict are those of the iterate with the highest lower bound (a scripted gate's; NaN: the estimator
    abstained), the later one on a tie."""
    path, *_ = misaligned_logs
    lows, asked = iter(scripted), []

    def scripted_gate(rows, policy, high, by, **_):
        asked.append(by)
        low = next(lows)
        estimate = GateEstimate(low + 1, low, low + 2, 1.0)
        return GateDecision(low > 8, by, estimate, estimate, estimate, f"scripted {low}")

    monkeypatch.setattr("rllib_policies.offline.experiment.gate", scripted_gate)
    spec = _tiny_spec(iterations=4, eval_every=1, eval_sessions=60, select_from=400)
    run = run_offline("bcq", "misaligned", path, seed=0, spec=spec, progress=lambda _: None)
    assert run.updates == [200, 400, 600, 800] and len(asked) == 3  # none before select_from, none after the loop
    assert np.isnan(run.gate_lows[0]) and np.allclose(run.gate_lows[1:], scripted, equal_nan=True)
    k = 1 + served  # the index among all evaluated iterates
    assert run.selected_update == run.updates[k]
    assert (run.final_true, run.final_estimate) == (run.true_curve[k], run.estimate_curve[k])
    assert len(run.support_curve) == len(run.updates) and run.support == run.support_curve[k]
    assert run.gate["reason"] == f"scripted {scripted[served]}"


@pytest.mark.parametrize("select_from", [-1, 801, 1.5, True, "400"])
def test_checkpoint_selection_needs_a_step_count_the_run_reaches(select_from):
    with pytest.raises(ValueError, match=r"select_from must be None or an integer in \[0, 800\] steps"):
        _tiny_spec(iterations=4, select_from=select_from).check_select_from()
    for reached in (None, 0, 800):
        _tiny_spec(iterations=4, select_from=reached).check_select_from()


# ---------------------------------------------------------------------------------------------- the job
def _offline_job_yaml(tmp_path, **fields) -> str:
    import yaml

    config = {
        "learner": "td3",
        "env_config": TINY,
        "dataset": str(tmp_path / "data" / "rows.parquet"),
        "dataset_kind": "concurrent",
        "sessions_per_day": 30,
        "offline_rl": {"updates_per_iteration": 20, "batch_size": 64, "hidden": [32, 32]},
        "iterations": 2,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "checkpoint_every": 1,
        "eval_sessions": 50,
        "gate_steps": 200,
        "gate_boot": 1,
        **fields,
    }
    path = tmp_path / "offline.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_offline_job_writes_its_dataset_trains_gates_and_resumes(ray_session, tmp_path, capsys):
    from rllib_policies.train_offline import main

    path = _offline_job_yaml(tmp_path)
    assert main(["--config", path]) == 0
    out = capsys.readouterr().out
    assert "wrote the concurrent dataset: 60 sessions" in out
    assert "iter    2 | critic's V̂" in out
    assert "gate: " in out and "true V on 50 simulated sessions" in out
    assert (tmp_path / "checkpoints" / "iter_000002").is_dir()
    assert main(["--config", path, "--resume", "latest", "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "iter    3 |" in out and "wrote the concurrent dataset" not in out


def test_offline_job_serves_the_checkpoint_with_the_highest_gate_lower_bound(ray_session, tmp_path, capsys):
    """``select_from``: the gate runs at each checkpoint from that many steps on and ``selection.json`` keeps its
    verdicts; the end serves the highest FQE lower bound, restoring that checkpoint when it is not the last (here
    forced by rewriting the verdicts and resuming for no further iterations)."""
    import json

    from rllib_policies.train_offline import main

    path = _offline_job_yaml(tmp_path, iterations=3, select_from=40)
    assert main(["--config", path]) == 0
    out = capsys.readouterr().out
    selection = json.loads((tmp_path / "checkpoints" / "selection.json").read_text())
    assert [c["steps"] for c in selection["checkpoints"]] == [40, 60]  # not the checkpoint at 20 steps
    assert "gate at 40 steps: FQE lower bound" in out and "gate at 60 steps" in out
    best = max(selection["checkpoints"], key=lambda c: (c["fqe_low"], c["iteration"]))
    assert f"served: {best['checkpoint']} ({best['steps']} steps)" in out and "of 2 checkpoint(s)" in out

    low = selection["checkpoints"][0]["fqe_low"]
    selection["checkpoints"][0]["fqe_low"] = 1e6  # the checkpoint at 40 steps, not the last one, is served now
    del selection["checkpoints"][1]  # the last checkpoint's verdict lost (a stop after its save)
    (tmp_path / "checkpoints" / "selection.json").write_text(json.dumps(selection))
    assert main(["--config", path, "--resume", "latest", "--iterations", "0"]) == 0
    out = capsys.readouterr().out
    assert "gate at 60 steps" in out  # judged again at the end
    assert f"served: {tmp_path / 'checkpoints' / 'iter_000002'} (40 steps)" in out and "of 2 checkpoint(s)" in out
    # the restored checkpoint's own verdict and truth (the seeded gate gives its bound again), not the last iterate's
    assert f"gate: held: fqe lower bound {low:.3f}" in out or f"gate: promoted: fqe lower bound {low:.3f}" in out
    assert "true V on 50 simulated sessions" in out


@pytest.mark.parametrize(
    "verdicts, upto, served",
    [
        ([(1, 5.0), (2, 9.0), (3, 7.0)], 3, 2),
        ([(1, 9.0), (2, float("nan")), (3, 9.0)], 3, 3),  # a tie: the later; NaN (abstained) ranks last
        ([(1, float("nan")), (2, float("nan"))], 2, 2),
        ([(1, 5.0), (2, 3.0), (3, 9.0)], 2, 1),  # a verdict past the run's iteration (an abandoned resume) is not one
        ([], 3, None),
    ],
)
def test_offline_jobs_served_checkpoint_is_the_highest_lower_bound(tmp_path, verdicts, upto, served):
    from rllib_policies import storage
    from rllib_policies.train_offline import OfflineJobConfig, read_selection, served_checkpoint

    job = OfflineJobConfig(checkpoint_dir=str(tmp_path), select_from=0)
    checkpoints = [{"iteration": i, "steps": 10 * i, "checkpoint": f"iter_{i}", "fqe_low": low} for i, low in verdicts]
    storage.write_json(job.selection_path, {"select_from": 0, "checkpoints": checkpoints})
    pick = served_checkpoint(read_selection(job, upto=upto))
    assert (pick and pick["iteration"]) == served


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("learner", "ddpg", r"learner must be one of \('td3', 'bcq', 'uwac', 'bc', 'cql', 'iql'\), got 'ddpg'"),
        ("dataset_kind", "random", r"dataset_kind must be one of \('exploratory'"),
        ("select_from", -1, r"select_from must be None or gradient steps, an int >= 0, got -1"),
        ("select_from", True, r"select_from must be None or gradient steps, an int >= 0, got True"),
        ("select_from", 1.5, r"select_from must be None or gradient steps, an int >= 0, got 1.5"),
    ],
)
def test_offline_job_refuses_unknown_learners_datasets_and_bad_selection(field, value, match):
    from rllib_policies.train_offline import OfflineJobConfig

    with pytest.raises(ValueError, match=match):
        OfflineJobConfig(**{field: value}).validate()


def test_offline_job_switches_cqls_cloning_before_each_call(ray_session, tmp_path, monkeypatch):
    """CQL's ``bc_steps`` in the offline job: the runner calls the job's ``before_call`` before each ``train()`` call,
    which switches the actor loss as ``ShippedOffline.train`` does: cloning while fewer than ``bc_steps`` steps are
    done, SAC's after (read after each switch)."""
    import rllib_policies.train_offline as job_module

    seen, switch = [], job_module.before_call

    def spy(algo, job):
        switch(algo, job)
        seen.append(algo.learner_group._learner.config.bc_iters)

    monkeypatch.setattr(job_module, "before_call", spy)
    path = _offline_job_yaml(
        tmp_path,
        learner="cql",
        iterations=3,
        checkpoint_every=3,
        offline_rl={"updates_per_iteration": 10, "batch_size": 32, "hidden": [32, 32]},
        options={"bc_steps": 15, "bc_actor_lr": 1e-3},
    )
    assert job_module.main(["--config", path]) == 0
    assert seen == [10**9, 10**9, 0]
