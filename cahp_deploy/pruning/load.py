"""Reload a pruned model dir from its config alone, without ``prune_heads`` or ``pruned_heads``.

Rebuild the dense architecture from ``config.json`` (our fields and ``pruned_heads`` removed),
narrow it with the same rewriter that pruned it, then load ``model.safetensors`` strictly: any
disagreement between the recorded shape and the weights is an error, never a silent partial load.

transformers v5 upgrade: nothing here depends on ``prune_heads``; only ``config.pruned_heads``
(which v5 no longer knows) is cleared, harmlessly, before building the dense model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.hf_classifier import KEPT_HEADS_FIELD, load_config
from cahp_deploy.pruning.rewrite import (
    DENSE_HEADS_FIELD,
    DENSE_INTERMEDIATE_FIELD,
    KEPT_NEURONS_FIELD,
    prune_model,
    validate_kept_heads,
)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CahpError(f"{path} has no single-file weights (model.safetensors or pytorch_model.bin); sharded pruned models are not supported")


def load_pruned(path: str | os.PathLike, attn_implementation: str | None = "eager") -> nn.Module:
    """Return the pruned classifier written by ``cahp-deploy prune`` (float32, eval mode, CPU)."""
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    config = load_config(path)
    kept = getattr(config, KEPT_HEADS_FIELD, None)
    if kept is None:
        raise CahpError(f"{path} is not a pruned model (config.json has no {KEPT_HEADS_FIELD}); load it with load_classifier")
    n_layers, dense = arch.dense_head_grid(config)
    recorded_dense = getattr(config, DENSE_HEADS_FIELD, dense)
    if recorded_dense != dense:
        raise CahpError(f"{path}/config.json: {DENSE_HEADS_FIELD}={recorded_dense} disagrees with the architecture's {dense} heads per layer")
    kept = validate_kept_heads(kept, n_layers, dense, source=f"{path}/config.json {KEPT_HEADS_FIELD}")

    neurons = getattr(config, KEPT_NEURONS_FIELD, None)
    if neurons is not None:
        recorded_inter = getattr(config, DENSE_INTERMEDIATE_FIELD, arch.intermediate_size(config))
        if recorded_inter != arch.intermediate_size(config):
            raise CahpError(f"{path}/config.json: {DENSE_INTERMEDIATE_FIELD}={recorded_inter} disagrees with the "
                            f"architecture's {arch.intermediate_size(config)} neurons per layer")

    dense_config = copy.deepcopy(config)
    for field in (KEPT_HEADS_FIELD, DENSE_HEADS_FIELD, KEPT_NEURONS_FIELD, DENSE_INTERMEDIATE_FIELD):
        if hasattr(dense_config, field):
            delattr(dense_config, field)
    dense_config.pruned_heads = {}  # 4.x would otherwise prune in __init__ (and crash on 0-head layers)
    try:
        # no dtype kwarg: its name changed in 4.56 (torch_dtype -> dtype); .float() below covers it
        model = AutoModelForSequenceClassification.from_config(dense_config, attn_implementation=attn_implementation)
    except ValueError as e:
        raise CahpError(f"cannot build {path} with attn_implementation={attn_implementation!r}: {str(e).splitlines()[0]}") from e
    model = prune_model(model.float(), kept, neurons)

    state = {k: v.float() if v.is_floating_point() else v for k, v in _read_state_dict(path).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CahpError(f"weights in {path} do not match its recorded {KEPT_HEADS_FIELD}: {first}") from e
    return model.eval()
