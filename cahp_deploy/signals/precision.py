"""The precision of the evidence passes' forward and backward: bfloat16 where the hardware does it natively.

Why: CAHP's evidence is *statistics* of attention maps (per-class means and variances of pooled
maps, float64) and summed gradient magnitudes, not any single logit, and ~2/3 of the passes' time
is ``nn.Linear``; bfloat16 autocast runs the passes much faster where it is native, and moves
single attention probabilities.

Why fp32 stays the default: that noise moves CAHP's selection (k* and the kept heads, and with them
accuracy). bf16 is for users who trade that for speed, and knowingly. The figures:
DESIGN.md, "Measurements behind the code".

Only the model runs in bfloat16: the collectors pool and accumulate in float32/float64 with autocast
switched off (:func:`full_precision`). ``auto`` picks bfloat16 only where it is native (AVX-512 BF16
or AMX on CPU via oneDNN, bf16-capable CUDA); elsewhere bfloat16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cahp_deploy.errors import CahpError

PRECISIONS = ("auto", "bf16", "fp32")


def bf16_native(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` runs bfloat16 matmuls natively (not emulated)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or CPU-only build without the probe
        return False


def check_precision(precision: str) -> None:
    """A :class:`CahpError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise CahpError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """``auto`` -> ``bf16`` where native, else ``fp32``; an explicit choice is kept (checked)."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if bf16_native(device_type) else "fp32"
    return precision


@contextlib.contextmanager
def evidence_precision(precision: str, device_type: str = "cpu") -> Iterator[str]:
    """Run the enclosed forward/backward passes at ``precision`` (resolved); yields what was used."""
    used = resolve_precision(precision, device_type)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=used == "bf16"):
        yield used


def full_precision(device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """Autocast off: the collectors' pooling and statistics stay float32/float64 inside a bf16 pass."""
    return torch.autocast(device_type, enabled=False)


__all__ = ["PRECISIONS", "bf16_native", "check_precision", "evidence_precision", "full_precision", "resolve_precision"]
