"""The plain fp32 ONNX export of an already-loaded classifier, through Optimum.

Why from a model *object*: Optimum's ``main_export`` reloads the model by name with plain
``from_pretrained``, which cannot rebuild a pruned model's ragged or zero-head layers. Here the model
is loaded once by :func:`cahp_deploy.modeling.load_classifier` (dense or pruned), then handed to
Optimum's ``export`` with the ``text-classification`` ONNX config that ``TasksManager`` registers for
its ``model_type``. Batch and sequence axes are dynamic (the config's ``batch_size`` /
``sequence_length``).

Attention implementation: ``sdpa`` wherever transformers supports it, else ``eager`` (ELECTRA).
Measured on ORT 1.32's transformer optimizer: BERT and RoBERTa graphs fuse into ``Attention`` from
either path (identical fused graphs), but DistilBERT's eager path (``masked_fill`` with ``finfo.min``)
is not matched at all, while its sdpa path is.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from torch import nn

from cahp_deploy.errors import CahpError

log = logging.getLogger(__name__)

TASK = "text-classification"
#: Below 11 torch cannot export the dynamic slices of the position ids (measured: 9 and 10 fail).
MIN_OPSET = 11


def max_opset() -> int:
    """Highest opset both the torch exporter and the installed ``onnx`` know."""
    import onnx.defs
    import torch.onnx._constants as torch_onnx

    return min(int(torch_onnx.ONNX_MAX_OPSET), int(onnx.defs.onnx_opset_version()))


def onnx_config_for(model: nn.Module):
    """Optimum's ONNX config for this model's type and the text-classification task."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the configs with TasksManager)
    from optimum.exporters.tasks import TasksManager

    try:
        ctor = TasksManager.get_exporter_config_constructor(
            "onnx", model=model, task=TASK, library_name="transformers"
        )
    except (KeyError, ValueError) as e:
        raise CahpError(
            f"Optimum cannot export model_type {model.config.model_type!r} for {TASK}: {str(e).splitlines()[0]}"
        ) from e
    return ctor(model.config)


def resolve_opset(model: nn.Module, opset: int | None) -> int:
    """The opset to use: the user's, checked against what the exporters can do, or Optimum's default."""
    if opset is None:
        return int(onnx_config_for(model).DEFAULT_ONNX_OPSET)
    hi = max_opset()
    if not MIN_OPSET <= int(opset) <= hi:
        raise CahpError(f"--opset {opset} cannot be exported (torch/Optimum support {MIN_OPSET}..{hi}); pick one in that range")
    return int(opset)


def attn_implementation_for(config) -> str:
    """``sdpa`` when the classifier class supports it (ORT fuses every arch from it), else ``eager``."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def export_onnx(model: nn.Module, path: Path, opset: int) -> list[str]:
    """Write ``model`` as ONNX to ``path`` (dynamic batch/sequence); return the graph's input names."""
    from optimum.exporters.onnx.convert import export

    onnx_config = onnx_config_for(model)
    try:
        with warnings.catch_warnings():
            # The tracer warns about constants in transformers' mask code; parity checks the result.
            warnings.filterwarnings("ignore", message=".*(results are registered as constants|Converting a tensor to a Python).*")
            input_names, _ = export(model, onnx_config, Path(path), opset=opset, device="cpu")
    except Exception as e:  # torch.onnx raises many types; all mean "this opset/graph cannot be exported"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CahpError(f"ONNX export at opset {opset} failed: {first[:300]}; try another --opset") from e
    log.info("exported %s (opset %d, inputs %s)", path, opset, input_names)
    return list(input_names)
