"""UNEX-RL: the cascading information chain rebuilds observations exactly, CQR maps rewards to
within-cell quantiles, stop-gradient blocks the named gradient paths, and the critic and the three
stage policies train end to end through RLlib (and hot-update the Ray stage actors)."""

import uuid
from unittest.mock import patch

import numpy as np
import pytest
import ray
import torch
import yaml
from gymnasium import spaces

from actors.cascade import build_world
from actors.served_policies import mlp_act, mlp_layers, stage_policy_store
from actors.stage_actors import StageActor
from actors.stages import DEFAULT_PARAMS, STAGE_ACTION_HIGH, STAGES, RequestBatch
from actors.world import PipelineConfig, WorldConfig
from rllib_policies.envs import MultiStageEnv
from rllib_policies.train_unex_rl import main as train_main
from rllib_policies.unex_rl import ARMS, CategoryQuantileRescaler, UnexRL, UnexRLConfig, stage_observations
from rllib_policies.unex_rl.learner import _bound_step, cascade, rebuild, search_action
from rllib_policies.unex_rl.modules import JOINT_ACTION_DIM, SCALE_WEIGHTS, GlobalCriticModule, StagePolicyModule
from rllib_policies.unex_rl.sampler import sample_sessions

TINY = {"world": {"n_items": 1500, "n_users": 400}, "pipeline": {"k_matching": 150, "k_pre_ranking": 30}}


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_cic_rebuilds_the_observations_the_env_produced():
    env = MultiStageEnv({**TINY, "seed": 1})
    obs, info = env.reset(seed=1)
    rng = np.random.default_rng(0)
    seen, raw, acts = {s: [] for s in STAGES}, [], {s: [] for s in STAGES}
    request = info["matching"]["request"]
    for _ in range(30):  # ten requests, three turns each
        stage = next(iter(obs))
        seen[stage].append(obs[stage])
        a = rng.uniform(0, STAGE_ACTION_HIGH[stage]).astype(np.float32)
        acts[stage].append(a)
        if stage == "matching":
            raw.append(request)
        obs, _, terms, _, infos = env.step({stage: a})
        if terms["__all__"]:
            break
        if "matching" in infos:
            request = infos["matching"]["request"]
    n = len(seen["ranking"])
    assert n >= 2
    r = _stack(raw[:n])
    req = RequestBatch(r["user"], r["history"], r["step"], r["clicks"], r["request_id"])
    rebuilt, _ = stage_observations(env.driver.pipeline, req, {s: np.stack(acts[s][:n]) for s in STAGES})
    for s in STAGES:
        np.testing.assert_allclose(rebuilt[s], np.stack(seen[s][:n]), atol=1e-6, err_msg=s)
    # a different upstream action changes the downstream observation (the cascading effect)
    other = {s: np.stack(acts[s][:n]) for s in STAGES}
    other["matching"] = np.tile(np.array([0.2, 1.0, 0.0, 0.5], np.float32), (n, 1))
    moved, _ = stage_observations(env.driver.pipeline, req, other)
    assert not np.allclose(moved["pre_ranking"], rebuilt["pre_ranking"])
    np.testing.assert_allclose(moved["matching"], rebuilt["matching"])


def test_sampler_transitions_replay_exactly():
    _, pipeline = build_world(TINY)
    policies = {s: _stage_policy(s, pipeline) for s in STAGES}
    batch, summary = sample_sessions(pipeline, policies, 6, np.random.default_rng(0))
    req = _requests(batch)
    rebuilt, _ = stage_observations(pipeline, req, {s: batch[f"act_{s}"] for s in STAGES})
    for s in STAGES:
        np.testing.assert_allclose(rebuilt[s], batch[f"obs_{s}"], atol=1e-6)
    assert summary["requests_per_session"] * 6 == len(batch["reward_s"]) and batch["done"].sum() == 6


@pytest.mark.parametrize(("correlation", "shared"), [(1.0, True), (0.0, False)])
def test_session_correlated_exploration_shares_one_draw_per_session(correlation, shared):
    """explore_correlation 1: a session's requests are explored with one noise draw (a − μ(o) is the same
    wherever the action is not clipped); 0: every request draws its own."""
    _, pipeline = build_world(TINY)
    policies = {s: _stage_policy(s, pipeline) for s in STAGES}
    batch, _ = sample_sessions(
        pipeline, policies, 6, np.random.default_rng(2), explore_std=0.05, explore_correlation=correlation
    )
    nxt = dict(zip(batch["request_id"], batch["next_request_id"]))
    first = set(batch["request_id"]) - set(batch["next_request_id"][~batch["done"]])
    row = {r: i for i, r in enumerate(batch["request_id"])}
    s = "ranking"
    with torch.no_grad():
        offset = batch[f"act_{s}"] - policies[s].act(torch.as_tensor(batch[f"obs_{s}"])).numpy()
    inside = ((batch[f"act_{s}"] > 0) & (batch[f"act_{s}"] < STAGE_ACTION_HIGH[s])).all(axis=1)
    compared = 0
    for r in first:  # walk each session's requests in order
        rows = [row[r]]
        while not batch["done"][rows[-1]]:
            rows.append(row[nxt[batch["request_id"][rows[-1]]]])
        rows = [i for i in rows if inside[i]]
        if len(rows) >= 2:
            compared += 1
            assert np.allclose(offset[rows], offset[rows[0]], atol=1e-4) == shared
    assert compared >= 3


def test_cqr_maps_rewards_to_within_cell_quantiles():
    cqr = CategoryQuantileRescaler(n_user_groups=2, n_item_groups=2, window=100)
    cqr.update(np.arange(100.0), np.zeros(100, int), np.zeros(100, int))  # cell (0, 0): 0 … 99
    cqr.update(np.arange(0.0, 1000.0, 10.0), np.ones(100, int), np.zeros(100, int))  # cell (1, 0): 0 … 990
    r = np.array([-1.0, 0.0, 49.5, 99.0, 200.0, 495.0, 7.0])
    ug = np.array([0, 0, 0, 0, 0, 1, 1])
    ig = np.array([0, 0, 0, 0, 0, 0, 1])
    q = cqr.quantiles(r, ug, ig)
    np.testing.assert_allclose(q, [0.0, 0.005, 0.5, 0.995, 1.0, 0.5, 0.5])  # last: an empty cell → ½
    # within a cell, its own rewards map to uniform quantiles: (i + ½)/n
    np.testing.assert_allclose(
        cqr.quantiles(np.arange(100.0), np.zeros(100, int), np.zeros(100, int)), (np.arange(100) + 0.5) / 100
    )
    # the same reward in different cells gets its own cell's quantile
    assert cqr.quantiles(np.array([50.0, 50.0]), np.array([0, 1]), np.array([0, 0])).tolist() == pytest.approx(
        [0.505, 0.055]
    )
    cqr.update(np.full(100, 1000.0), np.zeros(100, int), np.zeros(100, int))  # the window keeps the last 100
    assert cqr.quantiles(np.array([999.0]), np.array([0]), np.array([0]))[0] == 0.0


def _requests(b: dict) -> RequestBatch:
    return RequestBatch(b["user"], b["history"], b["step"], b["clicks"], b["request_id"])


def _stage_policy(stage, pipeline, hidden=(16,)):
    torch.manual_seed(len(stage))
    d = pipeline.spec.dim
    return StagePolicyModule(
        observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
        action_space=spaces.Box(np.zeros(len(STAGE_ACTION_HIGH[stage]), np.float32), STAGE_ACTION_HIGH[stage]),
        model_config={"hidden": hidden, "init": DEFAULT_PARAMS[stage].tolist()},
    )


def test_scale_free_critic_ignores_each_stages_scale():
    """critic_scale_free: Q_g(o, a) is the same when one stage's scale weights are multiplied by c > 0 (the
    cascade serves the same items) and moves when a direction or matching's w_history does."""
    torch.manual_seed(0)
    d = 12
    critic = GlobalCriticModule(
        observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
        action_space=spaces.Box(0, 1, (JOINT_ACTION_DIM,), np.float32),
        model_config={"obs_dim": d, "scale_free": True},
    )
    obs, a = torch.randn(6, d), 0.1 + 0.4 * torch.rand(6, JOINT_ACTION_DIM)
    q = critic.value(obs, a)
    offset = 0
    for s in STAGES:
        cols = offset + torch.tensor(SCALE_WEIGHTS[s])
        scaled, turned = a.clone(), a.clone()
        scaled[:, cols] *= 1.8
        turned[:, cols[0]] *= 1.8
        torch.testing.assert_close(critic.value(obs, scaled), q, rtol=1e-3, atol=1e-3)
        assert (critic.value(obs, turned) - q).abs().max() > 1e-3
        offset += len(STAGE_ACTION_HIGH[s])
    history = a.clone()
    history[:, 2] *= 1.8  # matching's w_history: not a scale weight
    assert (critic.value(obs, history) - q).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the global critic"):
        GlobalCriticModule(
            observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
            action_space=spaces.Box(0, 1, (JOINT_ACTION_DIM,), np.float32),
            model_config={"obs_dim": d, "scale_free": True, "n_critics": 3},
        )


def test_stop_gradient_blocks_the_paths_through_downstream_stages():
    """Through the learner's own cascade: with SG, ∂(−Q)/∂θ_k equals the gradient through ã_k's own
    critic input only (k = matching and pre_ranking); without SG it also flows through the
    downstream policies and differs; SG leaves each downstream policy's own gradient in place."""
    _, pipeline = build_world(TINY)
    policies = {s: _stage_policy(s, pipeline) for s in STAGES}
    for a in policies.values():  # non-trivial weights so every path carries gradient
        with torch.no_grad():
            a.pi[-1].weight.normal_(0, 0.3)
    d = pipeline.spec.dim
    critic = GlobalCriticModule(
        observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
        action_space=spaces.Box(0, 1, (JOINT_ACTION_DIM,), np.float32),
        model_config={"obs_dim": d},
    )
    batch, _ = sample_sessions(pipeline, policies, 4, np.random.default_rng(1))
    req = _requests(batch)
    ctx = torch.as_tensor(batch["context"])
    stored = {s: torch.as_tensor(batch[f"obs_{s}"]) for s in STAGES}

    def grads(stop_gradient: bool, direct_only: str | None = None) -> dict:
        """θ gradients of −Q(o_1, ã); ``direct_only``: that stage's action reaches Q only directly
        (its copy fed downstream is detached by hand)."""
        for m in policies.values():
            m.zero_grad()
        if direct_only is None:
            act = cascade(pipeline, policies, stored, ctx, req, target=False, cic=True, stop_gradient=stop_gradient)
        else:
            act = {}
            for s in STAGES:
                up = {k: (v.detach() if k == direct_only else v) for k, v in act.items()}
                o = stored[s] if s == "matching" else rebuild(pipeline, req, ctx, up, s, False)
                act[s] = policies[s].act(o)
        joint = torch.cat([act[s] / policies[s].high for s in STAGES], -1)
        (-critic.value(stored["matching"], joint).mean()).backward()
        return {s: torch.cat([p.grad.flatten() for p in policies[s].pi.parameters()]) for s in STAGES}

    with_sg, without_sg = grads(True), grads(False)
    for stage in ("matching", "pre_ranking"):
        direct = grads(False, direct_only=stage)
        torch.testing.assert_close(with_sg[stage], direct[stage])
        assert (without_sg[stage] - with_sg[stage]).abs().max() > 1e-3 * with_sg[stage].abs().max(), stage
    assert all(with_sg[s].abs().sum() > 0 for s in STAGES)  # every stage policy still learns under SG
    torch.testing.assert_close(with_sg["ranking"], without_sg["ranking"])  # nothing is downstream of ranking


def test_twin_critic_targets_the_smaller_head():
    """TD3's clipped double-Q: two heads per critic, the target value is their element-wise minimum."""
    d = 6
    critic = GlobalCriticModule(
        observation_space=spaces.Box(-np.inf, np.inf, (d,), np.float32),
        action_space=spaces.Box(0, 1, (JOINT_ACTION_DIM,), np.float32),
        model_config={"obs_dim": d, "twin": True},
    )
    critic.make_target_networks()
    obs, act = torch.randn(64, d), torch.rand(64, JOINT_ACTION_DIM)
    q1, q2 = critic.values(obs, act, target=True)
    assert len(critic.q) == 2 and not torch.allclose(q1, q2)
    torch.testing.assert_close(critic.target_value(obs, act), torch.minimum(q1, q2))
    single = GlobalCriticModule(
        observation_space=critic.observation_space, action_space=critic.action_space, model_config={"obs_dim": d}
    )
    single.make_target_networks()
    torch.testing.assert_close(single.target_value(obs, act), single.value(obs, act, target=True))


@pytest.mark.parametrize("scale", [0.0, 0.01, 3.0])
def test_step_bound_shortens_a_long_step_towards_the_start(scale):
    """After a parameter step of any size, the deterministic action moved at most δ (mean over the
    observations, per dimension, as a fraction of the range); a step inside the bound is kept as it is,
    a longer one is shortened (not undone: the policy still moves)."""
    _, pipeline = build_world(TINY)
    policy = _stage_policy("matching", pipeline)
    obs = torch.randn(128, pipeline.spec.dim)
    anchor = {k: v.clone() for k, v in policy.pi.state_dict().items()}
    with torch.no_grad():
        for p in policy.pi.parameters():
            p.add_(scale * torch.randn_like(p))
    stepped = {k: v.clone() for k, v in policy.pi.state_dict().items()}
    with torch.no_grad():
        moved = policy.act(obs)
        policy.pi.load_state_dict(anchor)
        start = policy.act(obs)
        policy.pi.load_state_dict(stepped)
    free = float(((moved - start).abs().mean(0) / policy.high).max())
    delta = 0.05
    d = _bound_step(policy, anchor, obs, delta)
    with torch.no_grad():
        after = float(((policy.act(obs) - start).abs().mean(0) / policy.high).max())
    assert d == pytest.approx(after, abs=1e-6) and after <= delta + 1e-6
    if free <= delta:
        assert all(torch.equal(v, stepped[k]) for k, v in policy.pi.state_dict().items())
    else:
        assert delta / 4 < after  # shortened, not undone


def test_action_search_takes_the_critics_best_candidate_on_the_free_dimensions():
    """a* is one of the candidates (ã itself or a clipped perturbation of it), never worse than ã by the
    critic; on a critic that grows with the first action it climbs where ∇_a Q̂ at ã is zero (a plateau),
    and frozen dimensions stay put."""
    torch.manual_seed(0)
    base = torch.full((256, 3), 0.1)
    plateau = lambda a: torch.relu(a[:, 0] - 0.2)  # noqa: E731 (flat at ã: the policy gradient is 0)
    free = torch.tensor([1.0, 1.0, 0.0])
    best = search_action(plateau, base, 0.3, free, 16)
    assert best.shape == base.shape and (best >= 0).all() and (best <= 1).all()
    assert (plateau(best) >= plateau(base)).all() and best[:, 0].mean() > 0.3
    assert torch.equal(best[:, 2], base[:, 2])  # a frozen stage's action is not searched
    assert torch.equal(search_action(plateau, base, 0.3, free, 1), base)  # one candidate: ã itself
    ones = search_action(lambda a: -a.sum(-1), base, 0.3, None, 8)  # every dimension searched, downwards
    assert (ones.sum(-1) <= base.sum(-1) + 1e-6).all() and ones.sum(-1).mean() < base.sum(-1).mean() - 0.1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_action_step": 0.0}, "max_action_step"),
        ({"max_action_step": -0.1}, "max_action_step"),
        ({"max_action_step": 1.5}, "max_action_step"),
        ({"tau": 0.0}, "tau"),
        ({"critic": "twin"}, "critic"),
        ({"search_candidates": -1}, "search_candidates"),
        ({"search_weight": -0.5}, "search_weight"),
        ({"search_std": 0.0}, "search_std"),
        ({"explore_std": 0.0}, "explore_std"),
        ({"explore_std": {"matching": -0.1}}, "explore_std"),
        ({"explore_std": {"matchin": 0.3}}, "unknown stage"),
        ({"incumbent_window": -1}, "incumbent_window"),
        ({"critic_scale_free": True, "critic": "independent"}, "critic_scale_free reads the joint action"),
        ({"explore_correlation": 1.5}, "explore_correlation must be in"),
        ({"explore_correlation": -0.1}, "explore_correlation must be in"),
        ({"explore_correlation": 0.5, "sampler": "env_runner"}, "explore_correlation draws per session"),
        ({"actor_lr": [[5, 1e-3], [10, 1e-4]]}, "`actor_lr` schedule, the first timestep must be 0"),
        ({"actor_lr": [[0, 1e-3]]}, "Invalid `actor_lr`"),
        ({"cqr_relabel": True}, "cqr_relabel re-scores CQR quantiles: it needs cqr=True"),
        ({"explore_schedule": [[10, 1.0], [20, 0.5]]}, "explore_schedule must be .* from sessions 0"),
        ({"explore_schedule": [[0, 1.0], [20, 0.0]]}, "explore_schedule must be .* factors > 0"),
        ({"explore_schedule": [[0, 1.0], [20, 0.5], [10, 0.5]]}, "explore_schedule must be .* non-decreasing"),
        ({"explore_schedule": [[0, 1.0, 2.0]]}, "explore_schedule must be"),
        ({"explore_schedule": [[0, 1.0], [5]]}, "explore_schedule must be"),
        ({"explore_schedule": []}, "explore_schedule must be"),
        ({"explore_schedule": [[0, 1.0], [10, float("nan")]]}, "explore_schedule must be .* finite"),
        ({"critic": "independent"}, "critic_scale_free=False with critic='independent'"),
        (
            {"explore_schedule": [[0, 1.0]], "sampler": "env_runner"},
            "explore_schedule scales the vectorised sampler's noise",
        ),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        UnexRLConfig().environment(MultiStageEnv, env_config=TINY).unex_rl(**options).validate()


def test_exploration_scale_per_stage():
    cfg = UnexRLConfig().environment(MultiStageEnv, env_config=TINY).unex_rl(explore_std={"matching": 0.4})
    assert [cfg.explore_std_of(s) for s in STAGES] == [0.4, 0.2, 0.2]  # the others: EXPLORE_STD
    specs = cfg.get_multi_rl_module_spec(env=MultiStageEnv(TINY), spaces=None).rl_module_specs
    assert [specs[s].model_config["explore_std"] for s in STAGES] == [0.4, 0.2, 0.2]


@pytest.mark.ray
def test_explore_schedule_narrows_the_sampled_noise(ray_session):
    """f is piecewise linear in the sessions sampled, its last factor held; the sampler serves σ_k·f."""
    cfg = UnexRLConfig().unex_rl(explore_schedule=[[0, 1.0], [100, 1.0], [300, 0.5]])
    assert [cfg.explore_factor(n) for n in (0, 100, 200, 300, 10_000)] == [1.0, 1.0, 0.75, 0.5, 0.5]
    assert UnexRLConfig().explore_factor(10_000) == 1.0  # no schedule: constant
    algo = _config().unex_rl(explore_schedule=[[0, 1.0], [8, 0.25]], explore_std=0.2).build_algo()
    try:
        widths = []
        for _ in range(2):  # 8 sessions an iteration: the first samples at σ, the second at σ/4
            with patch("rllib_policies.unex_rl.algorithm.sample_sessions", wraps=sample_sessions) as spy:
                algo.train()
            widths.append(spy.call_args.kwargs["explore_std"])
        assert widths == [dict.fromkeys(STAGES, 0.2), dict.fromkeys(STAGES, 0.05)]
    finally:
        algo.stop()


def test_the_independent_arm_reads_raw_actions_and_the_default_reads_directions():
    assert UnexRLConfig().critic_scale_free and UnexRLConfig().unex_rl(arm="unex_rl").critic_scale_free
    independent = UnexRLConfig().environment(MultiStageEnv, env_config=TINY).unex_rl(arm="independent")
    independent.validate()  # no error: the arm turns the scale-free critic off
    assert not independent.critic_scale_free


@pytest.mark.ray
def test_a_checkpoint_resumes_only_with_the_critic_input_it_was_trained_on(ray_session):
    algo = _config().build_algo()
    try:
        state = algo.own_state()
        assert state["critic_scale_free"] is True
        algo.set_own_state(state)  # the same setting: resumes
        with pytest.raises(ValueError, match="trained with critic_scale_free=False"):
            algo.set_own_state({**state, "critic_scale_free": False})
        with pytest.warns(UserWarning, match="predates the record of critic_scale_free"):
            algo.set_own_state({k: v for k, v in state.items() if k != "critic_scale_free"})
    finally:
        algo.stop()


def _config(arm="unex_rl", **learners):
    return (
        UnexRLConfig()
        .environment(MultiStageEnv, env_config=TINY)
        .unex_rl(
            arm=arm,
            sessions_per_iteration=8,
            updates_per_iteration=3,
            minibatch_size=32,
            hidden=(16,),
            actor_warmup_iterations=0,
        )
        .learners(**learners)
        .debugging(seed=0, log_level="ERROR")
    )


def test_options_are_keyword_only_and_an_arm_resets_the_switches():
    cfg = UnexRLConfig()
    assert {k: getattr(cfg, k) for k in ARMS["unex_rl"]} == ARMS["unex_rl"]  # the defaults are UNEX-RL's
    cfg.unex_rl(cic=False, tau=0.5)
    cfg.unex_rl(arm="single_agent", cqr=True)  # the switches: UNEX-RL's, then the arm's, then the explicit ones
    assert (cfg.cic, cfg.cqr, cfg.trainable_stages, cfg.tau) == (True, True, ("ranking",), 0.5)
    with pytest.raises(TypeError, match="cqr_windw"):
        cfg.unex_rl(cqr_windw=3)
    with pytest.raises(ValueError, match="arm"):
        cfg.unex_rl(arm="no_such_arm")


@pytest.mark.ray
def test_target_networks_track_by_polyak_averaging(ray_session):
    """RLlib's TargetNetworkAPI on the learner: after one update θ' = τ·θ + (1 − τ)·θ'_before; the
    env runners' and the driver's stage policies are inference-only (no target network)."""
    algo = _config().unex_rl(updates_per_iteration=1, tau=0.3).build_algo()
    try:
        ids = (*STAGES, "global_critic")
        before = {m: {k: v.copy() for k, v in w.items()} for m, w in algo.learner_group.get_weights(ids).items()}
        algo.train()
        after = algo.learner_group.get_weights(ids)
        for m, prefix in [(s, "pi.") for s in STAGES] + [("global_critic", "q.")]:
            for k in (k for k in after[m] if k.startswith(prefix)):
                target = "target_" + k
                np.testing.assert_allclose(after[m][target], 0.3 * after[m][k] + 0.7 * before[m][target], atol=1e-6)
        for s in STAGES:
            assert not any(k.startswith("target_") for k in algo.stage_policies[s].state_dict())
            assert not any(k.startswith("target_") for k in algo.get_module(s).state_dict())
    finally:
        algo.stop()


@pytest.mark.ray
def test_actor_lr_schedule_follows_the_sessions_sampled(ray_session):
    """``actor_lr`` as RLlib's schedule [[sessions, lr], …]: after each iteration the stage policies' Adam lr is the
    schedule at the sessions sampled so far (8 an iteration), linear between points; the critic keeps ``lr``."""
    algo = _config().unex_rl(actor_lr=[[0, 1e-3], [16, 1e-4]]).build_algo()
    try:
        lrs = []
        for _ in range(3):
            learners = algo.train()["learners"]
            lrs.append([learners[s]["default_optimizer_learning_rate"] for s in STAGES])
        np.testing.assert_allclose(lrs, [[5.5e-4] * 3, [1e-4] * 3, [1e-4] * 3], rtol=1e-6)
        assert learners["global_critic"]["default_optimizer_learning_rate"] == pytest.approx(algo.config.lr)
    finally:
        algo.stop()


@pytest.mark.ray
@pytest.mark.parametrize("arm", ["unex_rl", "independent", "no_cic", "single_agent"])
def test_critic_and_stage_policies_train_end_to_end(ray_session, arm):
    """Every arm trains, here with the twin critics and the step bound on (both off by default) and the
    critic-guided action search."""
    algo = _config(arm).unex_rl(twin_q=True, max_action_step=0.05, search_candidates=4).build_algo()
    try:
        before = {s: {k: v.copy() for k, v in algo.learner_group.get_weights([s])[s].items()} for s in STAGES}
        for _ in range(2):
            res = algo.train()
        out, learner = res["unex_rl"], res["learners"]["global_critic"]
        assert out["policy_version"] == 2 and out["buffer_size"] > 0 and np.isfinite(learner["critic_loss"])
        assert 0 < learner["action_step"] <= algo.config.max_action_step + 1e-6  # the step bound held
        after = algo.learner_group.get_weights(list(STAGES))
        moved = {
            s: any(not np.allclose(before[s][k], after[s][k]) for k in before[s] if k.startswith("pi.")) for s in STAGES
        }
        expected = (
            {s: True for s in STAGES}
            if arm != "single_agent"
            else {"matching": False, "pre_ranking": False, "ranking": True}
        )
        assert moved == expected
        assert set(algo.evaluate_policy(20)) >= {"usage_s_per_session", "return_rate", "ndcg_at_10"}
    finally:
        algo.stop()


@pytest.mark.ray
def test_incumbent_is_the_best_windows_centre_is_served_and_survives_a_checkpoint(ray_session, tmp_path):
    algo = _config().unex_rl(incumbent_window=3).build_algo()
    try:
        assert algo.deployed_policies is algo.stage_policies  # no window closed yet: the latest
        for i, usage in enumerate([1, 5, 9, 2, 8, 8, 8]):  # windows 5, 5.3, 6.3 (centre 3), 6, 8 (centre 5)
            algo.stage_policies = {"tag": i}
            algo._track_incumbent(usage)
            if i == 4:
                assert algo.deployed_policies == {"tag": 3} and algo.incumbent_usage == pytest.approx(19 / 3)
        assert algo.deployed_policies == {"tag": 5} and algo.incumbent_usage == 8
        algo.recent, algo.incumbent, algo.incumbent_usage = [], None, -np.inf
        algo._sync_stage_policies()
        for _ in range(4):
            algo.train()
        best = algo.incumbent_usage
        assert np.isfinite(best) and algo.deployed_policies is algo.incumbent
        assert 3 <= algo.policy_version <= 4  # published while no window had closed, then only on a new incumbent
        served = algo._policy_states()  # what the hot update publishes: the incumbent's weights
        for s in STAGES:
            for k, v in algo.incumbent[s].pi.state_dict().items():
                np.testing.assert_array_equal(served[s][k], v.numpy())
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        restored = UnexRL.from_checkpoint(path)
        try:
            assert restored.incumbent_usage == best and len(restored.recent) == 3
            back = restored._policy_states()
            for s in STAGES:
                for k in served[s]:
                    np.testing.assert_array_equal(back[s][k], served[s][k])
        finally:
            restored.stop()
    finally:
        algo.stop()


def test_stage_actors_are_hot_updated_and_checkpoints_resume(ray_session, tmp_path):
    algo = _config().unex_rl(cqr=True).build_algo()  # CQR on: its cells are part of the checkpoint
    runners = {
        s: StageActor.remote(s, WorldConfig.preset("default", **TINY["world"]), PipelineConfig(**TINY["pipeline"]))
        for s in STAGES
    }
    prefix = f"unex_serve_{uuid.uuid4().hex[:8]}"
    try:
        algo.attach_stage_actors(runners)
        algo.attach_serve_stages(prefix)  # the Serve stage deployments' policy stores, as the recommend app reads them
        algo.train()
        obs = np.random.default_rng(0).standard_normal((5, algo.pipeline.spec.dim)).astype(np.float32)
        for s in STAGES:
            acted, version = ray.get(runners[s].act.remote(obs))
            assert version == algo.policy_version == 1
            expected = algo.stage_policies[s].act(torch.as_tensor(obs)).detach().numpy()
            np.testing.assert_allclose(acted, expected, rtol=1e-5, atol=1e-5)
            snap = ray.get(stage_policy_store(prefix, s).get.remote())  # attach published v2, the round v3
            assert snap.version == 3
            served = mlp_act(mlp_layers(snap.params["mlp_state"]), np.asarray(snap.params["high"]), obs)
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        buffered = len(algo.buffer)
        saved = {s: algo.learner_group.get_weights([s])[s] for s in (*STAGES, "global_critic")}
        algo.train()
        continued = algo.learner_group.get_weights(["ranking"])["ranking"]
        restored = UnexRL.from_checkpoint(path)
        try:
            assert restored.sessions_seen == 8 and restored.policy_version == 1 and len(restored.buffer) == buffered
            for s, w in saved.items():  # weights and target networks as they were at the checkpoint
                back = restored.learner_group.get_weights([s])[s]
                assert all(np.allclose(back[k], w[k]) for k in w), s
            assert restored.cqr.state() and set(restored.cqr.state()) <= {
                f"{u},{i}" for u in range(3) for i in range(5)
            }
            restored.train()
            assert restored.policy_version == 2 and restored.sessions_seen == 16
            assert set(restored.learner_group.get_weights(["ranking"])["ranking"]) == set(continued)
        finally:
            restored.stop()
    finally:
        algo.stop()
        for r in runners.values():
            ray.kill(r)


@pytest.mark.ray
def test_two_learners_keep_identical_stage_policies_and_critic(ray_session):
    algo = (
        _config(num_learners=2, num_cpus_per_learner=0.5)
        .unex_rl(actor_warmup_iterations=0, policy_delay=1)
        .build_algo()
    )
    try:
        res = algo.train()
        assert np.isfinite(res["learners"]["global_critic"]["critic_loss"])
        states = [
            r.get()
            for r in algo.learner_group.foreach_learner(
                lambda learner: {
                    s: {k: v.detach().numpy().copy() for k, v in learner.module[s].unwrapped().state_dict().items()}
                    for s in (*STAGES, "global_critic")
                }
            )
        ]
        assert len(states) == 2
        for s in states[0]:  # data-parallel: both learners hold the same (updated) parameters
            assert all(np.allclose(states[0][s][k], states[1][s][k], atol=1e-6) for k in states[0][s]), s
    finally:
        algo.stop()


@pytest.mark.ray
def test_job_trains_checkpoints_and_resumes(ray_session, tmp_path, capsys):
    cfg = {
        "env_config": TINY,
        "unex_rl": {
            "arm": "unex_rl",
            "sessions_per_iteration": 6,
            "updates_per_iteration": 2,
            "minibatch_size": 16,
            "hidden": [16],
        },
        "iterations": 2,
        "checkpoint_dir": str(tmp_path / "runs"),
        "checkpoint_every": 1,
        "eval_sessions": 10,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "c.yaml")]) == 0
    cfg["iterations"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "c.yaml"), "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "iter    1 |" in out and "iter    2 |" in out and "resumed from" in out and "iter    3 |" in out
    assert (tmp_path / "runs" / "iter_000003").exists() and "usage_s_per_session" in out


@pytest.mark.ray
def test_env_runner_sampling_on_the_multi_agent_env(ray_session):
    """The same algorithm sampling through RLlib's MultiAgentEnvRunner on MultiStageEnv: transitions
    carry the env's observations, which the CIC replay reproduces exactly."""
    algo = (
        UnexRLConfig()
        .environment(MultiStageEnv, env_config={**TINY, "reward": "usage"})
        .unex_rl(
            sampler="env_runner",
            sessions_per_iteration=3,
            updates_per_iteration=2,
            minibatch_size=16,
            hidden=(16,),
            actor_warmup_iterations=0,
        )
        .debugging(seed=0, log_level="ERROR")
        .build_algo()
    )
    try:
        res = algo.train()
        assert res["unex_rl"]["usage_s_per_session"] >= 0 and np.isfinite(
            res["learners"]["global_critic"]["critic_loss"]
        )
        b = {k: v[: len(algo.buffer)] for k, v in algo.buffer.data.items()}
        assert b["done"].sum() == 3
        rebuilt, _ = stage_observations(algo.pipeline, _requests(b), {s: b[f"act_{s}"] for s in STAGES})
        for s in STAGES:
            np.testing.assert_allclose(rebuilt[s], b[f"obs_{s}"], atol=1e-5, err_msg=s)
    finally:
        algo.stop()
    with pytest.raises(ValueError, match="reward"):
        UnexRLConfig().environment(MultiStageEnv, env_config=TINY).unex_rl(sampler="env_runner").validate()
