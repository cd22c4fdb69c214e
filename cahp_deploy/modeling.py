"""Loading a sequence classifier (dense or pruned by us) with clear errors.

``load_classifier`` accepts a local directory or a hub id. Weights stored in float16 (as the
reference models in ../shared are) are loaded as float32: CPU kernels and parity checks want fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cahp_deploy import arch
from cahp_deploy.errors import CahpError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")

#: config.json field in which the pruner records kept heads per layer (original indices).
KEPT_HEADS_FIELD = "cahp_kept_heads"


def _is_local(model: str) -> bool:
    return Path(model).exists() or os.sep in model or model.startswith(".")


def load_config(model: str | os.PathLike):
    """Load and validate the config: the model exists, is a supported classifier."""
    from transformers import AutoConfig

    model = str(model)
    if _is_local(model):
        path = Path(model)
        if not path.is_dir():
            raise CahpError(f"model path {model} does not exist or is not a directory")
        if not (path / "config.json").exists():
            raise CahpError(f"{model} is not a Hugging Face model directory (no config.json)")
        if not any((path / f).exists() for f in _WEIGHT_FILES):
            raise CahpError(f"model directory {model} has no weights (model.safetensors or pytorch_model.bin)")
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:
        raise CahpError(f"cannot load model config from {model!r}: {str(e).splitlines()[0]}") from e
    arch.spec_for(config)  # raises for unsupported architectures
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise CahpError(
            f"{model} is not a sequence classifier (architectures: {archs or 'none'}); "
            "fine-tune an *ForSequenceClassification model first"
        )
    return config


def is_pruned(config) -> bool:
    return getattr(config, KEPT_HEADS_FIELD, None) is not None


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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = load_config(model)
    if is_pruned(config):
        from cahp_deploy.pruning import load_pruned

        net = load_pruned(model, attn_implementation=attn_implementation)
    else:
        try:
            net = AutoModelForSequenceClassification.from_pretrained(
                str(model), attn_implementation=attn_implementation, **{arch.transformers_row().dtype_kwarg: torch.float32}
            )
        except (OSError, ValueError) as e:
            raise CahpError(f"cannot load model weights from {model}: {str(e).splitlines()[0]}") from e
    net = net.float().eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        except Exception as e:
            raise CahpError(f"cannot load the tokenizer of {model}: {str(e).splitlines()[0]}") from e
    return net, tokenizer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
