"""Loading a sequence classifier, dense or pruned by us, with clear errors.

``load_classifier`` accepts a local directory or a hub id. It sits above ``pruning`` (a pruned dir is
rebuilt by :func:`cahp_deploy.pruning.load_pruned`); what ``pruning`` itself needs (the config, the
pruner's config field, the dense load) is in :mod:`cahp_deploy.hf_classifier`, re-exported here.
"""

from __future__ import annotations

import os

from torch import nn

from cahp_deploy.hf_classifier import (
    KEPT_HEADS_FIELD,
    count_parameters,
    is_pruned,
    load_config,
    load_dense,
    load_tokenizer,
)
from cahp_deploy.pruning import load_pruned


def load_classifier(
    model: str | os.PathLike,
    attn_implementation: str | None = "eager",
    with_tokenizer: bool = True,
) -> tuple[nn.Module, object]:
    """Return ``(model, tokenizer)`` in eval mode, float32, on CPU.

    ``attn_implementation="eager"`` makes attention probabilities available (signatures need
    them); pass ``"sdpa"`` for speed when they are not needed. A directory written by
    ``cahp-deploy prune`` is rebuilt with :func:`cahp_deploy.pruning.load_pruned`.
    """
    config = load_config(model)
    if is_pruned(config):
        net = load_pruned(model, attn_implementation=attn_implementation)
    else:
        net = load_dense(model, attn_implementation)
    net = net.float().eval()
    return net, load_tokenizer(model) if with_tokenizer else None


__all__ = ["KEPT_HEADS_FIELD", "count_parameters", "is_pruned", "load_classifier", "load_config"]
