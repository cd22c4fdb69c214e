"""The knee of the MSS(k) curve: how many clusters, hence how many heads, to keep.

CAHP, step 5. As in the reference code: Kneedle (``kneed.KneeLocator``) with ``curve="concave"``,
``direction="increasing"``, sensitivity ``S=1`` and polynomial smoothing of degree ``degree``
(default 6) fitted to MSS over k.

Kneedle can find no knee (a straight or convex curve has no point that clears its threshold); the
reference code then crashes on ``int(None)``. Our documented fallbacks, recorded in
:attr:`Knee.method` so the result says which rule chose k*:

``"kneedle"``         Kneedle found the knee (the normal case, ``found=True``).
``"max_difference"``  no knee: Kneedle's own rule without its threshold test, i.e. the k whose
                      normalised fitted MSS lies farthest above the chord from the first to the last
                      k (the first such k on ties).
``"flat_curve"``      MSS is constant (e.g. 1 from the first k on): the smallest k, since more
                      clusters buy nothing.
``"single_point"``    the sweep has one k (a model with 3 heads): that k.

A curve with fewer than ``degree + 1`` points is fitted with degree ``len(ks) - 1`` (``degree_used``).
``degree=0`` turns smoothing off (Kneedle on the raw curve, ``interp_method="interp1d"``).

Why offer ``degree=0``: on a step-shaped curve (well-separated groups of heads: MSS jumps to ~1 at
the true number of groups K, then stays flat) a degree-6 polynomial cannot follow the step, and its
knee lands one to a few k after K (for 72 heads and K = 4: k* = 10). Raw Kneedle finds K exactly.
Real MSS curves rise gradually and noisily, which is what the reference's smoothing is for, so
the default stays 6.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cahp_deploy.errors import CahpError

DEFAULT_DEGREE = 6


@dataclass(frozen=True)
class Knee:
    """Where the MSS curve bends, and how that k was chosen."""

    k: int
    method: str
    found: bool
    degree: int
    degree_used: int
    coefficients: tuple[float, ...]  # of the fitted polynomial in k, highest power first (none if degree 0)
    fitted: tuple[float, ...]  # the polynomial at each k of the curve (the raw curve if degree 0)

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "method": self.method,
            "found": self.found,
            "degree": self.degree,
            "degree_used": self.degree_used,
            "coefficients": list(self.coefficients),
            "fitted": list(self.fitted),
        }


def _fit(ks: np.ndarray, mss: np.ndarray, degree: int) -> np.ndarray:
    with warnings.catch_warnings():  # high degrees over k = 2..N are ill-conditioned (RankWarning)
        warnings.simplefilter("ignore")
        return np.polyfit(ks, mss, degree)


def find_knee(ks, mss, degree: int = DEFAULT_DEGREE) -> Knee:
    """The knee of MSS(k); never None (see the module docstring for the fallbacks)."""
    ks = np.asarray(ks, dtype=np.float64)
    mss = np.asarray(mss, dtype=np.float64)
    if ks.ndim != 1 or ks.shape != mss.shape or ks.size == 0:
        raise CahpError(f"the MSS curve needs equally long, non-empty k and MSS lists; got {ks.shape} and {mss.shape}")
    if not np.all(np.diff(ks) > 0):
        raise CahpError("the k values of the MSS curve must be strictly increasing")
    if int(degree) < 0:
        raise CahpError(f"--degree must be 0 (no smoothing) or more, got {degree}")
    degree = int(degree)
    deg = min(degree, ks.size - 1)
    if ks.size == 1:
        return Knee(int(ks[0]), "single_point", False, degree, 0, (float(mss[0]),), (float(mss[0]),))
    coef = _fit(ks, mss, deg) if deg > 0 else np.zeros(0)
    fitted = np.polyval(coef, ks) if deg > 0 else mss.copy()
    common = dict(degree=degree, degree_used=deg, coefficients=tuple(map(float, coef)), fitted=tuple(map(float, fitted)))
    if np.ptp(mss) <= 1e-12:
        return Knee(int(ks[0]), "flat_curve", False, **common)

    from kneed import KneeLocator

    knee = None
    if np.ptp(fitted) > 0:
        with warnings.catch_warnings():  # "No knee/elbow found" is handled below
            warnings.simplefilter("ignore")
            knee = KneeLocator(
                ks, mss, S=1.0, curve="concave", direction="increasing",
                interp_method="polynomial" if deg > 0 else "interp1d", polynomial_degree=max(deg, 1),
            ).knee
    if knee is not None:
        return Knee(int(round(float(knee))), "kneedle", True, **common)
    # Kneedle's difference curve without the threshold test.
    if np.ptp(fitted) <= 0:
        return Knee(int(ks[0]), "flat_curve", False, **common)
    y = (fitted - fitted.min()) / np.ptp(fitted)
    x = (ks - ks[0]) / (ks[-1] - ks[0])
    return Knee(int(ks[int(np.argmax(y - x))]), "max_difference", False, **common)


__all__ = ["DEFAULT_DEGREE", "Knee", "find_knee"]
