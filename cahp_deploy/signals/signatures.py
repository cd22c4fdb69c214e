"""Attention signatures: per head and per class, the streaming mean and variance of pooled attention maps.

CAHP, step 1. For every example, layer and head, the attention map over the example's *real*
tokens (L x L, padding excluded) is resized bilinearly to B x B (``pool_size``) and flattened to
D = B*B cells. Per (head, class) we keep a Welford mean and sum of squared deviations of each cell,
merged batch by batch in float64, so memory is O(heads x classes x D), never O(examples).

Vectorized: within a batch (length-bucketed, so lengths are close) the examples are grouped by real
length, and each group's maps of *all* layers and heads are resized at once, as two batched matmuls
with the separable bilinear kernel (:func:`resize_matrix`). There is no Python loop over examples.

::

    attentions: layers x (n, H, S, S) ──[real tokens, per length group]──► (g, layers*H, L, L)
        ──bilinear, R @ A @ Rᵀ──► (g, layers*H, B, B) ──flatten──► (n, N, D) ──Welford per class──► mean, M2 (C, N, D)
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cahp_deploy import arch
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.signals import model_inputs
from cahp_deploy.signals.precision import full_precision


@dataclass
class SignatureStats:
    """Per-head, per-class statistics of the pooled attention maps.

    Attributes
    ----------
    classes : (C,) the label ids, ascending; row c of ``mean`` belongs to ``classes[c]``.
    counts : (C,) examples seen per class.
    mean, m2 : (N heads, C, D) float64 mean and sum of squared deviations of each cell.
    heads_per_layer : heads of each layer; head h of layer l is row ``sum(heads_per_layer[:l]) + h``.
    pool_size : B, with D = B * B.
    """

    classes: np.ndarray
    counts: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    heads_per_layer: list[int]
    pool_size: int

    @property
    def var(self) -> np.ndarray:
        """Sample variance (n - 1 denominator); 0 for a class seen fewer than twice."""
        n = self.counts.astype(np.float64)[None, :, None]
        return np.where(n > 1, self.m2 / np.maximum(n - 1, 1), 0.0)

    @property
    def num_heads(self) -> int:
        return int(self.mean.shape[0])


class WelfordAccumulator:
    """Streaming per-class mean and M2 of (n, N, D) batches, merged with Chan et al.'s parallel formula."""

    def __init__(self, num_classes: int, num_heads: int, dim: int):
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean = torch.zeros(num_classes, num_heads, dim, dtype=torch.float64)
        self.m2 = torch.zeros(num_classes, num_heads, dim, dtype=torch.float64)

    def update(self, signatures: torch.Tensor, class_index: torch.Tensor) -> None:
        """Merge a batch of (n, N, D) signatures whose classes are ``class_index`` (n,).

        The batch's own mean and M2 are taken in the input precision (float32; at most a batch of
        values in [0, 1]), the merge into the running totals in float64.
        """
        for c in torch.unique(class_index).tolist():
            xc = signatures[class_index == c]
            k = xc.shape[0]
            batch_mean = xc.mean(dim=0)
            batch_m2 = (xc - batch_mean).square_().sum(dim=0).to(torch.float64)
            batch_mean = batch_mean.to(torch.float64)
            n = float(self.count[c])
            total = n + k
            delta = batch_mean - self.mean[c]
            self.m2[c] += batch_m2 + delta.square() * (n * k / total)
            self.mean[c] += delta * (k / total)
            self.count[c] = total

    def merge(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold in another accumulator's state (count (C,), mean and M2 (C, ...)) by Chan et al.'s formula.

        Exact up to float64 rounding, so per-rank accumulators of a data-parallel run merge into the
        statistics one process would have (:func:`cahp_deploy.distributed.merge_welford`).
        """
        k = count.to(torch.float64)
        total = self.count + k
        shape = (-1,) + (1,) * (self.mean.dim() - 1)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean.to(torch.float64) - self.mean
        self.m2 += m2.to(torch.float64) + delta.square() * (self.count * k / safe).view(shape)
        self.mean += delta * (k / safe).view(shape)
        self.count.copy_(total)


def class_index(classes: np.ndarray, labels) -> np.ndarray:
    """Row of each label in the ascending ``classes``; a :class:`CahpError` for a label not among them."""
    labels = np.asarray(labels)
    index = np.searchsorted(classes, labels)
    if np.any(index >= len(classes)) or np.any(classes[np.minimum(index, len(classes) - 1)] != labels):
        raise CahpError(f"labels {sorted(set(labels.tolist()) - set(classes.tolist()))} are not among the classes")
    return index


@functools.lru_cache(maxsize=256)
def resize_matrix(length: int, size: int) -> torch.Tensor:
    """(size, length) matrix R of 1-D linear resizing (half-pixel centres, as ``align_corners=False``).

    Bilinear resizing is separable, so resizing an L x L map A to B x B is R @ A @ R.T: two small
    batched matmuls, about twice as fast on CPU as ``F.interpolate`` on many small planes. R is
    built by resizing the identity with ``F.interpolate`` itself, so the kernel is the same.
    """
    eye = torch.eye(length).unsqueeze(0)  # (1, L channels, L samples)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T.contiguous()


def pooled_signatures(attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Resize each example's real-token attention maps to (pool_size, pool_size).

    Parameters
    ----------
    attentions : per layer, (n, H_l, S, S) attention probabilities.
    attention_mask : (n, S), 1 on real tokens (left or right padding both work).

    Returns
    -------
    (n, sum(H_l), pool_size**2) float32, heads in global order (layer by layer).
    """
    n = attention_mask.shape[0]
    total_heads = sum(a.shape[1] for a in attentions)
    out = torch.empty(n, total_heads, pool_size * pool_size, dtype=torch.float32)
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    for length in torch.unique(lengths).tolist():
        rows = torch.nonzero(lengths == length).flatten()
        g = rows.numel()
        if length == 0:
            raise CahpError("an example has no real tokens after tokenization; remove empty texts")
        prefix = bool(mask[rows, :length].all())
        maps = []
        for a in attentions:
            a = a[rows]
            if prefix:  # right padding: real tokens come first
                a = a[:, :, :length, :length]
            else:
                pos = torch.nonzero(mask[rows])[:, 1].view(g, length)
                h, s = a.shape[1], a.shape[-1]
                a = a.gather(2, pos[:, None, :, None].expand(g, h, length, s))
                a = a.gather(3, pos[:, None, None, :].expand(g, h, length, length))
            maps.append(a)
        maps = torch.cat(maps, dim=1).float()  # (g, N, L, L)
        r = resize_matrix(length, pool_size)
        pooled = torch.matmul(torch.matmul(r, maps), r.T)  # bilinear resize, (g, N, B, B)
        out[rows] = pooled.reshape(g, total_heads, pool_size * pool_size)
    return out


class SignatureCollector:
    """Accumulates pooled signatures batch by batch; feed it from any forward pass that has attentions.

    ``add`` is what the salience pass calls too (its forward already computes the attention maps),
    so the examples it sees need no second forward. ``seconds`` is the time spent in ``add``.
    """

    def __init__(self, heads_per_layer: Sequence[int], classes: np.ndarray, pool_size: int):
        if int(pool_size) < 1:
            raise CahpError(f"--pool-size must be at least 1, got {pool_size}")
        self.heads_per_layer = [int(h) for h in heads_per_layer]
        self.classes = np.asarray(classes)
        self.pool_size = int(pool_size)
        self.acc = WelfordAccumulator(len(self.classes), sum(self.heads_per_layer), self.pool_size ** 2)
        self.seconds = 0.0

    def add(self, attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor, labels) -> None:
        start = time.perf_counter()
        if not attentions or attentions[0] is None:
            raise CahpError("the model returned no attention probabilities; load it with eager attention")
        index = class_index(self.classes, labels)
        with torch.no_grad(), full_precision(attentions[0].device.type):  # the maps may come from a bf16 pass
            sig = pooled_signatures([a.detach().float() for a in attentions], attention_mask, self.pool_size)
            self.acc.update(sig, torch.as_tensor(index))
        self.seconds += time.perf_counter() - start

    def result(self) -> SignatureStats:
        return SignatureStats(
            classes=self.classes,
            counts=self.acc.count.numpy().astype(np.int64),
            mean=self.acc.mean.permute(1, 0, 2).numpy().copy(),
            m2=self.acc.m2.permute(1, 0, 2).numpy().copy(),
            heads_per_layer=list(self.heads_per_layer),
            pool_size=self.pool_size,
        )


class _StopForward(Exception):
    """Raised from the last attention layer's hook: nothing after its attention maps is needed."""


@contextlib.contextmanager
def attention_maps_only(model: nn.Module) -> Iterator[list[torch.Tensor | None] | None]:
    """Capture every layer's attention probabilities by forward hooks and end the forward pass after
    the last layer's; yields the per-layer list the hooks fill (None where the architecture has no
    module to hook, and then nothing is installed: run the whole model with ``output_attentions``).

    Why: a pass that only pools attention maps needs nothing after the last layer's softmax, yet a full
    forward still runs that layer's output projection and FFN for every token, then the pooler and
    classifier. That is 1/8 of MiniLM-L6's linear MACs per token (O + FFN of 1 of 6 layers), measured
    15% of the signature pass. The maps are bit-identical: the same kernels run on the same inputs.
    Call the model through :func:`forward_until_attention`, which swallows the stop.
    """
    spec = arch.spec_for(model)
    heads = arch.heads_per_layer(model)
    live = [i for i, h in enumerate(heads) if h > 0]
    if spec.attention_probs is None or not live:
        yield None
        return
    maps: list[torch.Tensor | None] = [None] * len(heads)
    last = live[-1]

    def hook(layer: int):
        def capture(module, args, output):
            maps[layer] = output
            if layer == last:
                raise _StopForward
        return capture

    handles = [arch.attention_probs_module(model, i).register_forward_hook(hook(i)) for i in live]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def forward_until_attention(model: nn.Module, inputs: dict, maps: list[torch.Tensor | None] | None) -> list[torch.Tensor]:
    """Per layer, the attention probabilities of one batch: from the hooks of :func:`attention_maps_only`
    (the forward pass stops after the last layer's maps), or from a full pass when ``maps`` is None.
    A layer without heads contributes an empty (n, 0, S, S) tensor, as the full pass returns."""
    if maps is None:
        return arch.attentions_per_layer(model, model(**inputs, output_attentions=True).attentions,
                                         inputs["attention_mask"])
    for i in range(len(maps)):
        maps[i] = None
    try:
        model(**inputs)
    except _StopForward:
        pass
    else:  # the last layer never ran its attention: not the graph attention_maps_only assumed
        raise CahpError("the forward pass ended without reaching the last layer's attention maps")
    mask = inputs["attention_mask"]
    n, s = mask.shape
    return [m if m is not None else torch.zeros(n, 0, s, s, device=mask.device) for m in maps]


def collect_signatures(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    pool_size: int = 32,
    batch_size: int = 64,
    max_length: int = 128,
    progress=None,
    collector: SignatureCollector | None = None,
    classes: np.ndarray | None = None,
    ffn=None,
) -> SignatureStats:
    """Run the classifier over ``data`` (length-bucketed batches, inference mode) and return the
    per-head, per-class signature statistics.

    Without ``ffn`` each forward pass stops right after the last layer's attention maps
    (:func:`attention_maps_only`); the statistics are the same as from full passes.

    Pass ``collector`` to continue one that already holds other examples (then ``pool_size`` and
    ``classes`` come from it). The model must use eager attention (only it returns attention
    probabilities); :func:`cahp_deploy.modeling.load_classifier` loads it so by default. ``ffn``, an
    entered :class:`~cahp_deploy.signals.ffn.FfnCollector`, gets the FFN signatures of the same passes.
    """
    if not arch.attention_probs_supported(model):
        raise CahpError("attention signatures need eager attention; load the model with attn_implementation='eager'")
    if collector is None:
        if len(data) == 0:
            raise CahpError("no examples to collect attention signatures from")
        collector = SignatureCollector(arch.heads_per_layer(model),
                                       np.unique(data.labels) if classes is None else classes, pool_size)
    task = progress.add_task("attention signatures", total=len(data)) if progress is not None else None
    model.eval()
    if len(data):
        # The FFN collector needs every layer's FFN, so only a pass without it stops early.
        early = attention_maps_only(model) if ffn is None else contextlib.nullcontext(None)
        with torch.inference_mode(), early as maps:
            for _, enc, labels in iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length):
                if ffn is not None:
                    ffn.begin(enc["attention_mask"], grad=False)
                attentions = forward_until_attention(model, model_inputs(model, enc), maps)
                collector.add(attentions, enc["attention_mask"], labels)
                if ffn is not None:
                    ffn.end(labels)
                if task is not None:
                    progress.advance(task, len(labels))
    return collector.result()


__all__ = [
    "SignatureCollector", "SignatureStats", "WelfordAccumulator", "attention_maps_only", "collect_signatures",
    "forward_until_attention", "pooled_signatures",
]
