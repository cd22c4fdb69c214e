"""Nested removal orders and the MAC steps of the progressive ladder (pure numpy, no model).

The progressive budget ladder removes about ``step`` of the dense MACs per rung, from heads and FFN
neurons together, and each rung keeps a subset of the rung before it (a removed unit never returns).
Two pieces make that possible without looking at any accuracy:

* :func:`nested_order`: CAHP's cuts at different sizes are not nested (the clustering at k-1 is not
  the clustering at k minus one cluster). A unit's *persistence* is how many of the cuts keep it; the
  removal order is ascending persistence, ties broken by ascending salience. Removing the first m
  units of that order gives nested kept sets that follow CAHP's sweep: the heads CAHP drops first
  when it has few clusters to spend are the heads removed first.
* :func:`next_units`: the next units of an order worth about a number of MACs, never the last unit of
  a layer where a layer must keep one (FFN neurons: an emptied FFN is allowed but gains one inert unit).
* :func:`aligned_kept`: the kept units with each layer's count rounded to a multiple (FFN widths that
  are multiples of 16 run faster in ONNX Runtime's INT8 GEMM), still nested from rung to rung.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def nested_order(kept_sets: Iterable[Iterable[int]], num_units: int, scores: Sequence[float] | None = None) -> list[int]:
    """Every unit 0..num_units-1 in removal order: least persistent across ``kept_sets`` first.

    ``kept_sets`` are the units each cut keeps (any number of cuts, any sizes); ``scores`` (higher =
    more important, e.g. gradient salience) break ties, then the unit index does.
    """
    persistence = np.zeros(num_units, dtype=np.int64)
    for kept in kept_sets:
        idx = np.fromiter((int(u) for u in kept), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= num_units):
            raise ValueError(f"a kept set names units outside 0..{num_units - 1}")
        persistence[np.unique(idx)] += 1
    tie = np.zeros(num_units) if scores is None else np.asarray(scores, dtype=np.float64)
    if tie.shape != (num_units,):
        raise ValueError(f"scores have shape {tie.shape}, expected ({num_units},)")
    return np.lexsort((np.arange(num_units), tie, persistence)).tolist()


def next_units(order: Sequence[int], removed: set[int], count: int, layer_of: Sequence[int],
               min_per_layer: int = 0) -> list[int]:
    """The next ``count`` units of ``order`` not yet ``removed``, leaving every layer at least
    ``min_per_layer`` units (``layer_of[u]`` is unit u's layer)."""
    left = np.bincount(np.asarray(layer_of)[[u for u in range(len(layer_of)) if u not in removed]],
                       minlength=max(layer_of) + 1 if len(layer_of) else 0)
    out: list[int] = []
    for u in order:
        if len(out) >= count:
            break
        if u in removed or left[layer_of[u]] <= min_per_layer:
            continue
        out.append(int(u))
        left[layer_of[u]] -= 1
    return out


def aligned_kept(order: Sequence[int], removed: set[int], units_per_layer: Sequence[int],
                 multiple: int = 1) -> list[list[int]]:
    """Per-layer kept local indices once ``removed`` is gone, each layer's count rounded to ``multiple``.

    ``removed`` must be a prefix of each layer's share of ``order`` (what :func:`next_units` takes).
    A layer keeping c of its n units keeps the last t of its share of the order, t = c rounded to the
    nearest multiple, at least one multiple (or n when smaller) and n when nothing was removed. t never
    grows as c shrinks, so kept sets stay nested however ``removed`` grows; ``multiple`` 1 keeps exactly
    the units not removed.
    """
    if multiple < 1:
        raise ValueError(f"the multiple must be at least 1, got {multiple}")
    offsets = np.concatenate([[0], np.cumsum(units_per_layer)]).astype(int)
    layer_of = layer_of_units(units_per_layer)
    shares: list[list[int]] = [[] for _ in units_per_layer]
    for u in order:
        shares[layer_of[u]].append(int(u))
    out = []
    for layer, share in enumerate(shares):
        n = int(units_per_layer[layer])
        gone = sum(u in removed for u in share)
        if any(u not in removed for u in share[:gone]):
            raise ValueError(f"layer {layer}: the removed units are not the first of the layer's order")
        c = n - gone
        t = c if c == n or multiple == 1 else min(n, max(multiple, multiple * int(np.floor(c / multiple + 0.5))))
        out.append(sorted(u - int(offsets[layer]) for u in share[n - t:]))
    return out


def per_layer(kept_units: Iterable[int], units_per_layer: Sequence[int]) -> list[list[int]]:
    """Global unit ids (layer by layer) -> per-layer sorted local indices."""
    offsets = np.concatenate([[0], np.cumsum(units_per_layer)])
    kept = sorted(int(u) for u in kept_units)
    return [[u - int(offsets[i]) for u in kept if offsets[i] <= u < offsets[i + 1]] for i in range(len(units_per_layer))]


def layer_of_units(units_per_layer: Sequence[int]) -> list[int]:
    """For each global unit id, its layer."""
    return [i for i, n in enumerate(units_per_layer) for _ in range(int(n))]


def mac_targets(step: float, floor: float) -> list[float]:
    """The shares of dense MACs the rungs keep: 1, 1 - step, 1 - 2 step, ... while >= floor."""
    if not 0.0 < step < 1.0:
        raise ValueError(f"the MAC step must be in (0, 1), got {step}")
    if not 0.0 < floor < 1.0:
        raise ValueError(f"the MAC floor must be in (0, 1), got {floor}")
    n = int(np.floor((1.0 - floor) / step + 1e-9))
    return [round(1.0 - i * step, 6) for i in range(n + 1)]


__all__ = ["aligned_kept", "layer_of_units", "mac_targets", "nested_order", "next_units", "per_layer"]
