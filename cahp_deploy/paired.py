"""Paired accuracy differences with their uncertainty: the one place a promise about accuracy is judged.

Two models scored on the *same* rows disagree only on the discordant rows, so the difference of their
accuracies has a much smaller standard error than two independent accuracies would (on ~1,000 rows it
is still 1-2 points). Every accuracy promise the tool makes (the INT8 gate, the accuracy budget, the
confirmation on rows a decision never saw) is judged here, on the upper confidence bound of the drop,
never on the point estimate alone: a point estimate on the rows a search tuned on picks noise in its
favour.

Per row i, ``d_i = correct_ref_i - correct_new_i`` in {-1, 0, 1}; the drop is ``mean(d)`` (in points,
x100). Its standard error is the paired one, ``sd(d) / sqrt(n)``, which only the discordant rows feed:
``var(d) = (b + c)/n - ((b - c)/n)^2`` with b rows only the reference gets right and c rows only the
new model gets right (McNemar's counts). The interval is the normal (Wald) interval on the paired
mean; with no discordant row the standard error is taken as that of one discordant row
(``1/n``), so a zero-disagreement sample of 10 rows does not claim a zero-width interval.

Pure numpy, no torch: the statistics are tested on hand-computed cases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from cahp_deploy.errors import CahpError

#: one-sided confidence of every upper bound the tool decides on (and the two-sided level printed)
DEFAULT_CONFIDENCE = 0.90


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop of ``new`` against ``ref`` on the same rows, in points (positive = worse).

    ``upper`` is the one-sided upper confidence bound at ``confidence``; ``low``/``high`` the two-sided
    interval at the same level (what a report prints). ``ref_only`` / ``new_only`` count the discordant
    rows (only the reference right / only the new model right).
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


def paired_drop(ref_correct, new_correct, confidence: float = DEFAULT_CONFIDENCE) -> PairedDrop:
    """The drop ``acc(ref) - acc(new)`` in points, its paired standard error and confidence bounds.

    Parameters
    ----------
    ref_correct, new_correct : (n,) bool, whether each model got row i right; the same rows, same order.
    confidence : in (0.5, 1); the one-sided level of ``upper`` and the two-sided level of (low, high).
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
    z_one = float(norm.ppf(confidence))
    z_two = float(norm.ppf(0.5 + confidence / 2))
    pts = 100.0
    return PairedDrop(
        n=n,
        ref_accuracy=float(ref.mean() * pts),
        new_accuracy=float(new.mean() * pts),
        drop=float(mean * pts),
        se=float(se * pts),
        upper=float((mean + z_one * se) * pts),
        low=float((mean - z_two * se) * pts),
        high=float((mean + z_two * se) * pts),
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


__all__ = ["DEFAULT_CONFIDENCE", "PairedDrop", "correct", "paired_drop", "split_rows"]
