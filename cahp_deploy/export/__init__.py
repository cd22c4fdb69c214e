"""The ``export`` and ``verify`` stages: ONNX artifacts that provably compute what PyTorch computes.

* :func:`export` — model dir (dense or pruned) -> artifact dir (``model.onnx`` + optimized / int8 /
  fp16 variants, config, tokenizer, ``manifest.json``); see :mod:`cahp_deploy.export.stage`.
* :func:`verify` — re-check an artifact dir's hashes and run a parity smoke test of each variant.
* :func:`load_manifest`, :func:`variant_path`, :func:`int8_mac_share` — read an artifact dir.

Modules: ``onnx_export`` (export of a loaded model: the exporter choice, Optimum), ``torch_export``
(the ``torch.onnx`` exporter: Optimum's graph contract without Optimum), ``optimize`` (ORT fusions, per-node
head check, choice by timing), ``int8/`` (INT8: ``quantize``, ``tuning`` (which MatMuls stay fp32),
``gate`` (when INT8 is good enough), ``smoothing``), ``fp16``, ``parity``, ``manifest``, ``verify``.
``export`` is imported on first use: it pulls in torch and Optimum, which ``verify`` does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cahp_deploy.export.manifest import VARIANT_FILES, int8_mac_share, load_manifest, variant_path
from cahp_deploy.export.verify import verify

if TYPE_CHECKING:
    from cahp_deploy.export.stage import export


def __getattr__(name: str):
    if name == "export":
        from cahp_deploy.export.stage import export

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VARIANT_FILES", "export", "int8_mac_share", "load_manifest", "variant_path", "verify"]
