"""Gradient salience of each head (Michel, Levy & Neubig 2019), as CAHP uses it.

A gate g_h = 1 is multiplied into every head's context output (:class:`cahp_deploy.gates.HeadGates`).
Michel et al. define a head's importance as the expectation over examples of |d L(x) / d g_h|. Each
example gets its own gate row, (batch, heads), so one backward pass of the *summed* loss yields every
example's own gradient (example b's loss depends only on its own gates): the per-example absolute
values are exact, and do not depend on how examples are batched, which lets this pass use
length-bucketed batches. The sum over examples is min-max normalised to [0, 1] (all ones when every
head scores the same).

Which examples: the first ``fraction`` of the split in data order (default a quarter, at least one),
as the reference code does with its first quarter of batches. Deviation from the reference code,
on purpose: it takes |gradient of each batch's mean loss|, which depends on batch composition; we
take the per-example absolute value of the paper's definition.

Weights are frozen meanwhile (only the gates need gradients, which also skips every weight-gradient
matmul); their ``requires_grad`` flags are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cahp_deploy import arch, distributed
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import HeadGates
from cahp_deploy.signals import model_inputs

DEFAULT_FRACTION = 0.25
DEFAULT_BATCH_SIZE = 32


def min_max_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def salience_examples(num_examples: int, fraction: float) -> int:
    """How many leading examples the salience pass uses: max(1, floor(fraction * num_examples))."""
    if not 0.0 < fraction <= 1.0:
        raise CahpError(f"--salience-fraction must be in (0, 1], got {fraction}")
    return max(1, int(fraction * num_examples))


def head_salience(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    fraction: float = DEFAULT_FRACTION,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = 128,
    normalise: bool = True,
    progress=None,
    attention_sink: Callable | None = None,
    ffn=None,
) -> np.ndarray:
    """(N,) salience of every head in global order (layer by layer), min-max normalised by default.

    ``attention_sink(attentions, attention_mask, labels)``, if given, receives each batch's attention
    probabilities (the forward pass returns them), e.g. a
    :class:`~cahp_deploy.signals.signatures.SignatureCollector`'s ``add``. ``ffn``, an entered
    :class:`~cahp_deploy.signals.ffn.FfnCollector`, gets the FFN neurons' signatures and gate
    gradients from the same forward and backward.
    """
    if len(data) == 0:
        raise CahpError("no examples to compute head salience from")
    subset = data.head(salience_examples(len(data), fraction))
    heads = arch.heads_per_layer(model)
    total = torch.zeros(sum(heads), dtype=torch.float64)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    task = progress.add_task("head salience", total=len(subset)) if progress is not None else None
    want_attn = attention_sink is not None
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad(), HeadGates(model) as gates:
            for _, enc, labels in iter_batches(tokenizer, subset, batch_size=batch_size, max_length=max_length):
                n = len(labels)
                rows = [torch.ones(n, h, requires_grad=True) for h in heads]
                gates.values = rows
                ffn_gates = ffn.begin(enc["attention_mask"], grad=True) if ffn is not None else []
                out = model(**model_inputs(model, enc), output_attentions=want_attn)
                loss = F.cross_entropy(out.logits, torch.as_tensor(labels, dtype=torch.long), reduction="sum")
                live = [r for r, h in zip(rows, heads) if h > 0]
                all_grads = torch.autograd.grad(loss, live + ffn_gates)
                if ffn is not None:
                    ffn.end(labels, all_grads[len(live):])
                grads = iter(all_grads[:len(live)])
                per_layer = [next(grads).abs().sum(dim=0) if h > 0 else torch.zeros(0) for h in heads]
                total += torch.cat(per_layer).to(torch.float64)
                if want_attn:
                    attention_sink(arch.attentions_per_layer(model, out.attentions, enc["attention_mask"]),
                                   enc["attention_mask"], labels)
                if task is not None:
                    progress.advance(task, n)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    flat = total.numpy() / len(subset)
    return min_max_normalise(flat) if normalise else flat


def head_salience_over_ranks(model, tokenizer, data, batch_size: int, max_length: int, **kwargs) -> np.ndarray:
    """:func:`head_salience` of all of ``data`` under torchrun, each rank doing its batches.

    Per-example gradients do not depend on batching, and each rank takes whole batches of the
    single-process order; the per-rank sums are added in rank order, divided by ``len(data)`` and
    min-max normalised as one process does.
    """
    kwargs.pop("fraction", None)
    mine = distributed.shard_examples(data, tokenizer, batch_size, max_length)
    if len(mine):
        total = head_salience(model, tokenizer, mine, fraction=1.0, batch_size=batch_size, max_length=max_length,
                              normalise=False, **kwargs) * len(mine)
    else:
        total = np.zeros(sum(arch.heads_per_layer(model)), dtype=np.float64)
    return min_max_normalise(distributed.sum_over_ranks([total])[0] / len(data))


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_FRACTION", "head_salience", "head_salience_over_ranks", "min_max_normalise",
           "salience_examples"]
