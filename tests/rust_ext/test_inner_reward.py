"""The Rust inner reward agrees with its NumPy reference, and rejects bad input by name."""

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rust_ext
from rust_ext import RewardWeights, inner_reward, inner_reward_numpy, inner_reward_slates, inner_reward_slates_numpy

F32_MAX = float(np.finfo(np.float32).max)


def close(a, b):
    """float32 kernel vs float64 reference: a few float32 ulps of the result."""
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


finite_f32 = st.floats(-F32_MAX, F32_MAX, allow_nan=False, width=32)
dwell_f32 = st.floats(0.0, F32_MAX, allow_nan=False, width=32)
weight = st.floats(-100, 100, allow_nan=False)


@st.composite
def slates(draw, min_size=0, max_size=300):
    n = draw(st.integers(min_size, max_size))
    return (
        draw(hnp.arrays(np.bool_, n)),
        draw(hnp.arrays(np.float32, n, elements=dwell_f32)),
        draw(hnp.arrays(np.bool_, n)),
        draw(hnp.arrays(np.float32, n, elements=finite_f32)),
    )


@st.composite
def weights(draw):
    lo, hi = sorted([draw(st.floats(-50, 50)), draw(st.floats(-50, 50))])
    return RewardWeights(draw(weight), draw(weight), draw(weight), draw(weight), lo, hi)


def close_to_reference(actual, slate, w):
    """float32 vs float64: each term carries ~1 float32 ulp of error, so under cancellation the
    bound scales with the terms' magnitudes, not with the (possibly tiny) result."""
    c, d, s, r = slate
    terms = (
        abs(w.click_w) * c
        + abs(w.dwell_w) * np.log1p(d.astype(np.float64))
        + abs(w.skip_penalty) * s
        + abs(w.rel_w) * np.abs(r.astype(np.float64))
    )
    expected = inner_reward_numpy(*slate, w)
    inside = (expected > w.clip_lo) & (expected < w.clip_hi)
    tol = 2e-6 + 4e-7 * np.where(inside, terms, np.abs(expected))
    assert np.all(np.abs(actual.astype(np.float64) - expected) <= tol), (actual, expected, tol)


@settings(max_examples=300, deadline=None)
@given(slates(), weights())
def test_rust_matches_numpy_reference(slate, w):
    close_to_reference(inner_reward(*slate, w), slate, w)


def test_cancellation_case_found_by_hypothesis():
    slate = (
        np.array([False, False]),
        np.array([2.0, 0.0], np.float32),
        np.array([True, True]),
        np.zeros(2, np.float32),
    )
    w = RewardWeights(click_w=0, dwell_w=-69, skip_penalty=76, rel_w=0, clip_lo=0, clip_hi=1)
    close_to_reference(inner_reward(*slate, w), slate, w)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(0, 500), elements=dwell_f32))
def test_polynomial_log_matches_log1p(x):
    np.testing.assert_allclose(rust_ext.ln_1p_f32(x), np.log1p(x.astype(np.float64)), rtol=3e-7, atol=2e-7)


def test_default_weights_and_hand_computed_values():
    r = inner_reward(
        np.array([1, 0, 0], bool),
        np.array([0, 3, 1e6], np.float32),
        np.array([0, 1, 0], bool),
        np.array([0.5, 0.2, 0.0], np.float32),
    )
    expected = [1.0 + 0.8 * 0.5, 0.5 * np.log(4) - 0.3 + 0.8 * 0.2, min(5.0, 0.5 * np.log1p(1e6))]
    close(r, expected)
    assert r.dtype == np.float32


def test_clip_range_is_applied():
    w = RewardWeights(click_w=10, clip_lo=-1, clip_hi=2)
    close(inner_reward([1, 0], [0, 0], [0, 1], [0, -100], w), [2.0, -1.0])


def test_empty_slate():
    assert inner_reward([], [], [], []).shape == (0,)
    rewards, totals = inner_reward_slates(np.array([0], np.int64), [], [], [], [])
    assert rewards.shape == (0,) and totals.shape == (0,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0, -1e-30])
@pytest.mark.parametrize("impl", [inner_reward, inner_reward_numpy])
def test_bad_dwell_is_rejected_by_name_and_index(impl, bad):
    dwell = np.array([1, 2, bad, 4, bad], np.float32)
    with pytest.raises(ValueError, match=r"^dwell\[2\] = .*finite and >= 0"):
        impl(np.zeros(5, bool), dwell, np.zeros(5, bool), np.zeros(5, np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("impl", [inner_reward, inner_reward_numpy])
def test_bad_relevance_is_rejected(impl, bad):
    with pytest.raises(ValueError, match=r"^relevance\[1\] = .*must be finite"):
        impl([0, 0], [1, 1], [0, 0], np.array([0.1, bad], np.float32))


@pytest.mark.parametrize("field", ["dwell", "skipped", "relevance"])
@pytest.mark.parametrize("impl", [inner_reward, inner_reward_numpy])
def test_length_mismatch_names_the_field(impl, field):
    cols = dict(
        clicked=np.zeros(4, bool),
        dwell=np.ones(4, np.float32),
        skipped=np.zeros(4, bool),
        relevance=np.zeros(4, np.float32),
    )
    cols[field] = cols[field][:3]
    with pytest.raises(ValueError, match=rf"length mismatch: clicked has 4 items but {field} has 3"):
        impl(**cols)


def test_non_flag_numbers_are_rejected():
    with pytest.raises(ValueError, match=r"clicked\[1\] = 2"):
        inner_reward([0, 2], [1, 1], [0, 0], [0, 0])
    with pytest.raises(TypeError, match="skipped: expected bools"):
        inner_reward([0, 1], [1, 1], ["a", "b"], [0, 0])


def test_two_dimensional_input_is_rejected():
    with pytest.raises(ValueError, match="dwell: expected a contiguous 1-D array"):
        inner_reward(np.zeros(4, bool), np.ones((2, 2), np.float32), np.zeros(4, bool), np.zeros(4, np.float32))


def test_huge_batch_uses_threads_and_still_agrees():
    n = 3 * rust_ext.PARALLEL_MIN_ITEMS + 12345
    rng = np.random.default_rng(7)
    cols = (
        rng.random(n) < 0.3,
        rng.exponential(20, n).astype(np.float32),
        rng.random(n) < 0.2,
        rng.random(n).astype(np.float32),
    )
    close(inner_reward(*cols), inner_reward_numpy(*cols))
    cols[1][n - 3] = -5.0  # in the last parallel chunk
    with pytest.raises(ValueError, match=rf"^dwell\[{n - 3}\]"):
        inner_reward(*cols)


def test_out_is_written_in_place_and_checked():
    cols = ([1, 0, 1], np.array([1, 2, 3], np.float32), [0, 0, 1], np.array([0.1, 0.2, 0.3], np.float32))
    out = np.zeros(3, np.float32)
    assert inner_reward(*cols, out=out) is out
    close(out, inner_reward_numpy(*cols))
    with pytest.raises(ValueError, match="out has 2"):
        inner_reward(*cols, out=np.zeros(2, np.float32))
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        inner_reward(*cols, out=ro)
    with pytest.raises(ValueError, match="must not share memory"):
        inner_reward(*cols, out=cols[1])


def test_offset_and_strided_views():
    """An offset view is read in place; a strided one is made contiguous by the wrapper."""
    big = np.arange(20, dtype=np.float32)
    w = RewardWeights(dwell_w=0, rel_w=1, clip_hi=100)
    close(inner_reward(np.ones(3, bool), big[5:8], np.zeros(3, bool), big[5:8], w), [6, 7, 8])
    close(inner_reward(np.ones(3, bool), big[:6:2], np.zeros(3, bool), big[:6:2], w), [1, 3, 5])


def test_pyarrow_columns_are_accepted_and_nulls_named():
    got = inner_reward(
        pa.array([True, False]),
        pa.array([0.0, 3.0], pa.float32()),
        pa.array([False, True]),
        pa.chunked_array([[0.5], [0.2]], pa.float32()),
    )
    close(got, inner_reward_numpy([1, 0], [0, 3], [0, 1], [0.5, 0.2]))
    with pytest.raises(ValueError, match="dwell: 1 null"):
        inner_reward(pa.array([True]), pa.array([None], pa.float32()), pa.array([False]), pa.array([0.1], pa.float32()))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=40), st.data())
def test_slates_match_reference_including_empty_slates(lengths, data):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    cols = data.draw(slates(min_size=n, max_size=n))
    rewards, totals = inner_reward_slates(offsets, *cols)
    ref_rewards, ref_totals = inner_reward_slates_numpy(offsets, *cols)
    close_to_reference(rewards, cols, RewardWeights())
    np.testing.assert_allclose(totals, ref_totals, rtol=1e-5, atol=1e-4)
    assert totals.shape == (len(lengths),)


@pytest.mark.parametrize(
    "offsets, message",
    [
        ([1, 3], r"offsets\[0\] must be 0"),
        ([0, 2, 1, 3], "non-decreasing"),
        ([0, 2], r"must equal the number of items \(3\)"),
        ([], "at least one entry"),
    ],
)
def test_bad_offsets_are_rejected(offsets, message):
    with pytest.raises(ValueError, match=message):
        inner_reward_slates(np.array(offsets, np.int64), [0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0])


def test_slate_errors_point_at_slate_and_position():
    with pytest.raises(ValueError, match=r"dwell\[4\] \(slate 1, position 1\)"):
        inner_reward_slates([0, 3, 6], [0] * 6, [1, 1, 1, 1, -1, 1], [0] * 6, [0] * 6)


@pytest.mark.parametrize("field", ["click_w", "dwell_w", "skip_penalty", "rel_w", "clip_lo", "clip_hi"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e39, -2e6])
def test_weights_must_be_finite_and_bounded(field, value):
    with pytest.raises(ValueError, match=f"{field} must be finite with"):
        RewardWeights(**{field: value})


def test_weights_clip_order_round_trip_and_pickle():
    with pytest.raises(ValueError, match=r"clip_lo \(3(\.0)?\) must not exceed clip_hi \(1(\.0)?\)"):
        RewardWeights(clip_lo=3, clip_hi=1)
    w = RewardWeights(click_w=2, skip_penalty=-0.25)
    assert w.as_dict() == dict(click_w=2, dwell_w=0.5, skip_penalty=-0.25, rel_w=0.8, clip_lo=-5, clip_hi=5)
    assert RewardWeights(**w.as_dict()) == w
    assert pickle.loads(pickle.dumps(w)) == w
    with pytest.raises(TypeError, match="weights: expected RewardWeights"):
        inner_reward([1], [1], [0], [0], weights={"click_w": 1})


def test_big_endian_input_is_converted_not_misread():
    dwell = np.array([1, 2, 100], ">f4")
    rel = np.array([0.5, 0.1, 0.3], ">f4")
    close(
        inner_reward([1, 0, 1], dwell, [0, 1, 0], rel),
        inner_reward_numpy([1, 0, 1], [1, 2, 100], [0, 1, 0], [0.5, 0.1, 0.3]),
    )


def test_largest_weights_cannot_produce_nan_or_inf():
    w = RewardWeights(click_w=1e6, dwell_w=1e6, skip_penalty=-1e6, rel_w=1e6, clip_lo=-1e6, clip_hi=1e6)
    f32max = np.finfo(np.float32).max
    rewards, totals = inner_reward_slates(
        [0, 3],
        [1, 1, 1],
        np.array([1e30, 0, 0], np.float32),
        [1, 0, 0],
        np.array([-f32max, f32max, f32max], np.float32),
        w,
    )
    assert np.isfinite(rewards).all() and np.isfinite(totals).all()
