"""FFN neuron evidence: class-conditional activation signatures and gate salience, from passes that run anyway.

The FFN twin of the head signals. A neuron's activation over an example's real tokens is summarised
by D = 2 features: its mean over the real tokens and its value at the first token (the [CLS] / <s>
position the classifier reads). Per (neuron, class) a Welford mean and M2 of the two features is
kept, so the JM separability of every neuron comes from the same statistics machinery as the heads'.

Salience is the first-order Taylor term of Michel et al. applied to neurons: a per-example gate g on
every neuron's activation (:class:`cahp_deploy.gates.NeuronGates`); |d L(x) / d g_n| =
|Σ_t a_n(t) · dL/da_n(t)|, summed over examples. The gates ride on the *same* forward and backward
pass as the head gates (:func:`cahp_deploy.signals.salience.head_salience` takes this collector), and
the signatures on the same forward passes as the attention signatures, so neurons cost no extra pass
over the data when CAHP selects heads too.

::

    FFN in ──act──► a (B, S, I) ──[× g per example, neuron]──► FFN out
                      └─► mean over real tokens, first token ─► (B, I, 2) ─► Welford per class
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cahp_deploy import arch, distributed
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import NeuronGates
from cahp_deploy.signals.precision import full_precision
from cahp_deploy.signals.signatures import WelfordAccumulator, class_index

#: features per neuron and example: mean over real tokens, value at the first real token
FEATURES = ("mean", "first")


@dataclass
class FfnStats:
    """Per-neuron, per-class statistics of the FFN activations, and the neurons' gate salience.

    ``mean``/``m2``: (N neurons, C, 2) float64; ``salience``: (N,) summed |dL/dg| (raw, not normalised)
    over ``salience_examples`` examples, or None. Neuron n of layer l is row ``sum(neurons_per_layer[:l]) + n``.
    """

    classes: np.ndarray
    counts: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    neurons_per_layer: list[int]
    salience: np.ndarray | None
    salience_examples: int

    @property
    def var(self) -> np.ndarray:
        n = self.counts.astype(np.float64)[None, :, None]
        return np.where(n > 1, self.m2 / np.maximum(n - 1, 1), 0.0)


class FfnCollector:
    """Collects :class:`FfnStats` from forward passes driven by someone else.

    Use as a context manager (it installs :class:`NeuronGates` on the model); around each forward pass
    call :meth:`begin` (returns per-example gate tensors that require grad when ``grad``) and then
    :meth:`end` with those gates' gradients, if any. ``seconds`` is the time spent in the hooks.
    """

    def __init__(self, model: nn.Module, classes: Sequence[int] | np.ndarray):
        self.model = model
        self.neurons = arch.neurons_per_layer(model)
        if any(n == 0 for n in self.neurons):
            raise CahpError("FFN evidence needs the dense model; this one has layers without neurons")
        self.classes = np.asarray(classes)
        self.acc = WelfordAccumulator(len(self.classes), sum(self.neurons), len(FEATURES))
        self.salience = torch.zeros(sum(self.neurons), dtype=torch.float64)
        self.salience_examples = 0
        self.seconds = 0.0
        self._gates = NeuronGates(model, on_activation=self._on_activation)
        self._mask: torch.Tensor | None = None
        self._first: torch.Tensor | None = None
        self._features: list[torch.Tensor | None] = [None] * len(self.neurons)

    def __enter__(self) -> FfnCollector:
        self._gates.attach()
        return self

    def __exit__(self, *exc) -> None:
        self._gates.detach()

    def begin(self, attention_mask: torch.Tensor, grad: bool) -> list[torch.Tensor]:
        """Prepare the hooks for one batch; return the gates (per example, requiring grad if ``grad``)."""
        n = attention_mask.shape[0]
        mask = attention_mask.to(torch.float32)
        self._mask = mask.unsqueeze(-1)  # (n, S, 1)
        self._first = mask.argmax(dim=1)  # first real token (right or left padding)
        self._features = [None] * len(self.neurons)
        if grad:
            gates = [torch.ones(n, k, requires_grad=True) for k in self.neurons]
        else:
            gates = [torch.ones(k) for k in self.neurons]
        self._gates.values = gates
        return gates

    def _on_activation(self, layer: int, act: torch.Tensor) -> None:
        start = time.perf_counter()
        with torch.no_grad(), full_precision(act.device.type):  # the pass may run in bf16
            a = act.detach().float()
            mean = (a * self._mask).sum(dim=1) / self._mask.sum(dim=1).clamp_min(1.0)
            first = a[torch.arange(a.shape[0]), self._first]
            self._features[layer] = torch.stack([mean, first], dim=-1)  # (n, I, 2)
        self.seconds += time.perf_counter() - start

    def end(self, labels, gate_grads: Sequence[torch.Tensor] | None = None) -> None:
        """Fold the batch's features (and gate gradients) into the running statistics."""
        start = time.perf_counter()
        if any(f is None for f in self._features):
            raise CahpError("the FFN hooks saw no activations in this batch; is the model's FFN where arch.py says?")
        index = class_index(self.classes, labels)
        self.acc.update(torch.cat(self._features, dim=1), torch.as_tensor(index))
        if gate_grads is not None:
            self.salience += torch.cat([g.abs().sum(dim=0) for g in gate_grads]).to(torch.float64)
            self.salience_examples += len(labels)
        self._features = [None] * len(self.neurons)
        self.seconds += time.perf_counter() - start

    def merge_over_ranks(self) -> None:
        """Fold every rank's statistics into each rank's (data-parallel ``select``; a no-op in one process).

        Moments merge exactly (Chan et al., rank order), salience and its example count are summed in
        rank order, so every rank holds what one process fed every batch would, to float64 rounding.
        """
        if not distributed.is_distributed():
            return
        distributed.merge_welford([self.acc])
        total, examples = distributed.sum_over_ranks(
            [self.salience, torch.tensor([float(self.salience_examples)], dtype=torch.float64)])
        self.salience = total
        self.salience_examples = int(examples.item())

    def result(self) -> FfnStats:
        return FfnStats(
            classes=self.classes,
            counts=self.acc.count.numpy().astype(np.int64),
            mean=self.acc.mean.permute(1, 0, 2).numpy().copy(),
            m2=self.acc.m2.permute(1, 0, 2).numpy().copy(),
            neurons_per_layer=list(self.neurons),
            salience=self.salience.numpy().copy() if self.salience_examples else None,
            salience_examples=int(self.salience_examples),
        )


def collect_ffn_stats(
    model: nn.Module,
    tokenizer,
    data,
    fraction: float = 0.25,
    batch_size: int = 64,
    salience_batch_size: int = 32,
    max_length: int = 128,
    progress=None,
) -> FfnStats:
    """FFN evidence alone, for when the heads are chosen by a method that runs no CAHP pass.

    One pass over ``data``: gate salience (forward + backward, weights frozen) on its leading
    ``fraction`` as for heads, inference on the rest; signatures from every example.
    """
    from cahp_deploy.signals.salience import head_salience, salience_examples

    if len(data) == 0:
        raise CahpError("no examples to collect FFN evidence from")
    n_sal = salience_examples(len(data), fraction)
    with FfnCollector(model, np.unique(data.labels)) as collector:
        head_salience(model, tokenizer, data.head(n_sal), fraction=1.0, batch_size=salience_batch_size,
                      max_length=max_length, progress=progress, ffn=collector)
        rest = data.subset(np.arange(n_sal, len(data)))
        if len(rest):
            _inference_pass(model, tokenizer, rest, collector, batch_size, max_length, progress)
    return collector.result()


def _inference_pass(model, tokenizer, data, collector: FfnCollector, batch_size: int, max_length: int, progress) -> None:
    from cahp_deploy.data import iter_batches
    from cahp_deploy.signals import model_inputs

    task = progress.add_task("FFN signatures", total=len(data)) if progress is not None else None
    model.eval()
    with torch.inference_mode():
        for _, enc, labels in iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length):
            collector.begin(enc["attention_mask"], grad=False)
            model(**model_inputs(model, enc))
            collector.end(labels)
            if task is not None:
                progress.advance(task, len(labels))

__all__ = ["FEATURES", "FfnCollector", "FfnStats", "collect_ffn_stats"]
