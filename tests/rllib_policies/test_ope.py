"""rllib_policies.ope: estimators by hand, validation (ValueError naming column and row), the abstain
rule, and CI-sized coverage checks that a calibrated interval passes and a deliberately biased one fails."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from rllib_policies.ope import (
    DM,
    DR,
    IPS,
    SNDR,
    SNIPS,
    AbstainRule,
    Bootstrap,
    DensityRatioIPS,
    DensityRatioSNIPS,
    EssCorrected,
    GaussianPolicy,
    KernelSNIPS,
    LoggedBandit,
    Normal,
    SwitchDR,
    TabularMean,
    cluster_sums,
    kish_ess,
)
from rllib_policies.ope.synthetic import GridBandit, WeightBandit, measure_coverage

NEVER = AbstainRule(min_ess=0, min_ess_fraction=0)


def small_table(**overrides) -> LoggedBandit:
    cols = dict(
        context=np.zeros((4, 1)),
        action=np.array([0, 1, 1, 2]),
        reward=np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0]]),
        propensity=np.array([0.5, 0.25, 0.25, 0.25]),
        reward_names=("click", "dwell"),
        n_actions=3,
    )
    cols.update(overrides)
    return LoggedBandit(**cols)


# ---------------------------------------------------------------------------------------------- estimators


def test_ips_snips_by_hand():
    data = small_table()
    target = np.array([1, 1, 1, 1])  # deterministic: action 1 everywhere → rows 1, 2 hit with w = 4
    ips = IPS(abstain=NEVER).estimate_all(data, target)
    assert ips["click"].value == pytest.approx((0 + 4 * 1.0) / 4)
    assert ips["dwell"].value == pytest.approx((4 + 4) / 4)
    snips = SNIPS(abstain=NEVER).estimate(data, target, reward="click")
    assert snips.value == pytest.approx(0.5)
    assert snips.ess == pytest.approx(2.0) == kish_ess(np.array([0, 4, 4, 0]))
    assert (snips.method, snips.interval, snips.n, snips.reward) == ("snips", "normal", 4, "click")
    assert snips.low < snips.value < snips.high


def test_model_based_estimators():
    data = small_table()
    pi = np.full((4, 3), 1 / 3)
    q = np.zeros((4, 3, 2))
    dr = DR(reward_model=q, abstain=NEVER).estimate_all(data, pi)
    ips = IPS(abstain=NEVER).estimate_all(data, pi)
    assert dr["click"].value == pytest.approx(ips["click"].value)  # q̂ = 0: DR is IPS
    q = np.ones((4, 3, 2))
    assert DM(reward_model=q, abstain=NEVER).estimate(data, pi).value == pytest.approx(1.0)
    assert SwitchDR(reward_model=q, tau=0.0, abstain=NEVER).estimate(data, pi).value == pytest.approx(1.0)
    sw = SwitchDR(reward_model=q, abstain=NEVER).estimate(data, pi)
    assert sw.value == pytest.approx(DR(reward_model=q, abstain=NEVER).estimate(data, pi).value)
    w = pi[0, 0] / data.propensity
    sndr = SNDR(reward_model=q, abstain=NEVER).estimate(data, pi)
    assert sndr.value == pytest.approx(1.0 + (w * (data.reward[:, 0] - 1)).sum() / w.sum())
    tab = TabularMean()(data)
    assert tab.shape == (4, 3, 2) and tab[0, 1, 1] == pytest.approx(1.0)
    default = DR(abstain=NEVER).estimate(data, pi)  # ridge default runs
    assert np.isfinite(default.value)
    assert DM(reward_model=lambda d: 2 * q, abstain=NEVER).estimate(data, pi).value == pytest.approx(2.0)


def test_abstain_names_threshold_and_ess():
    data = small_table()
    est = SNIPS(abstain=AbstainRule(min_ess=3)).estimate(data, np.array([1, 1, 1, 1]))
    assert est.abstained and np.isnan(est.value) and np.isnan(est.low)
    assert "min_ess 3" in est.reason and "ESS 2.0" in est.reason
    est = SNIPS(abstain=AbstainRule(min_ess=0, min_ess_fraction=0.9)).estimate(data, np.array([1, 1, 1, 1]))
    assert est.abstained and "min_ess_fraction" in est.reason and "ESS 2.0" in est.reason
    assert not SNIPS(abstain=NEVER).estimate(data, np.array([1, 1, 1, 1])).abstained


def test_intervals_clusters_and_bootstrap_seed():
    rng = np.random.default_rng(0)
    data = GridBandit().logs(2000, rng, rows_per_user=20)
    target = GridBandit().target(0.3)
    clustered = SNIPS(abstain=NEVER).estimate(data, target)
    flat = SNIPS(abstain=NEVER).estimate(LoggedBandit(data.context, data.action, data.reward, data.propensity), target)
    assert clustered.value == pytest.approx(flat.value)
    assert clustered.width > 1.3 * flat.width  # user effects: clustered s.e. is wider
    boot = SNIPS(interval=Bootstrap(seed=3), abstain=NEVER)
    assert boot.estimate(data, target) == boot.estimate(data, target)
    ess = SNIPS(interval=EssCorrected(), abstain=NEVER).estimate(data, target)
    assert ess.width >= clustered.width


def test_ess_corrected_widens_most_at_small_ess():
    rng = np.random.default_rng(1)
    bandit = WeightBandit()
    ratios = []
    for n in (40, 4000):
        data = bandit.logs(n, rng)
        target = bandit.target(data.context, 0.8)
        normal = DensityRatioSNIPS(abstain=NEVER).estimate(data, target)
        corrected = DensityRatioSNIPS(interval=EssCorrected(), abstain=NEVER).estimate(data, target)
        assert corrected.value == normal.value
        ratios.append(corrected.width / normal.width)
    assert ratios[0] > ratios[1] >= 1.0
    assert ratios[1] < 1.1


def test_truncated_gaussian_density():
    mean = np.array([[0.3, -0.5], [1.5, 1.5]])
    diag = GaussianPolicy(mean, np.array([0.7, 1.2]), -1.0, 2.0)
    full = GaussianPolicy(mean, np.diag([0.49, 1.44]), -1.0, 2.0)
    np.testing.assert_allclose(diag.box_probability(), full.box_probability(), rtol=1e-4)
    # the truncated density integrates to 1 over the box (midpoint rule), both rows
    g = np.linspace(-1, 2, 301)[:-1] + 0.005
    a = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for row in range(2):
        one = GaussianPolicy(mean[row], np.array([0.7, 1.2]), -1.0, 2.0)
        assert one.density(a).sum() * 0.01**2 == pytest.approx(1.0, abs=2e-3)
    assert diag.density(np.array([[3.0, 0.0], [0.0, 0.0]]))[0] == 0.0
    draws = GaussianPolicy(np.zeros(2), np.ones(2), -0.5, 0.5).sample(np.random.default_rng(0), 1000)
    assert draws.shape == (1000, 2) and np.abs(draws).max() <= 0.5


def test_kernel_snips_reports_bandwidth():
    rng = np.random.default_rng(2)
    bandit = WeightBandit()
    data = bandit.logs(3000, rng)
    est = KernelSNIPS(bandwidth=0.3, abstain=NEVER).estimate(data, bandit.deterministic_target(0.2))
    assert est.info["bandwidth"] == 0.3
    assert abs(est.value - bandit.deterministic_value(0.2, 200_000)) < 0.1
    wide = KernelSNIPS(bandwidth=[0.3, 0.6], abstain=NEVER).estimate(data, bandit.deterministic_target(0.2))
    assert wide.ess > est.ess  # the bias knob: wider kernel, more effective rows


def test_from_arrow_and_parquet(tmp_path):
    table = pa.table(
        {
            "user": [1, 1, 2, 2],
            "x0": [0.1, 0.2, 0.3, 0.4],
            "x1": [1.0, 0.0, 1.0, 0.0],
            "action": pa.array([[0.0, 0.1], [0.2, 0.3], [0.1, 0.1], [0.0, 0.0]], pa.list_(pa.float64())),
            "click": [1.0, 0.0, 1.0, 0.0],
            "dwell": [3.0, 0.0, 2.0, 1.0],
            "density": [0.2, 0.3, 0.1, 0.4],
        }
    )
    pq.write_table(table, tmp_path / "logs.parquet")
    for source in (table, tmp_path / "logs.parquet"):
        data = LoggedBandit.from_table(
            source, context=["x0", "x1"], reward=["click", "dwell"], propensity="density", cluster="user"
        )
        assert data.continuous and data.action.shape == (4, 2) and data.context.shape == (4, 2)
        assert data.reward_names == ("click", "dwell") and list(data.clusters) == [1, 1, 2, 2]
    target = GaussianPolicy(np.zeros((4, 2)), np.ones(2))
    assert set(DensityRatioIPS(abstain=NEVER).estimate_all(data, target)) == {"click", "dwell"}


def test_cluster_sums_matches_loop():
    terms = np.arange(12.0).reshape(6, 2)
    ids = np.array([3, 1, 3, 2, 1, 3])
    expected = np.array([terms[ids == c].sum(0) for c in (1, 2, 3)])
    np.testing.assert_array_equal(cluster_sums(terms, ids), expected)
    assert cluster_sums(terms, None) is terms


# ---------------------------------------------------------------------------------------------- bad input


def _grid(**kw):
    return lambda: small_table(**kw)


def _table(**drop_or_set):
    cols = {"context": [0.0, 1.0], "action": [0, 1], "reward": [1.0, 0.0], "propensity": [0.5, 0.5]}
    cols.update(drop_or_set)
    return {k: v for k, v in cols.items() if v is not None}


@pytest.mark.parametrize(
    "build, match",
    [
        (_grid(propensity=np.array([0.5, 0.0, 0.25, 0.25])), r"column 'propensity' row 1: .*\(0, 1\]"),
        (_grid(propensity=np.array([0.5, 0.25, 1.5, 0.25])), r"column 'propensity' row 2"),
        (_grid(propensity=np.array([0.5, 0.25, -0.1, 0.25])), r"column 'propensity' row 2"),
        (_grid(propensity=np.array([0.5, 0.25, 0.25, np.nan])), r"column 'propensity' row 3: .*finite"),
        (_grid(reward=np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0], [0.5, 0.0]])), r"column 'dwell' row 1"),
        (_grid(context=np.array([[0.0], [np.inf], [0.0], [0.0]])), r"column 'context' row 1"),
        (_grid(action=np.array([0, 1, 5, 2])), r"column 'action' row 2: grid index 5"),
        (_grid(action=np.array([0, -1, 1, 2])), r"column 'action' row 1"),
        (_grid(reward=np.ones((3, 2))), r"column 'reward' has 3 rows"),
        (_grid(reward_names=("click",)), r"column 'reward' has 2 columns but 1 reward names"),
        (
            lambda: LoggedBandit(np.zeros((2, 1)), np.array([[0.0, 0.0], [np.nan, 1.0]]), np.ones(2), np.ones(2) * 3),
            r"column 'action' row 1",
        ),
        (
            lambda: LoggedBandit(np.zeros((2, 1)), np.zeros((2, 2)), np.ones(2), np.array([3.0, 0.0])),
            r"column 'propensity' row 1: must be a density > 0",
        ),
        (lambda: LoggedBandit.from_table(_table(reward=None)), r"missing column 'reward'"),
        (lambda: LoggedBandit.from_table(_table(propensity=None)), r"missing column 'propensity'"),
        (lambda: LoggedBandit.from_table(_table(), cluster="user"), r"missing column 'user'"),
        (lambda: LoggedBandit.from_table(_table(propensity=[0.5, 2.0])), r"column 'propensity' row 1"),
        (
            lambda: LoggedBandit.from_table(
                pa.table(
                    {
                        "context": [0.0, 1.0, 2.0],
                        "action": pa.array([[0.0, 1.0], [0.0, 1.0], [1.0]]),
                        "reward": [1.0, 0.0, 1.0],
                        "propensity": [0.5, 0.5, 0.5],
                    }
                )
            ),
            r"column 'action' row 2: dimension 1, expected 2",
        ),
    ],
)
def test_bad_tables(build, match):
    with pytest.raises(ValueError, match=match):
        build()


CONT = LoggedBandit(np.zeros((3, 1)), np.zeros((3, 2)), np.ones(3), np.ones(3))


@pytest.mark.parametrize(
    "estimator, data, target, match",
    [
        (IPS(), small_table(), np.array([[0.5, 0.5, 0.5]] * 4), r"target row 0: .*probability vector"),
        (IPS(), small_table(), np.array([[1.0, 0.0]] * 4), r"target has shape \(4, 2\)"),
        (IPS(), small_table(), np.array([0, 1, 3, 0]), r"target row 2: grid index 3"),
        (IPS(), CONT, np.array([0, 0, 0]), r"column 'action' holds continuous actions"),
        (DM(reward_model=np.zeros((4, 2))), small_table(), np.array([0, 1, 1, 0]), r"reward model gives shape"),
        (
            DensityRatioIPS(),
            CONT,
            GaussianPolicy(np.zeros(3), np.ones(3)),
            r"column 'action' row 0: action has dimension 2, the target policy has 3",
        ),
        (DensityRatioSNIPS(), small_table(), GaussianPolicy(np.zeros(2), np.ones(2)), r"holds grid indices"),
        (DensityRatioIPS(), CONT, np.zeros((3, 2)), r"target must be a GaussianPolicy"),
        (KernelSNIPS(), CONT, np.zeros((3, 3)), r"column 'action' row 0: action has dimension 2"),
        (KernelSNIPS(bandwidth=np.ones(3)), CONT, np.zeros((3, 2)), r"bandwidth has shape"),
        (SNIPS(), small_table(), np.array([0, 1, 1, 0]), r"missing reward column 'clicks'"),
        (SNIPS(interval=Normal(level=1.0), abstain=NEVER), small_table(), np.array([1, 1, 1, 1]), r"level"),
    ],
)
def test_bad_estimator_input(estimator, data, target, match):
    with pytest.raises(ValueError, match=match):
        estimator.estimate(data, target, reward="clicks" if "clicks" in match else 0)


# ---------------------------------------------------------------------------------------------- coverage (CI-sized)


@dataclass(frozen=True)
class HalfWidth:
    """A deliberately mis-calibrated interval: the normal one at half its width."""

    level: float = 0.95
    name: str = "half_width"

    def bounds(self, parts, value, clusters, ess):
        low, high = Normal(self.level).bounds(parts, value, clusters, ess)
        return value - (value - low) / 2, value + (high - value) / 2


def coverage_bound(valid: int, level: float = 0.95) -> float:
    """A calibrated interval's hit count falls below this with probability ≤ 0.001."""
    return stats.binom.ppf(0.001, valid, level) / valid


INTERVALS = {"normal": Normal(), "bootstrap": Bootstrap(n_boot=200), "ess_corrected": EssCorrected()}


@pytest.mark.parametrize(
    "family, distance, n, rows_per_user",
    [("grid", 0.3, 1000, 1), ("grid", 0.3, 1000, 10), ("weight", 0.2, 1000, 1), ("weight", 0.8, 3000, 1)],
)
def test_coverage_holds_and_half_width_fails(family, distance, n, rows_per_user):
    repeats = 300
    if family == "grid":
        bandit = GridBandit()
        truth, target_of, cls = bandit.value(distance, 200_000), (lambda d: bandit.target(distance)), SNIPS
    else:
        bandit = WeightBandit()
        truth, cls = bandit.value(distance, 200_000), DensityRatioSNIPS
        target_of = lambda d: bandit.target(d.context, distance)  # noqa: E731

    def runner(estimator):
        return lambda d: estimator.estimate(d, target_of(d))

    estimators = {
        label: runner(cls(interval=interval)) for label, interval in {**INTERVALS, "half_width": HalfWidth()}.items()
    }
    cov = measure_coverage(lambda rng: bandit.logs(n, rng, rows_per_user), estimators, truth, repeats, seed=7)
    for label in INTERVALS:
        c = cov[label]
        assert c.valid >= 0.9 * repeats, (label, c)  # the default abstain rule lets this regime through
        assert c.coverage >= coverage_bound(c.valid), (label, c)
    bad = cov["half_width"]
    assert bad.coverage < coverage_bound(bad.valid), bad  # the test can fail
