"""Physical head pruning: the rewriter, ``load_pruned``, parameter/MAC accounting, the ``prune`` stage.

* :func:`prune_model` — in-memory surgery of a dense classifier (ragged heads, zero-head layers, FFN neurons).
* :func:`load_pruned` — rebuild a pruned dir from its ``config.json`` (no ``prune_heads``).
* :func:`prune` — the stage: validate a selection, prune, save atomically with ``pruning.json``.
* :mod:`cahp_deploy.pruning.costs` — parameters and multiply-accumulates before/after.
"""

from cahp_deploy.pruning.load import load_pruned
from cahp_deploy.pruning.rewrite import (
    DENSE_HEADS_FIELD,
    DENSE_INTERMEDIATE_FIELD,
    KEPT_NEURONS_FIELD,
    prune_model,
    validate_kept_heads,
    validate_kept_neurons,
)
from cahp_deploy.pruning.stage import prune

__all__ = ["DENSE_HEADS_FIELD", "DENSE_INTERMEDIATE_FIELD", "KEPT_NEURONS_FIELD", "load_pruned", "prune",
           "prune_model", "validate_kept_heads", "validate_kept_neurons"]
