"""The benchmark harness: latency, throughput, memory and accuracy of exported artifacts.

:func:`bench` is the stage (``cahp-deploy bench``). Modules, each one concern:

* ``artifacts`` — open, verify (the export's ``verify``) and check comparability of artifact dirs;
* ``inputs`` — the fixed (batch x seq) grid and real-traffic batches from the data;
* ``cell_session`` — one session bound to one cell's feeds (IO binding on GPUs);
* ``timing`` — warm-up, interleaved round-robin repetitions, statistics;
* ``memory`` — peak RSS growth, GPU memory in use, file sizes;
* ``accuracy`` — predictions through ONNX Runtime, accuracy and agreement;
* ``machine``, ``report``, ``plots`` — what the report dir holds.

Sessions, providers and thread settings come from :mod:`cahp_deploy.onnx_runtime`. Importing is cheap: ``onnxruntime``, ``transformers`` and ``matplotlib`` load when :func:`bench` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cahp_deploy.bench.stage import bench


def __getattr__(name: str):
    if name == "bench":  # imported on first use, so the configs and `--help` stay light
        from cahp_deploy.bench.stage import bench

        return bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["bench"]
