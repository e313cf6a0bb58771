"""The outer controller's signals, policy distribution (log-prob, entropy, KL), padding and
inner-reward fit against hand-computed values (no Ray)."""

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian

from rllib_policies.credit import KappaSchedule
from rllib_policies.outer_controller import OuterSignals, RankingPolicyModule, SessionBatch, SignalConfig
from rllib_policies.outer_controller.algorithm import kpi_shrinkage_weights
from rllib_policies.outer_controller.module import SimplexLogisticNormal
from rllib_policies.outer_controller.rails import fit_inner_reward_weights
from rllib_policies.outer_controller.sessions import from_trajectories, pad_sessions


def two_sessions(inner=(1.0, 2.0, 4.0)) -> SessionBatch:
    """Session 0: two steps (rewards inner[0], inner[1]); session 1: one step (inner[2])."""
    return SessionBatch(
        obs=np.zeros((3, 2), np.float32),
        actions=np.zeros((3, 3), np.float32),
        inner_reward=np.array(inner),
        engaged=np.array([True, False, True]),
        session=np.array([0, 0, 1]),
        t=np.array([0, 1, 0]),
        kpis={
            "revenue": np.array([10.0, 0.0]),
            "return": np.array([1.0, 0.0]),
            "ndcg": np.array([0.5, 0.3]),
            "clicks": np.array([3.0, 1.0]),
        },
    )


def config(**kw) -> SignalConfig:
    base = dict(gamma=0.5, baseline=False, min_sessions_for_kpi=0, kpi_weights={"revenue": 0.1, "return": 1.0})
    return SignalConfig(**{**base, **kw})


def policy(seed: int) -> RankingPolicyModule:
    torch.manual_seed(seed)
    return RankingPolicyModule(
        observation_space=spaces.Box(-np.inf, np.inf, (4,), np.float32),
        action_space=spaces.Box(np.zeros(3, np.float32), np.array([2.0, 2.0, 40.0], np.float32)),
    )


def test_diag_gaussian_kl_hand_computed():
    # KL(N(0,1) ‖ N(1,2²)) = ln 2 + (1 + 1)/8 − 1/2
    p = TorchDiagGaussian(loc=torch.zeros(1, 1), scale=torch.ones(1, 1))
    q = TorchDiagGaussian(loc=torch.ones(1, 1), scale=torch.full((1, 1), 2.0))
    assert p.kl(q).item() == pytest.approx(math.log(2) + 0.25 - 0.5)
    same = TorchDiagGaussian(loc=torch.ones(2, 3), scale=torch.ones(2, 3))
    assert same.kl(same).tolist() == pytest.approx([0, 0])


def test_policy_log_prob_entropy_and_kl_match_the_logistic_normal_by_hand():
    p, q = policy(0), policy(1)
    with torch.no_grad():
        q.log_std.add_(0.3)
    assert issubclass(p.get_train_action_dist_cls(), SimplexLogisticNormal)
    assert p.get_train_action_dist_cls() is p.get_exploration_action_dist_cls()
    obs = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    x = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(3)), -1)  # shares on the simplex
    actions = x * p.high
    with torch.no_grad():
        logp, entropy = p.log_prob(obs, actions)
        scaled = p.log_prob(obs, 0.5 * actions)[0]  # only the direction matters
        kl = p.action_dist(obs).kl(q.action_dist(obs))
        (mp, lsp), (mq, lsq) = p.logits(obs), q.logits(obs)
        # what the env runners sample from: the RLlib distribution over the forward pass's outputs
        inputs = p.forward_exploration({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        explore = p.get_exploration_action_dist_cls().from_logits(inputs)
        samples = explore.sample()
        served = explore.to_deterministic().sample()
    assert mp.shape == (6, 2)  # K − 1 = 2 degrees of freedom
    var_p, var_q = torch.exp(2 * lsp), torch.exp(2 * lsq)
    u = torch.log(x[:, :2] / x[:, 2:])
    # log π(a) = log N(u; m, σ²) − Σ_k log x_k, u_k = log(x_k/x_K);  H = Σ_i log σ_i + ½ log 2πe
    gauss = -0.5 * ((u - mp) ** 2 / var_p + 2 * lsp + math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(logp, gauss - torch.log(x).sum(-1))
    torch.testing.assert_close(scaled, logp)
    torch.testing.assert_close(entropy, (lsp + 0.5 * math.log(2 * math.pi * math.e)).sum(-1))
    # KL(p ‖ q) over u = Σ_i log σq/σp + (σp² + (mp − mq)²)/(2σq²) − ½ (the same for a: a bijection)
    torch.testing.assert_close(kl, (lsq - lsp + (var_p + (mp - mq) ** 2) / (2 * var_q) - 0.5).sum(-1))
    assert kl.min() > 0
    torch.testing.assert_close(explore.logp(actions), logp)
    assert ((samples >= 0) & (samples <= p.high)).all()  # inside the box: nothing for the env to clip
    torch.testing.assert_close((samples / p.high).sum(-1), torch.ones(6))  # on the simplex
    torch.testing.assert_close(served, p.gaussian(obs)[0])  # explore=False serves μ(s)
    torch.testing.assert_close(served, p.high * torch.softmax(torch.cat([mp, torch.zeros(6, 1)], -1), -1))


def test_logistic_normal_density_integrates_to_one_on_the_simplex():
    """∫ π(a) over the simplex's shares (x1, x2) = 1: the Jacobian term is right."""
    dist = SimplexLogisticNormal(loc=torch.tensor([[0.5, -1.0]]), scale=torch.tensor([[0.8, 1.2]]))
    n = 400
    g = (torch.arange(n) + 0.5) / n
    x1, x2 = torch.meshgrid(g, g, indexing="ij")
    inside = (x1 + x2) < 1
    x = torch.stack([x1[inside], x2[inside], 1 - x1[inside] - x2[inside]], -1)
    density = dist.logp(x * dist.high).exp()
    assert float(density.sum() / n**2) == pytest.approx(1.0, abs=0.02)


def test_layered_signals_hand_computed():
    out = OuterSignals(config()).compute(two_sessions())
    # G: session 0 → [1 + 0.5·2, 2] = [2, 2]; session 1 → [4]
    np.testing.assert_allclose(out["step_signal"], [2.0, 2.0, 4.0])
    # R = 0.1·revenue + 1·return per session, broadcast over its steps
    np.testing.assert_allclose(out["outer_signal"], [2.0, 2.0, 0.0])
    assert out["kappa"][0] == pytest.approx(0.2)  # the gate is open (min 0): κ(0) = start


def test_monolithic_is_one_weighted_sum_with_the_session_reward_at_every_step():
    out = OuterSignals(config(arm="monolithic")).compute(two_sessions())
    # m = [1, 2 | 4], G = Σ γ^k·m + R with R = 0.1·revenue + return = [2 | 0] at every step
    np.testing.assert_allclose(out["step_signal"], [1 + 0.5 * 2 + 2, 2 + 2, 4 + 0])
    assert not out["outer_signal"].any() and not out["kappa"].any()


def with_steps(batch: SessionBatch) -> SessionBatch:
    """two_sessions with per-request parts: revenue [4, 6 | 0] (sums to 10, 0), NDCG [0.4, 0.6 | 0.3]
    (means 0.5, 0.3)."""
    batch.step_objectives = {"revenue": np.array([4.0, 6.0, 0.0]), "ndcg": np.array([0.4, 0.6, 0.3])}
    return batch


STEP_WEIGHTS = {"revenue": 0.1, "return": 1.0, "ndcg": 1.0}


def test_step_kpis_are_credited_where_they_were_earned():
    signals = OuterSignals(config(kpi_weights=STEP_WEIGHTS))
    d, r_session = signals.split_reward(with_steps(two_sessions()))
    # d = 0.1·revenue_t + NDCG_t / T: session 0 (T = 2) → [0.4 + 0.2, 0.6 + 0.3]; session 1 → [0 + 0.3]
    np.testing.assert_allclose(d, [0.6, 0.9, 0.3])
    np.testing.assert_allclose(r_session, [1.0, 0.0])  # the return alone stays a session reward
    # the parts add up to the blend: Σ_t d_t + R = Σ_k w_k·KPI_k
    np.testing.assert_allclose(np.bincount([0, 0, 1], d) + r_session, signals.outer_reward(two_sessions()))
    out = signals.compute(with_steps(two_sessions()))
    np.testing.assert_allclose(out["kpi_step_signal"], [0.6 + 0.5 * 0.9, 0.9, 0.3])  # D_t = Σ γ^k·d_{t+k}
    np.testing.assert_allclose(out["outer_signal"], [1.0, 1.0, 0.0])


def test_monolithic_sum_carries_the_step_kpis_per_step():
    out = OuterSignals(config(arm="monolithic", kpi_weights=STEP_WEIGHTS)).compute(with_steps(two_sessions()))
    # m = inner + d = [1.6, 2.9 | 4.3], G = Σ γ^k·m + return = [1.6 + 0.5·2.9 + 1, 2.9 + 1 | 4.3 + 0]
    np.testing.assert_allclose(out["step_signal"], [4.05, 3.9, 4.3])


def test_without_step_kpis_every_kpi_is_a_session_reward():
    signals = OuterSignals(config(kpi_weights=STEP_WEIGHTS, step_kpis=False))
    d, r_session = signals.split_reward(with_steps(two_sessions()))
    assert not d.any()
    np.testing.assert_allclose(r_session, [0.1 * 10 + 1 + 0.5, 0.3])


def test_step_kpi_baselines_share_one_scale():
    signals = OuterSignals(config(kpi_weights=STEP_WEIGHTS, baseline=True))
    batch = with_steps(two_sessions())
    out = signals.compute(batch)
    sigma = float(np.sqrt(signals.blend_baseline.var + signals.blend_baseline.eps))
    # first batch: μ_D, μ_R from this batch, σ_J = the KPI blend's spread across sessions
    d = np.array([0.6 + 0.5 * 0.9, 0.9, 0.3])
    np.testing.assert_allclose(out["kpi_step_signal"], (d - d.mean()) / sigma, rtol=1e-6)
    np.testing.assert_allclose(out["outer_signal"], (np.array([1.0, 1.0, 0.0]) - 0.5) / sigma, rtol=1e-6)


def test_rewards_are_clipped_to_plus_minus_5():
    out = OuterSignals(config(gamma=0.0)).compute(two_sessions(inner=(100.0, -100.0, 3.0)))
    np.testing.assert_allclose(out["step_signal"], [5.0, -5.0, 3.0])


def test_kpi_gate_keeps_kappa_at_zero_until_enough_sessions():
    signals = OuterSignals(config(min_sessions_for_kpi=3, kappa=KappaSchedule(0.2, 0.6, 2)))
    kappas = [signals.compute(two_sessions())["metrics"]["kappa"] for _ in range(4)]
    # 2 sessions seen → closed; 4 → open at κ(0) = 0.2, then 0.4, 0.6
    assert kappas == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert SignalConfig().min_sessions_for_kpi == 10_000


def test_no_annealing_uses_kappa_end_at_once():
    signals = OuterSignals(config(anneal=False, kappa=KappaSchedule(0.2, 0.6, 100)))
    assert signals.compute(two_sessions())["metrics"]["kappa"] == pytest.approx(0.6)


def test_kpi_weights_change_at_run_time_and_bad_ones_are_refused():
    signals = OuterSignals(config())
    np.testing.assert_allclose(signals.compute(two_sessions())["outer_signal"], [2.0, 2.0, 0.0])
    signals.set_kpi_weights({"ndcg": 2.0})
    np.testing.assert_allclose(signals.compute(two_sessions())["outer_signal"], [1.0, 1.0, 0.6])
    with pytest.raises(ValueError, match="unknown KPI 'dau'"):
        signals.set_kpi_weights({"dau": 1.0})
    with pytest.raises(ValueError, match=r"kpi_weights\['ndcg'\] must be finite"):
        signals.set_kpi_weights({"ndcg": float("nan")})
    assert signals.kpi_weights == {"ndcg": 2.0}  # a refused change leaves the old weights


def test_baseline_standardises_each_signal():
    signals = OuterSignals(config(baseline=True))
    out = signals.compute(two_sessions())
    assert (
        abs(out["step_signal"].mean()) < 1.0 and signals.inner_baseline.count == 3 and signals.outer_baseline.count == 2
    )
    state = signals.state()
    again = OuterSignals(config(baseline=True))
    again.set_state(state)
    assert again.state() == state


def test_pad_sessions_handles_a_session_cut_by_a_shard():
    session, t = torch.tensor([4, 4, 7, 7, 7]), torch.tensor([3, 4, 0, 1, 2])  # session 4 starts mid-way
    mask, sid, rel, (v,) = pad_sessions(session, t, torch.arange(5.0))
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert v.tolist() == [[0, 1, 0], [2, 3, 4]] and rel.tolist() == [0, 1, 0, 1, 2]


def test_inner_reward_fit_recovers_known_weights():
    rng = np.random.default_rng(0)
    f = np.abs(rng.normal(size=(4000, 4))) * [2, 5, 3, 1]
    true = np.array([1.0, 0.5, -0.3, 0.8])
    w = fit_inner_reward_weights(f, f @ true, ridge=1e-8)
    np.testing.assert_allclose([w["click_w"], w["dwell_w"], w["skip_penalty"], w["rel_w"]], true, atol=1e-4)
    with pytest.raises(ValueError, match=r"features must be \[N, 4\]"):
        fit_inner_reward_weights(f[:, :3], f @ true)


def test_trajectory_rows_without_observations_or_known_return_are_skipped():
    row = dict(
        observations=[[0.0, 1.0], [1.0, 0.0]],
        actions=[[1, 1, 1], [2, 2, 2]],
        rewards=[1.0, 2.0],
        clicks=[1, 0],
        step_revenue=[0.0, 3.0],
        session_revenue=3.0,
        session_clicks=1,
        returned=True,
    )
    batch = from_trajectories([row, {**row, "returned": None}, {**row, "observations": [None, None]}])
    assert batch.n_sessions == 1 and batch.obs.shape == (2, 2)
    assert batch.kpis["return"].tolist() == [1.0] and batch.engaged.tolist() == [True, False]
    with pytest.raises(ValueError, match="no trajectory rows"):
        from_trajectories([{**row, "returned": None}])


# ---------------------------------------------------------------------------------------------- per-session exploration
def test_per_session_signals_give_each_session_one_advantage_hand_computed():
    """κ = 1 (layered): S = R = 0.1·revenue + return = (2, 0) for the two sessions; without a baseline
    A_t = S/T: session 0 (T = 2) gives 1 per step, session 1 (T = 1) gives 0."""
    s = OuterSignals(config(per_session=True, anneal=False, kappa=KappaSchedule(end=1.0)))
    out = s.compute(two_sessions())
    assert out["step_signal"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert out["kappa"].tolist() == [0, 0, 0] and not out["kpi_step_signal"].any()
    assert out["part_names"] == ["inner", "revenue", "return"]
    assert np.allclose(out["session_parts"], [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_per_session_baseline_is_leave_one_out():
    """S = (2, 0, 5) over three sessions: Â_i = (S_i − mean of the others)/σ(S), so the baseline of a
    session never contains its own (action-dependent) outcome."""
    batch = SessionBatch(
        obs=np.zeros((3, 2), np.float32),
        actions=np.zeros((3, 3), np.float32),
        inner_reward=np.zeros(3),
        engaged=np.zeros(3, bool),
        session=np.array([0, 1, 2]),
        t=np.zeros(3, np.int64),
        kpis={"return": np.array([2.0, 0.0, 5.0])},
    )
    s = OuterSignals(config(per_session=True, baseline=True, kpi_weights={"return": 1.0}, gamma=0.0))
    objective = np.array([2.0, 0.0, 5.0])
    loo = (objective.sum() - objective) / 2
    expected = (objective - loo) / objective.std()  # κ·S: κ cancels in the standardisation
    assert s.compute(batch)["step_signal"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)


@pytest.mark.parametrize("signal, expected", [(1.0, 1.0), (0.0, 0.0)])
def test_kpi_shrinkage_keeps_a_measured_term_and_drops_noise(signal, expected):
    """Two terms over 4 000 sessions: term 0 = signal·ε₀ + noise (its gradient is (signal, 0)), term 1 pure
    noise. c₀ ≈ 1 when the signal is strong, ≈ 0 when there is none; c₁ ≈ 0 either way."""
    rng = np.random.default_rng(0)
    eps = rng.normal(size=(4000, 2))
    parts = np.stack([signal * eps[:, 0] + rng.normal(size=4000), rng.normal(size=4000)], axis=1)
    c = kpi_shrinkage_weights(parts, eps)
    assert c[0] == pytest.approx(expected, abs=0.05)
    assert c[1] < 0.05 or expected == 1.0 and c[1] < 0.2


def test_min_std_floors_the_exploration_scale():
    torch.manual_seed(0)
    module = RankingPolicyModule(
        observation_space=spaces.Box(-np.inf, np.inf, (4,), np.float32),
        action_space=spaces.Box(np.zeros(3, np.float32), np.array([2.0, 2.0, 40.0], np.float32)),
        model_config={"init_std": 6.0, "min_std": 6.0},
    )
    with torch.no_grad():
        module.log_std.fill_(0.0)  # σ = 1 below the floor
    assert np.allclose(module.logits(torch.zeros(2, 4))[1].exp().detach().numpy(), 6.0)


@pytest.mark.parametrize(
    "model_config, match",
    [
        ({"min_std": 0.0}, "min_std must be in"),
        ({"min_std": 9.0}, "min_std must be in"),
        ({"max_logit": 0.0}, "max_logit"),
    ],
)
def test_exploration_bounds_refuse_bad_values(model_config, match):
    with pytest.raises(ValueError, match=match):
        RankingPolicyModule(
            observation_space=spaces.Box(-np.inf, np.inf, (4,), np.float32),
            action_space=spaces.Box(np.zeros(3, np.float32), np.array([2.0, 2.0, 40.0], np.float32)),
            model_config=model_config,
        )
