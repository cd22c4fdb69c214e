"""Per-head gates: one hook that multiplies a gate into each head's context output.

The gate sits on the *input* of the attention output projection, where the context is laid out as
(B, S, heads * head_dim) with head h at columns [h*d, (h+1)*d). Multiplying head h's slice by g_h is
exactly "head h contributes g_h times its output", for every supported architecture, without
``head_mask`` (gone in transformers v5).

Used for gradient salience (d loss / d g_h at g = 1), masked evaluation (g in {0, 1}), the
trainable baselines (g from a relaxed distribution) and as the reference in pruning tests.

::

    x ──► Q,K,V ──► softmax(QKᵀ/√d)·V ──► context (B,S,H·d) ──[× g_h per head]──► O proj ──► + x ──► LN
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cahp_deploy import arch


class _Gates:
    """Per-layer gate tensors applied by forward pre-hooks on one projection per layer.

    Subclasses say how many gates each layer has (``_counts``), which module's input they scale
    (``_module``) and how (``_hook``). ``values`` is a list (one tensor per layer, shape (gates,), or
    (B, gates) for per-example gates); replace or edit the tensors freely between forward passes, or
    make them require grad for salience.
    """

    def __init__(self, model: nn.Module, values: Sequence[torch.Tensor] | None = None):
        self.model = model
        counts = self._counts(model)
        device = next(model.parameters()).device
        if values is None:
            values = [torch.ones(n, device=device) for n in counts]
        if len(values) != len(counts):
            raise ValueError(f"expected {len(counts)} gate tensors, got {len(values)}")
        self.values: list[torch.Tensor] = list(values)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @staticmethod
    def _counts(model: nn.Module) -> list[int]:
        raise NotImplementedError

    @staticmethod
    def _module(model: nn.Module, layer: int) -> nn.Module:
        raise NotImplementedError

    def _hook(self, layer: int):
        raise NotImplementedError

    def attach(self):
        for i, n in enumerate(self._counts(self.model)):
            if n == 0:  # nothing to gate (a zero-head layer has no context; an emptied FFN one inert unit)
                continue
            self._handles.append(self._module(self.model, i).register_forward_pre_hook(self._hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


class HeadGates(_Gates):
    """Hooks that scale each head's context by a gate value (per layer: (heads,) or (B, heads))."""

    _counts = staticmethod(arch.heads_per_layer)
    _module = staticmethod(arch.output_projection)

    def _hook(self, layer: int):
        def pre_hook(module: nn.Module, args: tuple):
            (context, *rest) = args
            gate = self.values[layer].to(context.dtype)
            n = gate.shape[-1]
            if n == 0:
                return None
            b, s, width = context.shape
            d = width // n
            g = gate.view(1, 1, n, 1) if gate.dim() == 1 else gate.view(b, 1, n, 1)
            return ((context.view(b, s, n, d) * g).view(b, s, width), *rest)

        return pre_hook


@contextlib.contextmanager
def head_mask(model: nn.Module, keep: Sequence[Sequence[int]]) -> Iterator[HeadGates]:
    """Gate off every head not listed in ``keep`` (per layer, original head indices)."""
    counts = arch.heads_per_layer(model)
    device = next(model.parameters()).device
    values = []
    for n, kept in zip(counts, keep, strict=True):
        g = torch.zeros(n, device=device)
        g[list(kept)] = 1.0
        values.append(g)
    with HeadGates(model, values) as gates:
        yield gates


class NeuronGates(_Gates):
    """Hooks that scale each FFN neuron's activation by a gate: the FFN twin of :class:`HeadGates`.

    The gate multiplies the *input* of each layer's FFN output projection, (B, S, neurons), so gating
    neuron n to 0 is exactly removing row n of the intermediate projection and column n of the output
    projection. ``values``: one tensor per layer, (neurons,) or per example (B, neurons).
    ``on_activation(layer, activations)``, if given, sees each layer's gated activations (the FFN
    signatures are taken there, in the same forward pass).
    """

    _counts = staticmethod(arch.neurons_per_layer)
    _module = staticmethod(arch.ffn_output_projection)

    def __init__(self, model: nn.Module, values: Sequence[torch.Tensor] | None = None, on_activation=None):
        super().__init__(model, values)
        self.on_activation = on_activation

    def _hook(self, layer: int):
        def pre_hook(module: nn.Module, args: tuple):
            (act, *rest) = args
            gate = self.values[layer].to(act.dtype)
            act = act * (gate.view(1, 1, -1) if gate.dim() == 1 else gate.unsqueeze(1))
            if self.on_activation is not None:
                self.on_activation(layer, act)
            return (act, *rest)

        return pre_hook


@contextlib.contextmanager
def neuron_mask(model: nn.Module, keep: Sequence[Sequence[int]]) -> Iterator[NeuronGates]:
    """Gate off every FFN neuron not listed in ``keep`` (per layer, original neuron indices)."""
    device = next(model.parameters()).device
    values = []
    for n, kept in zip(arch.neurons_per_layer(model), keep, strict=True):
        g = torch.zeros(n, device=device)
        g[list(kept)] = 1.0
        values.append(g)
    with NeuronGates(model, values) as gates:
        yield gates


def mask_to_keep(mask) -> list[list[int]]:
    """A (layers, heads) 0/1 array to the per-layer list of kept head indices."""
    return [[h for h, v in enumerate(row) if v] for row in mask]
