"""INT8 (dynamic quantization, CPU) and FP16 (CUDA, fp32 inputs/outputs kept) variants.

INT8 quantizes the *optimized* graph, so it inherits the fused attention. ORT's quantizer needs
``DefaultTensorType=FLOAT`` there: the fused contrib ops (Attention, EmbedLayerNormalization) have
outputs whose type its shape inference cannot derive, and it stops without a default. Only the
weight MatMuls (:data:`INT8_OP_TYPES`) are quantized, minus the nodes the accuracy search keeps in
fp32 (:mod:`cahp_deploy.exporters.int8_tuning` decides which).

FP16 starts from the fully fused graph (``ort_default``: on CUDA SkipLayerNormalization is the fast
path, unlike on CPU) and keeps fp32 inputs and outputs (``keep_io_types``), so callers feed the
same int64 ids and read fp32 logits. It is *checked* on CPU: ONNX Runtime's CPU provider runs fp16
graphs (slowly, converting around ops without fp16 kernels). When no available provider can even
create a session for the fp16 graph (an op with no fp16 kernel anywhere installed), there is no way
to check it, and the export fails rather than ship an unchecked model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from cahp_deploy import onnx_runtime
from cahp_deploy.errors import CahpError

log = logging.getLogger(__name__)

FP16_CHECK = "to check the fp16 model (use --provider cpu to check it on the CPU, or drop --fp16)"


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


def convert_fp16(src: Path, dst: Path) -> None:
    """Half-precision weights and activations; fp32 graph inputs/outputs."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True, use_symbolic_shape_infer=True)
    model.save_model_to_file(str(dst))
    log.info("converted %s -> %s (fp16, fp32 I/O)", src, dst)


def fp16_session(path: Path, provider: str):
    """A session that can run the fp16 graph, or a :class:`CahpError` saying there is no way to check it."""
    name = onnx_runtime.check_provider(provider, purpose=FP16_CHECK)
    try:
        return onnx_runtime.session(path, provider)
    except Exception as e:  # ORT raises its own Fail/NotImplemented types, all "cannot run this graph"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CahpError(
            f"--fp16: ONNX Runtime ({name}) cannot run the fp16 graph, so it cannot be checked ({first}); "
            "export it where CUDA is available (--provider cuda) or drop --fp16"
        ) from e
