"""JM separability profiles: closed-form cases, bounds, layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy.errors import CahpError
from cahp_deploy.selection.separability import (
    VARIANCE_FLOOR,
    bhattacharyya,
    class_pairs,
    jm_distance,
    jm_profiles,
)


def test_identical_distributions_have_zero_distance():
    m = np.array([0.0, 0.3, -2.0])
    v = np.array([1.0, 0.01, 4.0])
    assert np.allclose(jm_distance(m, v, m, v), 0.0)


def test_far_apart_distributions_approach_two():
    assert jm_distance(0.0, 1.0, 100.0, 1.0) == pytest.approx(2.0, abs=1e-12)
    # and monotonically so
    d = jm_distance(0.0, 1.0, np.array([0.5, 1.0, 2.0, 4.0]), 1.0)
    assert np.all(np.diff(d) > 0) and d[-1] < 2.0


def test_equal_variances_closed_form():
    # Bh = d^2 / (4 * 2v) + 0.5 ln(2v / 2v) = d^2 / (8v)
    d, v = 1.5, 0.7
    bh = d * d / (8 * v)
    assert bhattacharyya(0.0, v, d, v) == pytest.approx(bh)
    assert jm_distance(0.0, v, d, v) == pytest.approx(2 * (1 - math.exp(-bh)))


def test_equal_means_closed_form():
    # only the variance term: 0.5 ln((1 + 4) / (2 * sqrt(4))) = 0.5 ln(5/4)
    assert bhattacharyya(3.0, 1.0, 3.0, 4.0) == pytest.approx(0.5 * math.log(5 / 4))


def test_variances_are_floored():
    # zero variances behave like VARIANCE_FLOOR: finite, and the same value
    a = jm_distance(0.0, 0.0, 1e-3, 0.0)
    b = jm_distance(0.0, VARIANCE_FLOOR, 1e-3, VARIANCE_FLOOR)
    assert np.isfinite(a) and a == pytest.approx(b)
    # Bh = (1e-3)^2 / (4 * 2e-6) = 0.125
    assert a == pytest.approx(2 * (1 - math.exp(-0.125)))


@settings(max_examples=50, deadline=None)
@given(
    st.floats(-5, 5), st.floats(1e-4, 5), st.floats(-5, 5), st.floats(1e-4, 5),
)
def test_jm_is_symmetric_and_bounded(m1, v1, m2, v2):
    d = jm_distance(m1, v1, m2, v2)
    assert 0.0 <= d < 2.0 + 1e-12
    assert d == pytest.approx(jm_distance(m2, v2, m1, v1))


def test_class_pairs_order():
    assert class_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(class_pairs(5)) == 10


def test_profile_layout_and_unseen_classes():
    rng = np.random.default_rng(0)
    n, c, d = 4, 3, 5
    mean = rng.normal(size=(n, c, d))
    var = rng.uniform(0.1, 1, size=(n, c, d))
    prof = jm_profiles(mean, var)
    assert prof.shape == (n, 3 * d) and prof.dtype == np.float32
    # block 2 is pair (1, 2)
    np.testing.assert_allclose(prof[:, 2 * d:], jm_distance(mean[:, 1], var[:, 1], mean[:, 2], var[:, 2]), rtol=1e-6)
    # a class with no examples contributes zeros to its pairs
    prof = jm_profiles(mean, var, counts=np.array([5, 0, 5]))
    assert np.all(prof[:, : 1 * d] == 0) and np.all(prof[:, 2 * d:] == 0) and np.any(prof[:, d:2 * d] > 0)


def test_profiles_reject_bad_shapes():
    with pytest.raises(CahpError, match="at least 2 classes"):
        jm_profiles(np.zeros((2, 1, 4)), np.ones((2, 1, 4)))
    with pytest.raises(CahpError, match="heads, classes, cells"):
        jm_profiles(np.zeros((2, 3, 4)), np.ones((2, 3, 5)))
