"""FP16 variants (CUDA): half-precision weights and activations, fp32 inputs/outputs kept.

FP16 starts from the fully fused graph (``ort_default``: on CUDA SkipLayerNormalization is the fast
path, unlike on CPU) and keeps fp32 inputs and outputs (``keep_io_types``), so callers feed the
same int64 ids and read fp32 logits. It is *checked* on CPU: ONNX Runtime's CPU provider runs fp16
graphs (slowly, converting around ops without fp16 kernels). When no available provider can even
create a session for the fp16 graph (an op with no fp16 kernel anywhere installed), there is no way
to check it, and the export fails rather than ship an unchecked model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from cahp_deploy import onnx_runtime
from cahp_deploy.errors import CahpError

log = logging.getLogger(__name__)

FP16_CHECK = "to check the fp16 model (use --provider cpu to check it on the CPU, or drop --fp16)"


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
