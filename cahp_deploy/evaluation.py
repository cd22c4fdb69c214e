"""Accuracy of a PyTorch classifier on labelled data, with or without some heads gated off.

One place for "how good is this model", so that select, recover, study and run all measure the same
thing: length-bucketed batches (little padding, so little wasted compute on CPU), no dropout, no
gradients, predictions returned in the data's own row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cahp_deploy import arch, gates
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.hf_classifier import model_inputs


def _check_batching(batch_size: int, max_length: int) -> None:
    if batch_size < 1:
        raise CahpError(f"batch size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise CahpError(f"max length must be at least 2 tokens, got {max_length}")


def logits(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    batch_size: int = 64,
    max_length: int = 128,
    progress=None,
) -> np.ndarray:
    """The model's logits, shape (len(data), num_labels), float32, rows in ``data``'s order.

    The model is put in eval mode (dropout off) and restored to its previous mode afterwards.
    ``progress`` is an optional ``rich.progress.Progress`` that gets one task for this pass.
    """
    _check_batching(batch_size, max_length)
    from cahp_deploy.arch import max_sequence_length

    max_length = min(int(max_length), max_sequence_length(model.config))  # never past the position table
    device = next(model.parameters()).device
    out = np.zeros((len(data), int(model.config.num_labels)), dtype=np.float32)
    task = None
    if progress is not None:
        task = progress.add_task("evaluating", total=len(data))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx, enc, _ in iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length):
                enc = {k: v.to(device) for k, v in model_inputs(model, enc).items()}
                out[idx] = model(**enc).logits.float().cpu().numpy()
                if task is not None:
                    progress.advance(task, len(idx))
    finally:
        model.train(was_training)
    return out


def predictions(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    batch_size: int = 64,
    max_length: int = 128,
    progress=None,
) -> np.ndarray:
    """Predicted label id per row of ``data`` (int64, in ``data``'s order)."""
    return logits(model, tokenizer, data, batch_size, max_length, progress).argmax(axis=1).astype(np.int64)


def accuracy(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    batch_size: int = 64,
    max_length: int = 128,
    progress=None,
) -> float:
    """Fraction of rows of ``data`` whose predicted label equals the gold label, in [0, 1]."""
    if len(data) == 0:
        raise CahpError(f"cannot measure accuracy on an empty split ({data.source} [{data.split}])")
    pred = predictions(model, tokenizer, data, batch_size, max_length, progress)
    return float((pred == np.asarray(data.labels)).mean())


def masked_accuracy(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    kept_heads: Sequence[Sequence[int]],
    batch_size: int = 64,
    max_length: int = 128,
    progress=None,
) -> float:
    """Accuracy with every head not in ``kept_heads`` gated to zero (per layer, original indices).

    Equal to the accuracy of the physically pruned model (the pruning tests check that the rewrite
    matches the gates), and much cheaper to get when many head sets are compared on one model.
    """
    counts = arch.heads_per_layer(model)
    if len(kept_heads) != len(counts):
        raise CahpError(f"kept_heads lists {len(kept_heads)} layers; the model has {len(counts)}")
    for layer, (kept, n) in enumerate(zip(kept_heads, counts)):
        bad = [h for h in kept if not 0 <= int(h) < n]
        if bad:
            raise CahpError(f"kept head(s) {bad} of layer {layer} out of range 0..{n - 1}")
    with gates.head_mask(model, [[int(h) for h in k] for k in kept_heads]):
        return accuracy(model, tokenizer, data, batch_size, max_length, progress)


__all__ = ["accuracy", "logits", "masked_accuracy", "predictions"]
