"""The paired accuracy-drop statistics: hand-computed cases, the discordant-pairs identity, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy.errors import CahpError
from cahp_deploy.paired import correct, paired_drop, split_rows


def test_hand_computed_case():
    # 10 rows: ref right on 8, new right on 6; discordant: 3 only-ref, 1 only-new.
    ref = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    new = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0], bool)
    d = paired_drop(ref, new, confidence=0.9)
    assert (d.ref_only, d.new_only, d.n) == (3, 1, 10)
    assert d.drop == pytest.approx(20.0)
    # var(d) = (3+1)/10 - 0.2^2 = 0.36 -> se = sqrt(0.036) = 0.18974
    assert d.se == pytest.approx(100 * np.sqrt(0.036))
    assert d.upper == pytest.approx(20.0 + 1.2815516 * d.se, rel=1e-6)
    assert d.low == pytest.approx(20.0 - 1.6448536 * d.se, rel=1e-6)
    assert not d.within(20.0) and d.within(d.upper)


def test_matches_sample_standard_error_of_differences():
    rng = np.random.default_rng(0)
    ref, new = rng.random(1000) < 0.5, rng.random(1000) < 0.45
    d = paired_drop(ref, new)
    diff = ref.astype(float) - new.astype(float)
    assert d.drop == pytest.approx(100 * diff.mean())
    assert d.se == pytest.approx(100 * diff.std(ddof=0) / np.sqrt(1000))


def test_identical_predictions_are_not_a_zero_width_promise():
    y = np.ones(10, bool)
    d = paired_drop(y, y)
    assert d.drop == 0 and d.se == pytest.approx(10.0) and d.upper > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200))
def test_interval_contains_estimate_and_swaps_sign(rows):
    ref = np.array([r for r, _ in rows])
    new = np.array([n for _, n in rows])
    d, back = paired_drop(ref, new), paired_drop(new, ref)
    assert d.low <= d.drop <= d.upper <= d.high
    assert back.drop == pytest.approx(-d.drop) and back.se == pytest.approx(d.se)
    assert d.ref_accuracy - d.new_accuracy == pytest.approx(d.drop)


def test_errors():
    with pytest.raises(CahpError, match="paired rows differ"):
        paired_drop([True, False], [True])
    with pytest.raises(CahpError, match="no rows"):
        paired_drop([], [])
    with pytest.raises(CahpError, match="confidence"):
        paired_drop([True], [True], confidence=0.3)


def test_correct_and_split_rows():
    assert correct(np.array([[0.1, 0.9], [0.8, 0.2]]), [1, 1]).tolist() == [True, False]
    assert correct([2, 0], [2, 1]).tolist() == [True, False]
    a, b = split_rows(100, 0.3, seed=1)
    assert len(b) == 30 and len(a) == 70 and not set(a) & set(b)
    assert np.array_equal(b, split_rows(100, 0.3, seed=1)[1])
    with pytest.raises(CahpError, match="confirmation fraction"):
        split_rows(10, 1.0)
