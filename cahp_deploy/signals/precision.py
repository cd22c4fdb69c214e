"""The precision of the evidence passes' forward and backward: bfloat16 where the hardware does it natively.

Why: CAHP's evidence is *statistics* of attention maps (per-class means and variances of pooled
maps, float64) and summed gradient magnitudes, not any single logit, and ~2/3 of the passes' time
is ``nn.Linear``. Measured on minilm-sst5 (one thread, 384 rows, three interleaved repeats): the
signature forward takes 3.4-4.7 s in fp32 and 1.4-1.6 s under bfloat16 autocast on this AVX-512
BF16 CPU, the salience forward+backward 1.7-2.2 s vs 0.8-1.0 s; single attention probabilities
move by up to 0.08.

Why fp32 stays the default: that noise moves CAHP's selection. On minilm-sst5 (all 8,544 train
rows) bf16 gave k* 15 instead of 14 and kept 10 of the same 15 heads; the kept set's head-masked
accuracy on validation fell from 37.15 % to 35.06 % (``bench/results/select_speed/``). bf16 is for
users who trade that for speed, and knowingly.

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
