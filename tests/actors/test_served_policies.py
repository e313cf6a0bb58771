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
