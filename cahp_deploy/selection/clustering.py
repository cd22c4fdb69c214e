"""k-medoids (FasterPAM) over heads and the Mean Simplified Silhouette (MSS) sweep.

CAHP, step 4. For k = 2 .. N-1 the heads are clustered with FasterPAM (``kmedoids``) on Euclidean
distances, and each clustering is scored by its Mean Simplified Silhouette:

::

    a(i) = d(x_i, own medoid)
    b(i) = mean over the other k-1 medoids m of d(x_i, m)
    s(i) = (b(i) - a(i)) / max(a(i), b(i))          only for points with a(i) > 0
    MSS  = mean of s(i)                             (1 when every point sits on its medoid)

Conventions where the paper is silent: b is the *mean* distance to the other medoids (the
reference code does this, and the project's spec follows it, although the classic simplified
silhouette takes the nearest one); points with a = 0 (the medoids, duplicates of them) are left out
of the mean; distances are exact (``scipy`` ``pdist``), so a medoid's distance to itself is exactly 0.

The sweep stops at the first k whose MSS reaches 1, and the rest of the curve is filled with 1.0
(no clustering can do better), which is what the knee detector then sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cahp_deploy.errors import CahpError


@dataclass(frozen=True)
class Clustering:
    """One k-medoids result. ``labels[i]`` indexes ``medoids``; ``medoids`` are point indices."""

    labels: np.ndarray
    medoids: np.ndarray

    @property
    def k(self) -> int:
        return int(len(self.medoids))

    def members(self, cluster: int) -> np.ndarray:
        return np.flatnonzero(self.labels == cluster)


@dataclass
class Sweep:
    """The MSS curve over k and the clustering behind each computed point.

    ``mss[i]`` belongs to ``ks[i]``. Points after ``stopped_at`` were not computed (filled with 1.0).
    """

    ks: list[int]
    mss: list[float]
    clusterings: dict[int, Clustering] = field(default_factory=dict)
    stopped_at: int | None = None

    def curve(self) -> dict[int, float]:
        return dict(zip(self.ks, self.mss))


def distance_matrix(points: np.ndarray) -> np.ndarray:
    """(N, F) points -> (N, N) float64 Euclidean distances, exactly 0 on the diagonal."""
    from scipy.spatial.distance import pdist, squareform

    return squareform(pdist(np.asarray(points, dtype=np.float64), metric="euclidean"))


def fasterpam(distances: np.ndarray, k: int, seed: int) -> Clustering:
    """k-medoids by FasterPAM with random initial medoids drawn from ``seed`` (as the reference code)."""
    import kmedoids

    n = distances.shape[0]
    if not 1 <= k <= n:
        raise CahpError(f"cannot form {k} clusters from {n} heads; k must be in 1..{n}")
    if k == n:  # every head its own cluster; FasterPAM has nothing to swap
        return Clustering(labels=np.arange(n, dtype=np.int64), medoids=np.arange(n, dtype=np.int64))
    # n_cpu=1: the sequential, seeded variant (the library picks it itself below 1000 points).
    res = kmedoids.fasterpam(distances, k, max_iter=100, init="random", random_state=int(seed), n_cpu=1)
    return Clustering(labels=np.asarray(res.labels, dtype=np.int64), medoids=np.asarray(res.medoids, dtype=np.int64))


def mean_simplified_silhouette(distances: np.ndarray, clustering: Clustering) -> float:
    """MSS of one clustering (see the module docstring); needs k >= 2."""
    k = clustering.k
    if k < 2:
        raise CahpError(f"the simplified silhouette needs at least 2 clusters, got {k}")
    to_medoids = distances[:, clustering.medoids]  # (N, k)
    a = to_medoids[np.arange(len(clustering.labels)), clustering.labels]
    b = (to_medoids.sum(axis=1) - a) / (k - 1)
    valid = a > 0
    if not valid.any():
        return 1.0
    a, b = a[valid], b[valid]
    return float(np.mean((b - a) / np.maximum(a, b)))


def mss_sweep(distances: np.ndarray, seed: int, k_min: int = 2, k_max: int | None = None,
              on_step=None) -> Sweep:
    """Cluster for k = k_min .. k_max (default N - 1) and score each clustering by MSS.

    ``on_step(k)`` is called after each k (for a progress bar).
    """
    n = distances.shape[0]
    k_max = n - 1 if k_max is None else k_max
    if n < 3 or not 2 <= k_min <= k_max <= n - 1:
        raise CahpError(f"the MSS sweep needs 2 <= k_min <= k_max <= N-1; got k {k_min}..{k_max} for N={n} heads")
    ks = list(range(k_min, k_max + 1))
    sweep = Sweep(ks=ks, mss=[])
    for k in ks:
        c = fasterpam(distances, k, seed)
        sweep.clusterings[k] = c
        value = mean_simplified_silhouette(distances, c)
        sweep.mss.append(value)
        if on_step is not None:
            on_step(k)
        if value >= 1.0:
            sweep.stopped_at = k
            sweep.mss.extend([1.0] * (len(ks) - len(sweep.mss)))
            break
    return sweep


__all__ = ["Clustering", "Sweep", "distance_matrix", "fasterpam", "mean_simplified_silhouette", "mss_sweep"]
