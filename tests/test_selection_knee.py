"""The knee of MSS(k): Kneedle with polynomial smoothing, and its documented fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from cahp_deploy.errors import CahpError
from cahp_deploy.selection.knee import find_knee

KS = np.arange(2, 41)


def test_knee_of_a_smooth_saturating_curve():
    # y = 1 - exp(-(k - 2)/4) on k = 2..40. Kneedle maximises y_norm - x_norm, x_norm = (k - 2)/38:
    # exp(-(k - 2)/4) / 4 = 1/38  ->  k = 2 + 4 ln(38/4) = 11.0
    y = 1 - np.exp(-(KS - 2) / 4.0)
    raw = find_knee(KS, y, degree=0)
    assert raw.method == "kneedle" and raw.found and raw.k == 11
    smooth = find_knee(KS, y, degree=6)
    assert smooth.found and abs(smooth.k - 11) <= 2
    assert smooth.degree_used == 6 and len(smooth.coefficients) == 7
    np.testing.assert_allclose(smooth.fitted, np.polyval(smooth.coefficients, KS))


def test_knee_of_a_sharp_elbow():
    y = np.minimum(KS, 10) + 0.02 * np.maximum(KS - 10, 0)
    assert find_knee(KS, y, degree=0).k == 10
    # the degree-6 fit rounds the corner and lands just after it (see the module docstring)
    assert 10 <= find_knee(KS, y, degree=6).k <= 13


def test_no_knee_falls_back_to_the_max_difference_point():
    knee = find_knee(KS, KS * 0.01)  # a straight line has no knee
    assert not knee.found and knee.method == "max_difference"
    assert KS[0] <= knee.k <= KS[-1]


def test_flat_and_single_point_curves():
    flat = find_knee(KS, np.ones(KS.size))
    assert (flat.k, flat.method, flat.found) == (2, "flat_curve", False)
    one = find_knee([2], [0.4])
    assert (one.k, one.method) == (2, "single_point")


def test_degree_is_capped_by_the_number_of_points():
    knee = find_knee([2, 3, 4, 5], [0.1, 0.5, 0.6, 0.62], degree=6)
    assert knee.degree == 6 and knee.degree_used == 3


def test_bad_curves_are_user_errors():
    with pytest.raises(CahpError, match="equally long"):
        find_knee([2, 3], [0.1])
    with pytest.raises(CahpError, match="strictly increasing"):
        find_knee([3, 2], [0.1, 0.2])
    with pytest.raises(CahpError, match="--degree"):
        find_knee(KS, KS, degree=-1)
