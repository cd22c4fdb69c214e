"""CAHP for FFN neurons: complementary neurons by clustering their separability profiles, per layer.

The heads' recipe carried over, with the changes that a layer of ~1,500 neurons (instead of ~12
heads) forces:

* **Profiles**: a neuron's JM separability over class pairs of its two activation features (mean over
  real tokens, first token), :func:`cahp_deploy.selection.separability.jm_profiles`; clustered in that
  space directly (P·2 dimensions, no t-SNE: it is small already).
* **Per layer**: neurons of different layers are never interchangeable (each layer's FFN writes its
  own residual update), so clustering is within a layer; one representative per cluster, the most
  salient one (first-order Taylor salience, as for heads).
* **How many per layer, with a budget** (``--ffn-neurons N`` / ``--ffn-keep-ratio R``): the global
  top-N of the salience grid decides each layer's share (the same allocation ``gradient`` uses, so
  the two differ only in *which* neurons a layer keeps); each layer then keeps one neuron per cluster
  with that many clusters.
* **How many, automatically** (CAHP, no budget): per layer, the knee of the MSS curve over a geometric
  grid of k (a full sweep 2..I-1 over ~1,500 neurons is thousands of k-medoids runs; ``GRID_POINTS``
  points cost a few seconds), found by the same knee detector as heads.

Pure numpy: no torch, no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cahp_deploy.errors import CahpError
from cahp_deploy.selection.clustering import distance_matrix, fasterpam, mean_simplified_silhouette
from cahp_deploy.selection.knee import find_knee
from cahp_deploy.selection.representatives import cluster_representatives
from cahp_deploy.selection.topk import keep_top_k

#: points of the geometric k grid of the per-layer MSS curve (automatic amount)
GRID_POINTS = 16


def resolve_neuron_budget(total: int, num_layers: int, neurons: int | None = None, keep_ratio: float | None = None,
                          allow_empty_layers: bool = False) -> int | None:
    """``--ffn-neurons`` / ``--ffn-keep-ratio`` -> a global neuron count (None when neither is given)."""
    if neurons is not None and keep_ratio is not None:
        raise CahpError("give at most one of --ffn-neurons and --ffn-keep-ratio")
    if keep_ratio is not None:
        if not 0.0 < float(keep_ratio) <= 1.0:
            raise CahpError(f"--ffn-keep-ratio must be in (0, 1], got {keep_ratio}")
        n = max(1, int(round(float(keep_ratio) * total)))
    elif neurons is not None:
        n = int(neurons)
        if not 1 <= n <= total:
            raise CahpError(f"--ffn-neurons must be between 1 and the model's {total} FFN neurons, got {n}")
    else:
        return None
    if n < num_layers and not allow_empty_layers:
        raise CahpError(f"keeping {n} FFN neurons leaves some of the {num_layers} layers without any; "
                        "keep at least one per layer or pass --allow-empty-layers")
    return n


def allocate(scores: np.ndarray, budget: int, allow_empty_layers: bool = False) -> list[list[int]]:
    """The global top-``budget`` of a (layers, neurons) score grid, each layer keeping one unless allowed
    to be empty: the per-layer shares (and, for ``gradient``, the selection itself)."""
    return keep_top_k(np.asarray(scores, dtype=np.float64), int(budget), min_per_layer=0 if allow_empty_layers else 1)


def complementary(profiles: np.ndarray, salience: np.ndarray, k: int, seed: int,
                  distances: np.ndarray | None = None) -> list[int]:
    """One most-salient neuron from each of ``k`` clusters of a layer's (I, F) profiles; sorted indices."""
    n = profiles.shape[0]
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    d = distance_matrix(profiles) if distances is None else distances
    clustering = fasterpam(d, int(k), int(seed))
    return sorted(int(i) for i in cluster_representatives(clustering, np.asarray(salience, dtype=np.float64), "salience"))


def k_grid(n: int, points: int = GRID_POINTS) -> list[int]:
    """A geometric grid of cluster counts in 2..n-1 (distinct integers)."""
    if n < 4:
        raise CahpError(f"the automatic FFN amount needs at least 4 neurons per layer, got {n}")
    return sorted({int(round(k)) for k in np.geomspace(2, n - 1, points)})


@dataclass(frozen=True)
class LayerKnee:
    """One layer's MSS curve over the k grid and its knee."""

    ks: list[int]
    mss: list[float]
    k: int
    method: str

    def to_dict(self) -> dict:
        return {"ks": self.ks, "mss": [round(m, 6) for m in self.mss], "k": self.k, "method": self.method}


def layer_knee(profiles: np.ndarray, seed: int, degree: int, distances: np.ndarray | None = None,
               points: int = GRID_POINTS) -> LayerKnee:
    """The knee of a layer's MSS curve over :func:`k_grid`: how many complementary neurons it needs."""
    d = distance_matrix(profiles) if distances is None else distances
    ks = k_grid(d.shape[0], points)
    mss = [mean_simplified_silhouette(d, fasterpam(d, k, seed)) for k in ks]
    knee = find_knee(ks, mss, min(int(degree), len(ks) - 1))
    return LayerKnee(ks=ks, mss=[float(m) for m in mss], k=int(knee.k), method=knee.method)


__all__ = ["GRID_POINTS", "LayerKnee", "allocate", "complementary", "k_grid", "layer_knee", "resolve_neuron_budget"]
