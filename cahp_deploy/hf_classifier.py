"""A Hugging Face sequence classifier below pruning: its config, the pruner's config field, the dense load.

:func:`load_config` validates a local directory or a hub id (exists, has weights, a supported
classifier); :func:`load_dense` loads a model that is not pruned. Weights stored in float16 (as the
reference models in ../shared are) are loaded as float32: CPU kernels and parity checks want fp32.
``pruning`` builds on this module; :func:`cahp_deploy.modeling.load_classifier`, above both, loads
either kind.
"""

from __future__ import annotations

import inspect
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_dense(model: str | os.PathLike, attn_implementation: str | None = "eager") -> nn.Module:
    """A classifier that is not pruned, float32 (see :func:`cahp_deploy.modeling.load_classifier`)."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(model), attn_implementation=attn_implementation, **{arch.transformers_row().dtype_kwarg: torch.float32}
        )
    except (OSError, ValueError) as e:
        raise CahpError(f"cannot load model weights from {model}: {str(e).splitlines()[0]}") from e


def load_tokenizer(model: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model))
    except Exception as e:
        raise CahpError(f"cannot load the tokenizer of {model}: {str(e).splitlines()[0]}") from e


def model_inputs(model: nn.Module, encoding: dict) -> dict:
    """The tokenizer outputs the model's ``forward`` accepts (DistilBERT takes no ``token_type_ids``)."""
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in encoding.items() if k in accepted}


__all__ = ["KEPT_HEADS_FIELD", "count_parameters", "is_pruned", "load_config", "load_dense", "load_tokenizer",
           "model_inputs"]
