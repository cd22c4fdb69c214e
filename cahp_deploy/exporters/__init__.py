"""The ``export`` and ``verify`` stages: ONNX artifacts that provably compute what PyTorch computes.

* :func:`export` — model dir (dense or pruned) -> artifact dir (``model.onnx`` + optimized / int8 /
  fp16 variants, config, tokenizer, ``manifest.json``); see :mod:`cahp_deploy.exporters.stage`.
* :func:`verify` — re-check an artifact dir's hashes and run a parity smoke test of each variant.
* :func:`load_manifest`, :func:`variant_path`, :func:`int8_mac_share` — read an artifact dir.

Modules: ``onnx_export`` (export of a loaded model: the exporter choice, Optimum), ``torch_export``
(the ``torch.onnx`` exporter: Optimum's graph contract without Optimum), ``optimize`` (ORT fusions, per-node
head check, choice by timing), ``quantize`` (INT8, FP16), ``int8_tuning`` (which MatMuls stay fp32),
``int8_gate`` (when INT8 is good enough), ``parity``, ``manifest``, ``verify``.
``export`` is imported on first use: it pulls in torch and Optimum, which ``verify`` does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cahp_deploy.exporters.manifest import VARIANT_FILES, int8_mac_share, load_manifest, variant_path
from cahp_deploy.exporters.verify import verify

if TYPE_CHECKING:
    from cahp_deploy.exporters.stage import export


def __getattr__(name: str):
    if name == "export":
        from cahp_deploy.exporters.stage import export

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VARIANT_FILES", "export", "int8_mac_share", "load_manifest", "variant_path", "verify"]
