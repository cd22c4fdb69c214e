"""The paired accuracy-drop statistics: hand-computed cases, the discordant-pairs identity, exact
coverage of the upper bound, monotonicity, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.stats import beta, binom

from cahp_deploy.errors import CahpError
from cahp_deploy.paired import METHOD, correct, drop_upper, paired_drop, split_rows

Z90, Z95 = 1.2815516, 1.6448536


def _upper_without_new_only(n: int, b: int, z: float) -> float:
    """By hand for c = 0 (points): the restricted MLE of P(only new right) is 0 once d >= b / (2n - b),
    so the corrected score equation is (b + 1 - n d)^2 = z^2 n d (1 - d) with n d > b + 1; its larger
    root in d."""
    k, z2 = b + 1, z * z
    return 100 * ((2 * k + z2) + np.sqrt((2 * k + z2) ** 2 - 4 * k * k * (1 + z2 / n))) / (2 * (n + z2))


def _exact_coverage(n: int, nq: float, p: float, continuity: float = 1.0) -> float:
    """P(upper >= q (2p - 1)) with m = b + c ~ Binomial(n, q), b | m ~ Binomial(m, p), m over all but
    1e-12 of its mass (as experiments/paired_coverage.py)."""
    q = nq / n
    m = np.arange(int(binom.ppf(1e-12, n, q)), int(binom.isf(1e-12, n, q)) + 2)[:, None]
    b = np.arange(m.max() + 1)[None, :]
    b, m = np.broadcast_arrays(b, m)
    ok = b <= m
    upper = drop_upper(n, b[ok], m[ok] - b[ok], 0.9, continuity=continuity)
    weight = binom.pmf(m[ok], n, q) * binom.pmf(b[ok], m[ok], p)
    return float(weight[upper >= 100 * q * (2 * p - 1)].sum())


def test_hand_computed_case():
    # 10 rows: ref right on 8, new right on 6; discordant: 3 only-ref, 1 only-new.
    ref = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    new = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0], bool)
    d = paired_drop(ref, new, confidence=0.9)
    assert (d.ref_only, d.new_only, d.n) == (3, 1, 10)
    assert d.drop == pytest.approx(20.0)
    # var(d) = (3+1)/10 - 0.2^2 = 0.36 -> se = sqrt(0.036) = 0.18974
    assert d.se == pytest.approx(100 * np.sqrt(0.036))
    assert d.method == METHOD and d.to_dict()["method"] == METHOD

    def score(u: float, b: int, c: int, n: int = 10) -> float:  # the corrected score statistic at drop u
        # restricted MLE of x = P(only new right) under P(only ref right) = x + u, numerically
        def minus_loglik(x: float) -> float:
            return -(b * np.log(x + u) + c * np.log(x) + (n - b - c) * np.log(1 - 2 * x - u))

        x = minimize_scalar(minus_loglik, bounds=(max(0.0, -u) + 1e-12, (1 - u) / 2 - 1e-12), method="bounded",
                            options={"xatol": 1e-12}).x
        return (b - c + 1 - n * u) / np.sqrt(n * (2 * x + u * (1 - u)))

    # upper: where the statistic crosses -z (one-sided 90%); high: -z at 95%; low: the swapped bound
    assert score(d.upper / 100, 3, 1) == pytest.approx(-Z90, abs=1e-5)
    assert score(d.high / 100, 3, 1) == pytest.approx(-Z95, abs=1e-5)
    assert score(-d.low / 100, 1, 3) == pytest.approx(-Z95, abs=1e-5)
    assert d.upper == pytest.approx(53.1859, abs=1e-4)
    assert (d.low, d.high) == pytest.approx((-25.1358, 58.8996), abs=1e-4)
    assert d.upper > 20.0 + Z90 * d.se  # the Wald bound: 44.3
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
    # (1 - 10 d)^2 = z^2 10 d (1 - d): 116.42 d^2 - 36.42 d + 1 = 0 (x100), larger root 28.244 points
    assert d.upper == pytest.approx(_upper_without_new_only(10, 0, Z90), rel=1e-6)
    assert d.upper == pytest.approx(28.2444, abs=1e-4) and d.low == pytest.approx(-d.high)


def test_few_disagreements_bound_at_least_the_exact_bound():
    # no row, then one row, in 1,101 where only the reference is right: the drop is at most the
    # only-ref-right rate, whose exact (Clopper-Pearson) 90% bound is 0.209 / 0.353 points; Wald said
    # 0.116 / 0.207
    exact = [100 * beta.ppf(0.9, b + 1, 1101 - b) for b in (0, 1)]
    assert exact == pytest.approx([100 * (1 - 0.1 ** (1 / 1101)), 0.35283], abs=1e-5)
    for b, bound in zip((0, 1), exact):
        upper = drop_upper(1101, b, 0)
        assert upper >= bound and upper == pytest.approx(_upper_without_new_only(1101, b, Z90), rel=1e-6)
    assert drop_upper(1101, 0, 0) == pytest.approx(0.3032, abs=1e-4)
    assert drop_upper(1101, 1, 0) == pytest.approx(0.4362, abs=1e-4)


def test_many_disagreements_stay_close_to_wald():
    # 46 vs 34 of 1,101: Wald 1.0899 + 1.2816 * 0.8117 = 2.13 points; two Clopper-Pearson bounds
    # combined (Bonferroni) would say ~2.84
    wald = 100 * (12 / 1101 + Z90 * np.sqrt((80 / 1101 - (12 / 1101) ** 2) / 1101))
    assert wald == pytest.approx(2.130, abs=1e-3)
    assert wald < drop_upper(1101, 46, 34) < wald + 0.15


def test_the_sign_convention():
    # 20 rows only the reference gets right, of 100: a drop of 20 points, and an interval above 0
    d = paired_drop(np.ones(100, bool), np.arange(100) >= 20)
    assert d.drop == 20 and d.low > 0 and d.upper > 20 and not d.within(0)
    back = paired_drop(np.arange(100) >= 20, np.ones(100, bool))  # the new model gains 20 points
    assert back.drop == -20 and back.upper < 0 and back.within(0)
    assert drop_upper(100, 20, 0) == pytest.approx(26.6673, abs=1e-4)
    assert drop_upper(100, 0, 20) == pytest.approx(-14.4891, abs=1e-4)


@pytest.mark.parametrize("n, nq, p", [(1000, 5, 0.9), (1000, 2, 0.7), (300, 20, 0.9), (3000, 50, 0.5),
                                      (300, 5, 0.3), (10000, 0.5, 0.9)])
def test_exact_coverage_at_or_above_the_level(n, nq, p):
    assert _exact_coverage(n, nq, p) >= 0.9


def test_exact_coverage_sees_a_dip():
    # the same enumeration on the uncorrected score bound: 0.8675 (experiments/results/promise/coverage.md)
    assert _exact_coverage(300, 5, 0.3, continuity=0.0) == pytest.approx(0.8675, abs=1e-4)


def test_vectorized_matches_scalar():
    n, b, c = np.array([300, 1101, 5000]), np.array([0, 46, 200]), np.array([3, 34, 150])
    got = drop_upper(n, b, c)
    assert got.shape == (3,) and got.tolist() == [drop_upper(*t) for t in zip(n, b, c)]
    assert drop_upper(1101, np.arange(4), 0).shape == (4,)


@st.composite
def _counts(draw):
    n = draw(st.integers(1, 20000))
    b = draw(st.integers(0, n))
    return n, b, draw(st.integers(0, n - b))


@settings(max_examples=150, deadline=None)
@given(_counts())
def test_upper_grows_with_ref_only_and_falls_with_new_only(counts):
    n, b, c = counts
    u = drop_upper(n, b, c)
    assert 100 * (b - c) / n <= u <= 100.0
    assert u <= drop_upper(n, b, c, confidence=0.95)
    if b + c < n:
        assert drop_upper(n, b + 1, c) >= u >= drop_upper(n, b, c + 1)
    if b > 0 and c < n:  # one row moved from only-ref-right to only-new-right
        assert drop_upper(n, b - 1, c + 1) < u


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200))
def test_interval_contains_estimate_and_swaps_sign(rows):
    ref = np.array([r for r, _ in rows])
    new = np.array([n for _, n in rows])
    d, back = paired_drop(ref, new), paired_drop(new, ref)
    assert d.low <= d.drop <= d.upper <= d.high
    assert back.drop == pytest.approx(-d.drop) and back.se == pytest.approx(d.se)
    assert (back.low, back.high) == pytest.approx((-d.high, -d.low))
    assert d.ref_accuracy - d.new_accuracy == pytest.approx(d.drop)


def test_errors():
    with pytest.raises(CahpError, match="paired rows differ"):
        paired_drop([True, False], [True])
    with pytest.raises(CahpError, match="no rows"):
        paired_drop([], [])
    with pytest.raises(CahpError, match="confidence"):
        paired_drop([True], [True], confidence=0.3)
    with pytest.raises(CahpError, match=r"ref_only \+ new_only <= n"):
        drop_upper(10, 6, 5)
    with pytest.raises(CahpError, match="n >= 1"):
        drop_upper(0, 0, 0)
    with pytest.raises(CahpError, match="continuity"):
        drop_upper(10, 1, 1, continuity=-1)


def test_correct_and_split_rows():
    assert correct(np.array([[0.1, 0.9], [0.8, 0.2]]), [1, 1]).tolist() == [True, False]
    assert correct([2, 0], [2, 1]).tolist() == [True, False]
    a, b = split_rows(100, 0.3, seed=1)
    assert len(b) == 30 and len(a) == 70 and not set(a) & set(b)
    assert np.array_equal(b, split_rows(100, 0.3, seed=1)[1])
    with pytest.raises(CahpError, match="confirmation fraction"):
        split_rows(10, 1.0)
