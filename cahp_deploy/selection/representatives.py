"""Which head stands for each cluster, and the per-layer guard.

CAHP, steps 6 and 7. Heads are numbered globally, layer by layer: head h of layer l is
``sum(heads_per_layer[:l]) + h``.

* Representatives: from each cluster at k*, the head with the highest gradient salience (the
  reference code's weighted form), or the cluster's medoid (``representative="medoid"``). Ties go
  to the lowest global index, so the choice is deterministic.
* Guard: a layer left with no head gets back its most salient head (the reference code's
  "min-keep constraint"); turned off, a layer may end with no attention at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cahp_deploy.errors import CahpError
from cahp_deploy.selection.clustering import Clustering

REPRESENTATIVES = ("salience", "medoid")


def layer_offsets(heads_per_layer: Sequence[int]) -> np.ndarray:
    """Global index of each layer's first head, plus the total at the end."""
    return np.concatenate([[0], np.cumsum(np.asarray(heads_per_layer, dtype=np.int64))])


def to_global(layer: int, head: int, heads_per_layer: Sequence[int]) -> int:
    return int(layer_offsets(heads_per_layer)[layer] + head)


def to_layer_head(g: int, heads_per_layer: Sequence[int]) -> tuple[int, int]:
    """Global head index -> (layer, head within the layer)."""
    offsets = layer_offsets(heads_per_layer)
    if not 0 <= g < offsets[-1]:
        raise CahpError(f"head index {g} is outside 0..{offsets[-1] - 1}")
    layer = int(np.searchsorted(offsets, g, side="right") - 1)
    return layer, int(g - offsets[layer])


def split_by_layer(global_ids, heads_per_layer: Sequence[int]) -> list[list[int]]:
    """Global head indices -> per layer, ascending local head indices."""
    kept: list[list[int]] = [[] for _ in heads_per_layer]
    for g in sorted({int(g) for g in global_ids}):
        layer, head = to_layer_head(g, heads_per_layer)
        kept[layer].append(head)
    return kept


def cluster_representatives(clustering: Clustering, salience: np.ndarray | None = None,
                            representative: str = "salience") -> list[int]:
    """One global head index per cluster, in cluster order."""
    if representative not in REPRESENTATIVES:
        raise CahpError(f"unknown representative rule {representative!r}; choose from {', '.join(REPRESENTATIVES)}")
    if representative == "medoid":
        return [int(m) for m in clustering.medoids]
    if salience is None:
        raise CahpError("salience representatives need a salience vector; use representative='medoid' otherwise")
    salience = np.asarray(salience, dtype=np.float64)
    if salience.shape != clustering.labels.shape:
        raise CahpError(f"salience has {salience.size} values for {clustering.labels.size} heads")
    reps = []
    for c in range(clustering.k):
        members = clustering.members(c)
        reps.append(int(members[int(np.argmax(salience[members]))]))  # argmax: first (lowest index) on ties
    return reps


def guard_layers(kept: list[list[int]], scores: Sequence[Sequence[float]]) -> tuple[list[list[int]], list[int]]:
    """Give every empty layer back its best-scoring head. Returns (kept per layer, rescued layers).

    ``scores`` is per layer, per head (the salience grid); ties go to the lower head index.
    """
    if len(scores) != len(kept):
        raise CahpError(f"the guard got scores for {len(scores)} layers and a selection of {len(kept)}")
    out = [sorted(int(h) for h in layer) for layer in kept]
    rescued = []
    for i, layer in enumerate(out):
        if not layer and len(scores[i]):
            out[i] = [int(np.argmax(np.asarray(scores[i], dtype=np.float64)))]
            rescued.append(i)
    return out, rescued


__all__ = [
    "REPRESENTATIVES",
    "cluster_representatives",
    "guard_layers",
    "layer_offsets",
    "split_by_layer",
    "to_global",
    "to_layer_head",
]
