"""Paired accuracy differences with their uncertainty: the one place a promise about accuracy is judged.

Two models scored on the *same* rows disagree only on the discordant rows, so the difference of their
accuracies has a much smaller standard error than two independent accuracies would (on ~1,000 rows it
is still 1-2 points). Every accuracy promise the tool makes (the INT8 gate, the accuracy budget, the
confirmation on rows a decision never saw) is judged here, on the upper confidence bound of the drop,
never on the point estimate alone: a point estimate on the rows a search tuned on picks noise in its
favour.

Per row i, ``d_i = correct_ref_i - correct_new_i`` in {-1, 0, 1}; the drop is ``mean(d)`` (in points,
x100), with b rows only the reference gets right and c rows only the new model gets right (McNemar's
counts). ``se`` is the paired standard error ``sd(d) / sqrt(n)`` that reports print,
``var(d) = (b + c)/n - ((b - c)/n)^2``, taken as one discordant row's (``1/n``) when b = c = 0.

The bounds are *not* ``drop +- z * se``: that Wald interval is optimistic where near-dense candidates
and INT8 graphs live, with few discordant rows (no disagreement in 1,101 rows bounded the drop by
0.12 points; even the bound of the only-reference-right rate alone, which caps the drop, is 0.21).
They invert Tango's score test for a difference of paired proportions (Tango 1998, Statistics in
Medicine 17:891-908): under H0 "drop = d" the variance of (b - c)/n is taken at the restricted
maximum-likelihood estimate of the discordant probabilities, not at the observed counts, so it does
not vanish with b = c = 0; the upper bound is the largest d that the one-sided test does not reject
(a bisection, vectorized over count pairs in :func:`drop_upper`). The test's b - c is raised by one
row, which widens the bound: given the discordant count m, b - c = 2b - m moves in steps of 2, and
one row is half a step (Edwards' continuity correction of McNemar's test); the plain score bound
falls below its level with a handful of discordant rows. Exact one-sided coverage at 90% (``experiments/paired_coverage.py``,
300..10,000 rows, 0.1..250 expected discordant rows): at least 0.909, Wald's 0.695, the uncorrected
score's 0.831; 46 vs 34 discordant rows of 1,101 give an upper bound of 2.24 points, Wald's 2.13.

Pure numpy, no torch: the statistics are tested on hand-computed cases and exact coverage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from cahp_deploy.config import DEFAULT_CONFIDENCE  # one-sided, of every bound decided on (two-sided printed)
from cahp_deploy.errors import CahpError
#: how the bounds are computed (recorded with every drop)
METHOD = "tango-score-cc"
#: the continuity correction of b - c, in rows: half of its step of 2 once b + c is known
CONTINUITY = 1.0
#: bisection steps: the bracket [drop, 1] shrinks below a double's resolution
_BISECTIONS = 64


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop of ``new`` against ``ref`` on the same rows, in points (positive = worse).

    ``upper`` is the one-sided upper confidence bound at ``confidence``; ``low``/``high`` the two-sided
    interval at the same level (what a report prints); ``method`` names how they were computed
    (:data:`METHOD`). ``se`` is the paired standard error, for reports only: no bound uses it.
    ``ref_only`` / ``new_only`` count the discordant rows (only the reference right / only the new
    model right).
    """

    n: int
    ref_accuracy: float
    new_accuracy: float
    drop: float
    se: float
    upper: float
    low: float
    high: float
    confidence: float
    ref_only: int
    new_only: int
    method: str = METHOD

    def within(self, max_drop: float) -> bool:
        """Whether the drop's upper confidence bound is at most ``max_drop`` points."""
        return self.upper <= float(max_drop) + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """``-0.8 points (90% CI -2.1 .. +0.5, 1101 rows)``: a drop as a user reads it."""
        return (f"{-self.drop:+.1f} points ({self.confidence:.0%} CI {-self.high:+.1f} .. {-self.low:+.1f}, "
                f"{self.n} rows)")


def _as_correct(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise CahpError(f"{name} must be a 1-D array of per-row correctness, got shape {a.shape}")
    return a.astype(bool)


def _score_z(n, b, c, d, continuity):
    """Tango's score statistic of H0 "drop = d" (fractions), with b - c raised by ``continuity`` rows.

    Under H0, P(only ref right) = P(only new right) + d; the restricted MLE of P(only new right) is
    the positive root of ``2n x^2 + (-(b + c) + (2n - b + c) d) x - c d (1 - d) = 0``, and the variance of
    b - c is ``n (2x + d (1 - d))``. Negative when the observed drop is below d.
    """
    qa = 2.0 * n
    qb = -b - c + (2.0 * n - b + c) * d
    qc = -c * d * (1.0 - d)
    x = (-qb + np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0))) / (2.0 * qa)
    var = n * (2.0 * x + d * (1.0 - d))
    num = b - c + continuity - n * d
    # var = 0 only at d = +-1, where the sign of the numerator decides
    return np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), np.where(num >= 0, np.inf, -np.inf))


def drop_upper(n, ref_only, new_only, confidence: float = DEFAULT_CONFIDENCE, continuity: float = CONTINUITY):
    """The one-sided upper confidence bound (points) of the drop from McNemar's counts; vectorized.

    Parameters
    ----------
    n : int or array, rows compared (>= 1).
    ref_only, new_only : int or arrays broadcasting with ``n``: rows only the reference / only the new
        model gets right (``ref_only + new_only <= n``).
    confidence : in (0.5, 1), the one-sided level.
    continuity : rows of continuity correction (default :data:`CONTINUITY`, 1); 0 gives the plain
        score bound, which falls below its level with a handful of discordant rows
        (``experiments/paired_coverage.py`` measures both).

    Returns
    -------
    float for scalar input, else an array of the broadcast shape: the largest drop that Tango's
    continuity-corrected score test (:func:`_score_z`) does not reject at ``1 - confidence``; at least
    the observed drop, at most 100.
    """
    if not 0.5 < float(confidence) < 1.0:
        raise CahpError(f"confidence must be in (0.5, 1), got {confidence}")
    if not 0.0 <= float(continuity) <= 2.0:
        raise CahpError(f"continuity must be in [0, 2] rows, got {continuity}")
    n, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (n, ref_only, new_only)))
    if np.any(n < 1) or np.any(b < 0) or np.any(c < 0) or np.any(b + c > n):
        raise CahpError("need n >= 1 rows and 0 <= ref_only, new_only with ref_only + new_only <= n; "
                        f"got n={n.ravel()[:3]}, ref_only={b.ravel()[:3]}, new_only={c.ravel()[:3]} (first 3)")
    z = float(norm.ppf(confidence))
    # the statistic falls as d grows: bisect for its crossing of -z between the observed drop and 1
    lo, hi = (b - c) / n, np.ones_like(n)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        keep = _score_z(n, b, c, mid, continuity) >= -z
        lo, hi = np.where(keep, mid, lo), np.where(keep, hi, mid)
    upper = 100.0 * np.where(_score_z(n, b, c, 1.0, continuity) >= -z, 1.0, lo)
    return float(upper) if upper.ndim == 0 else upper


def paired_drop(ref_correct, new_correct, confidence: float = DEFAULT_CONFIDENCE) -> PairedDrop:
    """The drop ``acc(ref) - acc(new)`` in points, its paired standard error and confidence bounds.

    Parameters
    ----------
    ref_correct, new_correct : (n,) bool, whether each model got row i right; the same rows, same order.
    confidence : in (0.5, 1); the one-sided level of ``upper`` and the two-sided level of (low, high).
        ``high`` is :func:`drop_upper` at ``(1 + confidence) / 2``, ``low`` minus the same bound with
        the models swapped, so swapping them swaps and negates the interval.
    """
    ref = _as_correct(ref_correct, "ref_correct")
    new = _as_correct(new_correct, "new_correct")
    if ref.shape != new.shape:
        raise CahpError(f"paired rows differ: {ref.shape[0]} reference rows vs {new.shape[0]} new rows")
    n = int(ref.shape[0])
    if n == 0:
        raise CahpError("no rows to compare accuracies on")
    if not 0.5 < float(confidence) < 1.0:
        raise CahpError(f"confidence must be in (0.5, 1), got {confidence}")
    b = int(np.sum(ref & ~new))
    c = int(np.sum(~ref & new))
    mean = (b - c) / n
    var = max((b + c) / n - mean * mean, 0.0)
    se = np.sqrt(var / n) if b + c > 0 else 1.0 / n
    two_sided = 0.5 + float(confidence) / 2
    pts = 100.0
    return PairedDrop(
        n=n,
        ref_accuracy=float(ref.mean() * pts),
        new_accuracy=float(new.mean() * pts),
        drop=float(mean * pts),
        se=float(se * pts),
        upper=drop_upper(n, b, c, confidence),
        low=-drop_upper(n, c, b, two_sided),
        high=drop_upper(n, b, c, two_sided),
        confidence=float(confidence),
        ref_only=b,
        new_only=c,
    )


def correct(logits_or_predictions, labels) -> np.ndarray:
    """(n,) bool: argmax of (n, C) logits, or (n,) predicted ids, equal to ``labels``."""
    pred = np.asarray(logits_or_predictions)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise CahpError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    return pred == labels


def split_rows(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)`` into (decision rows, confirmation rows), each sorted.

    ``fraction`` of the rows (rounded, at least one on each side) go to the confirmation part: rows a
    decision never sees, on which its promise is re-measured.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise CahpError(f"the confirmation fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise CahpError(f"need at least 2 rows to hold some out for confirmation, got {n}")
    k = min(max(1, int(round(n * float(fraction)))), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


__all__ = ["CONTINUITY", "DEFAULT_CONFIDENCE", "METHOD", "PairedDrop", "correct", "drop_upper", "paired_drop",
           "split_rows"]
