"""Returns and credit formulas against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from rllib_policies.credit import (
    GatedAttentionCredit,
    KappaSchedule,
    RollingBaseline,
    clip_rewards,
    credit_weights,
    discounted_returns,
    kpi_blend,
    kpi_credit,
)


def test_discounted_returns_by_hand():
    r = np.array([[1.0, 0.0, 2.0, 5.0]])
    mask = np.array([[1, 1, 1, 0]])  # the session ended after 3 steps
    g = discounted_returns(r, 0.5, mask)
    # G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5; the padded step is 0
    np.testing.assert_allclose(g, [[1.5, 1.0, 2.0, 0.0]])
    np.testing.assert_allclose(discounted_returns(np.array([[1.0, 1.0, 1.0]]), 1.0), [[3.0, 2.0, 1.0]])
    np.testing.assert_allclose(discounted_returns(np.array([[1.0, 1.0]]), 0.0), [[1.0, 1.0]])
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(r, 1.5)


def test_kappa_schedule_starts_at_0_2_and_only_rises():
    k = KappaSchedule(start=0.2, end=0.6, anneal_iters=10)
    assert [k(i) for i in (0, 5, 10, 50)] == pytest.approx([0.2, 0.4, 0.6, 0.6])
    c = KappaSchedule(start=0.2, end=0.6, anneal_iters=10, kind="cosine")
    assert c(5) == pytest.approx(0.4) and c(0) == pytest.approx(0.2)
    assert all(np.diff([c(i) for i in range(20)]) >= 0)
    with pytest.raises(ValueError, match="start <= end"):
        KappaSchedule(start=0.7, end=0.2)


def test_kpi_blend_by_hand():
    g = np.array([[2.0, 1.0]])
    out = kpi_blend(g, np.array([[10.0, 4.0]]), kappa=0.2)
    np.testing.assert_allclose(out, [[0.8 * 2 + 0.2 * 10, 0.8 * 1 + 0.2 * 4]])
    # one κ per session (the learner's [B, 1] column), on torch tensors
    per_session = kpi_blend(torch.tensor([[2.0], [1.0]]), torch.tensor([[10.0], [10.0]]), torch.tensor([[0.0], [0.5]]))
    torch.testing.assert_close(per_session, torch.tensor([[2.0], [5.5]]))
    with pytest.raises(ValueError, match="kappa"):
        kpi_blend(g, g, 1.2)


def test_kpi_credit_spreads_the_outer_reward_over_the_session():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    uniform = credit_weights(None, torch.zeros(2, 3, 4), mask)
    torch.testing.assert_close(uniform, mask / torch.tensor([[3.0], [2.0]]))
    # uniform credit: R at every valid step (T·(1/T)·R), 0 on padding
    torch.testing.assert_close(
        kpi_credit(uniform, mask, torch.tensor([6.0, -1.0])), torch.tensor([[6.0, 6.0, 6.0], [-1.0, -1.0, 0.0]])
    )
    w = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(
        kpi_credit(w, mask, torch.tensor([4.0, 2.0])), torch.tensor([[6.0, 3.0, 3.0], [4.0, 0.0, 0.0]])
    )
    torch.manual_seed(0)
    attention = GatedAttentionCredit(d_in=4, d_k=8)
    x = torch.randn(2, 3, 4)
    learned = credit_weights(attention, x, mask)
    assert not learned.requires_grad  # the policy gradient does not train the credit network
    torch.testing.assert_close(learned, attention.weights(x, mask)[0].detach())


def test_clip_numpy_and_torch():
    np.testing.assert_array_equal(clip_rewards(np.array([-9.0, 0.5, 7.0])), [-5.0, 0.5, 5.0])
    assert clip_rewards(torch.tensor([6.0])).item() == 5.0


def test_rolling_baseline_ema_by_hand():
    b = RollingBaseline(alpha=0.01)
    adv = b.advantage(np.array([1.0, 3.0]))  # first batch: initialises the stats, then standardised by them
    np.testing.assert_allclose(adv, [-1.0, 1.0], atol=1e-5)
    assert b.mean == pytest.approx(2.0) and b.var == pytest.approx(1.0, abs=1e-5)
    b.update(np.array([4.0]))
    assert b.mean == pytest.approx(0.99 * 2.0 + 0.01 * 4.0)
    assert b.var == pytest.approx(0.99 * 1.0 + 0.01 * (4.0 - b.mean) ** 2, abs=1e-5)
    mean, sd = b.mean, math.sqrt(b.var + b.eps)
    assert b.advantage(np.array([mean + sd]))[0] == pytest.approx(1.0)  # later batches: the stats from before
    with pytest.raises(ValueError, match=r"\[0.005, 0.02\]"):
        RollingBaseline(alpha=0.1)


def test_gated_attention_credit_sums_to_the_outer_reward_and_respects_mask():
    torch.manual_seed(0)
    m = GatedAttentionCredit(d_in=4, d_k=8)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    c = m.weights(x, mask)[0] * torch.tensor([3.0, -2.0])[:, None]  # c_t = R_outer·w_t
    assert c[0].sum().item() == pytest.approx(3.0, abs=1e-5)
    assert c[1].sum().item() == pytest.approx(-2.0, abs=1e-5)
    assert torch.all(c[1, 3:] == 0)


def test_gated_attention_matches_the_formula_by_hand():
    m = GatedAttentionCredit(d_in=2, d_k=2)
    with torch.no_grad():
        for lin in (m.q, m.k):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        m.gate.weight.copy_(torch.tensor([[1.0, 0.0]]))
        m.gate.bias.zero_()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mask = torch.ones(1, 3)
    # K(S_T) = x_T = (1, 1); scores = x_t·(1,1)/√2 = (1, 1, 2)/√2; gate = σ(x_t[0]) = σ(1), σ(0), σ(1)
    alpha = torch.softmax(torch.tensor([1.0, 1.0, 2.0]) / math.sqrt(2), 0)
    g = torch.sigmoid(torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(m.weights(x, mask)[0][0], g * alpha / (g * alpha).sum())


def test_gate_learns_to_suppress_impression_only_steps():
    torch.manual_seed(0)
    m = GatedAttentionCredit(d_in=3, d_k=8)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = torch.randn(64, 10, 3)
    engaged = (x[..., 0] > 0.5).float()  # engagement is visible in feature 0
    r_outer = engaged.sum(1)  # the outcome comes from engaged steps
    mask = torch.ones(64, 10)
    for _ in range(300):
        opt.zero_grad()
        m.aux_loss(x, r_outer, mask, engaged).backward()
        opt.step()
    w, _ = m.weights(x, mask)
    assert w[engaged > 0].mean() > 3 * w[engaged == 0].mean()
