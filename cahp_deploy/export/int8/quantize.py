"""INT8 variants: ONNX Runtime's dynamic quantization (CPU) of the weight MatMuls.

INT8 quantizes the *optimized* graph, so it inherits the fused attention. ORT's quantizer needs
``DefaultTensorType=FLOAT`` there: the fused contrib ops (Attention, EmbedLayerNormalization) have
outputs whose type its shape inference cannot derive, and it stops without a default. Only the
weight MatMuls (:data:`INT8_OP_TYPES`) are quantized, minus the nodes the accuracy search keeps in
fp32 (:mod:`cahp_deploy.export.int8.tuning` decides which). FP16: :mod:`cahp_deploy.export.fp16`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

log = logging.getLogger(__name__)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs through the *root* logger (a pre-processing hint, one line per tensor
    without quantization parameters); the parity gate, not those lines, decides if INT8 is good."""
    root, flt = logging.getLogger(), _BelowError()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


#: op types INT8 quantizes: the weight MatMuls (ORT rewrites each ``Gemm`` into ``<name>_MatMul`` +
#: ``<name>_Add`` first, so the pooler and classifier count) and the fused attention's packed QKV
#: projection. Not the embeddings (EmbedLayerNormalization / Gather: lookups, no MACs to gain, and a
#: cost in argmax agreement; DESIGN.md, "Measurements behind the code").
INT8_OP_TYPES: tuple[str, ...] = ("MatMul", "Attention")


def quantize_int8(src: Path, dst: Path, per_channel: bool = False, nodes_to_exclude: Sequence[str] = ()) -> None:
    """Dynamic INT8 quantization of the weight MatMuls (signed int8 weights, uint8 activations),
    except ``nodes_to_exclude`` (node names), which stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(INT8_OP_TYPES),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            nodes_to_exclude=list(nodes_to_exclude),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    log.info("quantized %s -> %s (per_channel=%s, %d nodes kept fp32)", src, dst, per_channel, len(nodes_to_exclude))
