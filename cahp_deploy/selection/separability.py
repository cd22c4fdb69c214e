"""Class separability of each head's attention signature: Jeffries-Matusita (JM) profiles.

CAHP, step 2. Every head has, per class, a mean and a variance of each of its D pooled attention
cells. Treating each cell as a univariate Gaussian per class, the JM distance between two classes
says how well that cell separates them; a head's *profile* is the concatenation of its per-cell JM
distances over all class pairs. Heads whose profiles look alike separate the same classes in the
same places, so one of them can stand in for the others.

::

    Bh = (m1 - m2)^2 / (4 (v1 + v2)) + 0.5 ln((v1 + v2) / (2 sqrt(v1 v2)))     (Bhattacharyya)
    JM = 2 (1 - exp(-Bh))                                                     in [0, 2)

Variances are floored at ``VARIANCE_FLOOR`` (1e-6, as the reference code does) so constant cells
(e.g. a class seen once, or attention that never moves) give finite distances.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from cahp_deploy.errors import CahpError

#: Lower bound on every variance before the Bhattacharyya distance (the reference code's ``eps``).
VARIANCE_FLOOR = 1e-6


def bhattacharyya(m1, v1, m2, v2, floor: float = VARIANCE_FLOOR) -> np.ndarray:
    """Element-wise Bhattacharyya distance between univariate Gaussians N(m1, v1) and N(m2, v2)."""
    v1 = np.maximum(np.asarray(v1, dtype=np.float64), floor)
    v2 = np.maximum(np.asarray(v2, dtype=np.float64), floor)
    diff2 = (np.asarray(m1, dtype=np.float64) - np.asarray(m2, dtype=np.float64)) ** 2
    s = v1 + v2
    return diff2 / (4.0 * s) + 0.5 * np.log(s / (2.0 * np.sqrt(v1 * v2)))


def jm_distance(m1, v1, m2, v2, floor: float = VARIANCE_FLOOR) -> np.ndarray:
    """Element-wise Jeffries-Matusita distance, 2 (1 - exp(-Bh)): 0 for identical Gaussians, -> 2 apart."""
    return 2.0 * (1.0 - np.exp(-bhattacharyya(m1, v1, m2, v2, floor)))


def class_pairs(num_classes: int) -> list[tuple[int, int]]:
    """The C(C, 2) class pairs in the order their blocks appear in a profile: (0,1), (0,2), ..., (C-2, C-1)."""
    return list(combinations(range(num_classes), 2))


def jm_profiles(mean: np.ndarray, var: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Every head's separability profile.

    Parameters
    ----------
    mean, var : (N heads, C classes, D cells) per-class mean and sample variance of each cell.
    counts : (C,) examples seen per class. A pair with an unseen class contributes zeros (no evidence
        of separation), as in the reference code.

    Returns
    -------
    (N, P * D) float32, P = C (C - 1) / 2; block p holds the D per-cell JM distances of pair p in
    :func:`class_pairs` order.
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    if mean.ndim != 3 or mean.shape != var.shape:
        raise CahpError(f"mean and var must both be (heads, classes, cells); got {mean.shape} and {var.shape}")
    n, c, d = mean.shape
    if c < 2:
        raise CahpError(f"separability needs at least 2 classes, got {c}")
    seen = np.ones(c, dtype=bool) if counts is None else np.asarray(counts) > 0
    pairs = class_pairs(c)
    out = np.zeros((n, len(pairs) * d), dtype=np.float32)
    for p, (a, b) in enumerate(pairs):
        if seen[a] and seen[b]:
            out[:, p * d : (p + 1) * d] = jm_distance(mean[:, a], var[:, a], mean[:, b], var[:, b])
    return out


__all__ = ["VARIANCE_FLOOR", "bhattacharyya", "class_pairs", "jm_distance", "jm_profiles"]
