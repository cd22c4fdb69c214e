"""Attention attribution (Hao, Dong, Wei & Xu 2021, "Self-Attention Attribution", AAAI), per head.

For one example and one layer l with attention maps A (heads, S, S), integrated gradients of the
predicted class's logit F with respect to A, from the all-zero map to A, is

    Attr(A) = A ⊙ (1/m) Σ_{k=1..m} ∂F(k/m · A) / ∂A        (Riemann sum with m steps, eq. 3)

with every other layer left as the model computes it. All heads of the layer are scaled together,
as in the paper; head h's attribution is the slice Attr(A)[h]. A head's score reduces that slice,
then averages over examples:

* ``mass``: the sum of the slice, the part of F(A) - F(0) the head accounts for (IG completeness);
* ``max``: its largest entry, the paper's head-importance statistic (section 4.1).

How A is scaled: :func:`cahp_deploy.arch.attention_probs_module` is the module whose output is the
probabilities right before they multiply V (the eager path's attention dropout, an identity in eval
mode); a forward hook replaces that output with the scaled maps, a leaf tensor we differentiate
against. One forward + backward covers b examples x m steps at once::

    rows  = [ex1·1/m, ex1·2/m, ..., ex1·m/m, ex2·1/m, ...]     (b·m, heads, S, S)
    F     = Σ_rows logit[row, predicted class of the row's example]
    grad  = ∂F/∂rows  -> mean over the m steps -> ⊙ A -> reduce per head

Padding needs no care: padded keys get zero probability (so zero attribution), and padded
queries never reach the [CLS] logit (every later layer masks them as keys).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from cahp_deploy import arch

REDUCTIONS = ("mass", "max")
DEFAULT_STEPS = 20


def _capture_maps(model: nn.Module, modules: list[nn.Module], inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One plain forward pass: (logits, the attention maps of every layer)."""
    maps: list[torch.Tensor | None] = [None] * len(modules)

    def hook(layer: int):
        def fn(module, args, output):
            maps[layer] = output.detach()

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, maps  # type: ignore[return-value]


def _layer_attribution(model: nn.Module, module: nn.Module, inputs: dict, maps: torch.Tensor,
                       target: torch.Tensor, steps: int, reduce: str) -> torch.Tensor:
    """(b, heads) attribution scores of one layer for a batch of b examples."""
    b = maps.shape[0]
    alphas = torch.arange(1, steps + 1, dtype=maps.dtype) / steps
    scaled = (maps.unsqueeze(1) * alphas.view(1, steps, 1, 1, 1)).flatten(0, 1).requires_grad_(True)

    def replace(module, args, output):
        return scaled

    repeated = {k: v.repeat_interleave(steps, dim=0) for k, v in inputs.items()}
    handle = module.register_forward_hook(replace)
    try:
        logits = model(**repeated).logits
    finally:
        handle.remove()
    chosen = logits.gather(1, target.repeat_interleave(steps).unsqueeze(1)).sum()
    (grad,) = torch.autograd.grad(chosen, scaled)
    attr = maps * grad.view(b, steps, *maps.shape[1:]).mean(dim=1)  # (b, heads, S, S)
    if reduce == "mass":
        return attr.sum(dim=(-1, -2))
    return attr.amax(dim=(-1, -2))


def attention_attribution(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    steps: int = DEFAULT_STEPS,
    reduce: str = "mass",
    deadline_seconds: float | None = None,
    progress=None,
    total_batches: int | None = None,
) -> tuple[np.ndarray, int, bool]:
    """Mean per-head attribution score over the examples of ``batches`` (model-input dicts).

    Returns ``(scores (layers, heads), examples used, stopped by the time budget)``. The deadline is
    checked between batches, so every layer always averages over the same examples.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    n_layers = len(arch.heads_per_layer(model))
    modules = [arch.attention_probs_module(model, layer) for layer in range(n_layers)]
    totals: list[torch.Tensor] = [torch.zeros(n) for n in arch.heads_per_layer(model)]
    used, stopped = 0, False
    start = time.perf_counter()
    task = progress.add_task("attention attribution", total=total_batches) if progress is not None else None
    for inputs in batches:
        if deadline_seconds is not None and time.perf_counter() - start >= deadline_seconds:
            stopped = True
            break
        logits, maps = _capture_maps(model, modules, inputs)
        target = logits.argmax(dim=-1)
        for layer, module in enumerate(modules):
            totals[layer] += _layer_attribution(model, module, inputs, maps[layer], target, steps, reduce).sum(0)
        used += int(target.shape[0])
        if task is not None:
            progress.update(task, advance=1)
    if used == 0:
        return np.zeros((n_layers, len(totals[0]))), 0, stopped
    return torch.stack(totals).numpy() / used, used, stopped


__all__ = ["DEFAULT_STEPS", "REDUCTIONS", "attention_attribution"]
