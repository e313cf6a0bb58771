"""The NumPy policies the Serve apps follow (actors/served_policies.py): malformed ones are refused by name."""

import numpy as np
import pytest

from actors.served_policies import RankingPolicy
from actors.stages import RANKING_ACTION_HIGH

RNG = np.random.default_rng(0)
GOOD = {"0.weight": RNG.normal(size=(8, 5)), "0.bias": np.zeros(8), "2.weight": RNG.normal(size=(2, 8))}
GOOD["2.bias"] = np.zeros(2)


def params(**state) -> dict:
    return {"mlp_state": {**GOOD, **state}, "high": RANKING_ACTION_HIGH, "max_logit": 6.0}


@pytest.mark.parametrize(
    "state, match",
    [
        ({"2.weight": RNG.normal(size=(3, 8)), "2.bias": np.zeros(3)}, "3 outputs, expected K − 1 = 2"),
        ({"2.weight": RNG.normal(size=(2, 7))}, "layer 1 has shape"),
        ({"0.bias": np.zeros(4)}, "layer 0 has shape"),
        ({"0.weight": np.full((8, 5), np.nan)}, "layer 0 holds non-finite"),
    ],
)
def test_malformed_policies_are_refused_naming_the_layer(state, match):
    with pytest.raises(ValueError, match=match):
        RankingPolicy(params(**state))


def test_a_context_of_another_width_is_refused_and_weights_stay_in_the_box():
    policy = RankingPolicy(params())
    with pytest.raises(ValueError, match="reads 5 context features, the request has 6"):
        policy(np.zeros((1, 6)))
    weights = policy(RNG.normal(size=(64, 5)))
    assert weights.shape == (64, 3) and (weights >= 0).all() and (weights <= RANKING_ACTION_HIGH).all()
    np.testing.assert_allclose((weights / RANKING_ACTION_HIGH).sum(1), 1.0, rtol=1e-5)  # shares on the simplex


# ------------------------------------------------------------------------------ the CRM weight policy
def crm_params(**fields) -> dict:
    low, high = np.log(1e-3 * RANKING_ACTION_HIGH), np.log(RANKING_ACTION_HIGH.astype(np.float64))
    base = {"weight": RNG.normal(size=(3, 5)), "bias": np.zeros(3), "obs_mean": np.zeros(5), "obs_std": np.ones(5)}
    return {**base, "low": low, "high": high, "std": np.full(3, 0.5), "scale": None, **fields}


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"weight": RNG.normal(size=5)}, r"weight has shape \(5,\), expected \[3, context_dim\]"),
        ({"weight": RNG.normal(size=(2, 5))}, r"weight has shape \(2, 5\), expected \[3, context_dim\]"),
        ({"weight": [[1.0, "a"]] * 3}, "weight must be an array of numbers"),
        ({"bias": np.zeros(2)}, r"bias has shape \(2,\), expected \(3,\)"),
        ({"obs_mean": np.zeros(4)}, r"obs_mean has shape \(4,\), expected \(5,\)"),
        ({"std": np.array([0.5, 0.0, 0.5])}, "std must be > 0"),
        ({"obs_std": np.full(5, -1.0)}, "obs_std must be > 0"),
        ({"bias": np.array([0.0, np.inf, 0.0])}, "bias holds non-finite values"),
        ({"low": np.log(RANKING_ACTION_HIGH.astype(np.float64)) + 1}, "one floor in"),
        ({"low": np.log(RANKING_ACTION_HIGH * np.array([1e-3, 1e-3, 1e-2]))}, "one floor in"),
        ({"std": None}, r"std has shape \(\), expected \(3,\)"),
        ({"scale": float("nan")}, "scale must be a finite number or None"),
        ({"scale": [1.0, 2.0]}, "scale must be a finite number or None"),
        ({"scale": True}, "scale must be a finite number or None"),
        ({"sigma": 0.3}, r"unknown fields \['sigma'\]"),
    ],
)
def test_malformed_crm_policies_are_refused_naming_the_field(fields, match):
    from actors.served_policies import CRMPolicy

    with pytest.raises(ValueError, match=match):
        CRMPolicy(crm_params(**fields))


def test_a_crm_policy_without_a_field_is_refused_naming_it():
    from actors.served_policies import CRMPolicy

    params = crm_params()
    del params["obs_std"]
    with pytest.raises(ValueError, match="missing field 'obs_std'"):
        CRMPolicy(params)


def test_the_crm_mean_stays_in_the_box_and_aligned_it_keeps_the_logs_scale():
    from actors.served_policies import CRMPolicy

    x = RNG.normal(size=(64, 5)) * 3
    params = crm_params()
    free = CRMPolicy(params)
    m = free.mean_log_weights(x)
    assert m.shape == (64, 3) and (m >= free.low).all() and (m <= free.high).all()
    with pytest.raises(ValueError, match="reads 5 context features, the request has 6"):
        free.mean_log_weights(np.zeros((1, 6)))
    aligned = CRMPolicy({**params, "scale": -1.0}).mean_log_weights(x)
    shift = aligned - m  # along (1, 1, 1) where no clipping bites, to the scale's mean log-weight
    inside = ((aligned > free.low) & (aligned < free.high)).all(axis=1)
    np.testing.assert_allclose(shift[inside], shift[inside][:, :1] * np.ones(3), atol=1e-9)
    np.testing.assert_allclose(aligned[inside].mean(axis=1), -1.0, atol=1e-9)


def test_publishing_refuses_a_malformed_crm_policy_before_the_store():
    from actors.served_policies import publish_crm

    with pytest.raises(ValueError, match="std must be > 0"):  # no Ray needed: refused before any store call
        publish_crm("never_created", crm_params(std=np.zeros(3)))
