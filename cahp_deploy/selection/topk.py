"""Budgets and top-k: shared by every ranking method (gradient, attattr, gates...)."""

from __future__ import annotations

import numpy as np

from cahp_deploy.errors import CahpError


def resolve_budget(total: int, heads: int | None = None, keep_ratio: float | None = None,
                   budget_from: int | None = None) -> int | None:
    """Turn ``--heads`` / ``--keep-ratio`` / ``--budget-from`` into a head count (None if none given)."""
    given = [x is not None for x in (heads, keep_ratio, budget_from)]
    if sum(given) > 1:
        raise CahpError("give at most one of --heads, --keep-ratio and --budget-from")
    if heads is not None:
        k = int(heads)
    elif keep_ratio is not None:
        if not 0.0 < keep_ratio <= 1.0:
            raise CahpError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
        k = max(1, int(round(keep_ratio * total)))
    elif budget_from is not None:
        k = int(budget_from)
    else:
        return None
    if not 1 <= k <= total:
        raise CahpError(f"the budget must keep between 1 and {total} heads, got {k}")
    return k


def keep_top_k(scores: np.ndarray, k: int, min_per_layer: int = 0) -> list[list[int]]:
    """Keep the ``k`` highest-scoring heads of a (layers, heads) score grid.

    With ``min_per_layer=1`` each layer first keeps its best head, and the remaining budget goes to
    the best of the rest (so k must be >= the number of layers). Ties break by lower (layer, head)
    index, which makes the result deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_layers, n_heads = scores.shape
    if not 1 <= k <= scores.size:
        raise CahpError(f"cannot keep {k} heads of {scores.size}")
    if min_per_layer and k < n_layers * min_per_layer:
        raise CahpError(f"keeping {k} heads cannot give each of {n_layers} layers {min_per_layer} head(s)")
    flat = scores.ravel()
    # argsort on (-score, index): stable, highest first, ties by position
    order = np.lexsort((np.arange(flat.size), -flat))
    chosen: set[int] = set()
    if min_per_layer:
        for layer in range(n_layers):
            row = order[(order // n_heads) == layer]
            chosen.update(int(i) for i in row[:min_per_layer])
    for i in order:
        if len(chosen) >= k:
            break
        chosen.add(int(i))
    kept = [[] for _ in range(n_layers)]
    for i in sorted(chosen):
        kept[i // n_heads].append(i % n_heads)
    return kept


def kept_to_mask(kept: list[list[int]], n_heads: int) -> np.ndarray:
    mask = np.zeros((len(kept), n_heads), dtype=bool)
    for layer, heads in enumerate(kept):
        mask[layer, list(heads)] = True
    return mask
