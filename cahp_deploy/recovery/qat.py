"""Quantization-aware recovery: the fine-tune sees the rounding the exported INT8 graph will do.

``export --quantize int8`` runs ONNX Runtime's dynamic quantization (:mod:`cahp_deploy.export.int8.quantize`):
every weight MatMul becomes ``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q)``, with

* weights: signed int8, symmetric, scale ``max|W| / 127`` per output channel (or per tensor), zero point 0;
* inputs: unsigned uint8, asymmetric, **per tensor per batch**: ``lo = min(0, min x)``, ``hi = max(0, max x)``,
  scale ``(hi - lo) / 255``, zero point ``round(-lo / scale)`` (ONNX ``DynamicQuantizeLinear``).

:func:`simulated_int8` makes every ``nn.Linear`` of a PyTorch model compute exactly that in float
(fake quantization: quantize, then dequantize), with straight-through gradients (the rounding is
treated as the identity in the backward pass, Bengio et al. 2013; Jacob et al. 2018). Recovery under
it learns weights whose INT8 rounding costs little; the latent fp32 weights are saved as usual, and the
exporter quantizes them the same way. Embedding lookups are not quantized (neither does the exporter).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: int8 weight range of ORT's symmetric QInt8 (-127..127: the zero point stays exactly 0)
WEIGHT_QMAX = 127.0
#: uint8 activation levels of DynamicQuantizeLinear
ACTIVATION_LEVELS = 255.0


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 fake quantization of a ``(out, in)`` Linear weight (per output row or per tensor)."""
    if w.numel() == 0:  # a projection pruned to zero width
        return w
    with torch.no_grad():
        absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
        scale = torch.clamp(absmax, min=1e-12) / WEIGHT_QMAX
        q = torch.clamp(torch.round(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale
    return _straight_through(w, q)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """ONNX ``DynamicQuantizeLinear`` then dequantization: uint8, one scale for the whole tensor."""
    if x.numel() == 0:
        return x
    with torch.no_grad():
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / ACTIVATION_LEVELS
        if float(scale) == 0.0:  # an all-zero input: DynamicQuantizeLinear gives zeros
            return _straight_through(x, torch.zeros_like(x))
        zero = torch.clamp(torch.round(-lo / scale), 0.0, ACTIVATION_LEVELS)
        q = (torch.clamp(torch.round(x / scale) + zero, 0.0, ACTIVATION_LEVELS) - zero) * scale
    return _straight_through(x, q)


def _quantized_linear_forward(per_channel: bool):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight, per_channel), self.bias)

    return forward


@contextlib.contextmanager
def simulated_int8(model: nn.Module, per_channel: bool = True) -> Iterator[list[str]]:
    """Within the block, every ``nn.Linear`` of ``model`` computes as its dynamic-INT8 export will;
    yields their names. The original forwards come back on exit, whatever happened."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    forward = _quantized_linear_forward(per_channel)
    for _, m in linears:
        m.forward = types.MethodType(forward, m)
    try:
        yield [name for name, _ in linears]
    finally:
        for _, m in linears:
            del m.forward  # back to the class's forward


__all__ = ["fake_quant_activation", "fake_quant_weight", "simulated_int8"]
