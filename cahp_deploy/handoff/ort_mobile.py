"""ORT format for ONNX Runtime Mobile: onnxruntime's own converter, plus parity against the ONNX file.

The converter (``onnxruntime.tools.convert_onnx_models_to_ort``, "Fixed" optimization style, the one
the ORT Mobile docs recommend for a known target) writes ``model.ort`` and
``model.required_operators_and_types.config``: the operator/type list a reduced-size ORT Mobile build
is compiled with (``build.sh --include_ops_by_config ...``). Parity: the same inputs through an ORT
session on the ``.ort`` file and on the ``.onnx`` file it came from; the graph is the same up to the
optimizations the converter bakes in, so the gate is the fp32 one (1e-4).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cahp_deploy import onnx_runtime
from cahp_deploy.errors import CahpError
from cahp_deploy.export import parity

log = logging.getLogger(__name__)

ORT_FILE = "model.ort"
OPS_CONFIG = "model.required_operators_and_types.config"
ATOL = parity.FP32_ATOL


def convert(onnx_path: Path, out_dir: Path) -> list[str]:
    """Convert ``onnx_path`` to ``out_dir/model.ort`` + its reduced-operator config; return the file names."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="ortconv-", dir=out_dir) as tmp:
        src = Path(tmp) / "model.onnx"  # the converter names outputs after the input file
        shutil.copyfile(onnx_path, src)
        conv = Path(tmp) / "out"
        chatter = io.StringIO()  # the converter prints its progress; keep it for the debug log only
        ort_log = logging.getLogger("ort_format_model.utils")  # it also logs INFO through a handler of its own
        level = ort_log.level
        ort_log.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(chatter):
                convert_onnx_models_to_ort(src, output_dir=conv, optimization_styles=[OptimizationStyle.Fixed],
                                           enable_type_reduction=True)
            log.debug("ORT converter: %s", chatter.getvalue())
        except Exception as e:  # the converter raises plain RuntimeError/ValueError from ORT
            raise CahpError(f"onnxruntime's ORT-format converter failed on {onnx_path.name}: {str(e).splitlines()[0][:200]}") from e
        finally:
            ort_log.setLevel(level)
        produced = {p.name for p in conv.iterdir()}
        for need in (ORT_FILE, OPS_CONFIG):
            if need not in produced:
                raise CahpError(f"the ORT-format converter did not write {need} (it wrote {sorted(produced)})")
            shutil.move(str(conv / need), out_dir / need)
    return [ORT_FILE, OPS_CONFIG]


def check_parity(onnx_path: Path, ort_path: Path, feeds: list[dict]) -> dict:
    """Logits of the .ort model vs the .onnx model on ``feeds``; raise when beyond :data:`ATOL`."""
    ref = onnx_runtime.logits(onnx_runtime.session(onnx_path), feeds)
    got = onnx_runtime.logits(onnx_runtime.session(ort_path), feeds)
    res = onnx_runtime.compare(ref, got)
    res["atol"] = ATOL
    res["reference"] = f"{onnx_path.name} (ONNX Runtime CPU)"
    if res["max_abs_diff"] > ATOL or res["argmax_mismatches"] or not np.isfinite(got).all():
        raise CahpError(f"{ort_path.name} differs from {onnx_path.name}: max |logit diff| {res['max_abs_diff']:.2e} "
                        f"(limit {ATOL:g}), {res['argmax_mismatches']} argmax mismatches; nothing was written")
    res["passed"] = True
    return res
