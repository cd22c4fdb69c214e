"""Torch code that only *collects* statistics from a classifier: attention signatures and salience.

Nothing here decides which heads to keep; that is :mod:`cahp_deploy.selection` (pure numpy).
"""

from __future__ import annotations

import inspect

from torch import nn


def model_inputs(model: nn.Module, encoding: dict) -> dict:
    """The tokenizer outputs the model's ``forward`` accepts (DistilBERT takes no ``token_type_ids``)."""
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in encoding.items() if k in accepted}


__all__ = ["model_inputs"]
