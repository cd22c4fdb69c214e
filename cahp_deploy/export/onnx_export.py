"""The plain fp32 ONNX export of an already-loaded classifier: through Optimum, or through ``torch.onnx``.

Two exporters write the same graph contract (input and output names, dynamic axes, opset 18 by
default; see :mod:`cahp_deploy.export.torch_export`): ``optimum`` (optimum-onnx's ``export``, the
``[optimum]`` extra) and ``torch`` (``torch.onnx``, always there). ``auto`` (the default) takes
Optimum when it is installed *and* its declared transformers range holds the installed transformers
(optimum-onnx 0.1.0 declares transformers<4.58: an install forced beside 5.x is not used), else
torch; the manifest records which ran and why (``exporter``).

Why from a model *object*: Optimum's ``main_export`` reloads the model by name with plain
``from_pretrained``, which cannot rebuild a pruned model's ragged or zero-head layers. Here the model
is loaded once by :func:`cahp_deploy.modeling.load_classifier` (dense or pruned), then handed to
Optimum's ``export`` with the ``text-classification`` ONNX config that ``TasksManager`` registers for
its ``model_type``. Batch and sequence axes are dynamic (the config's ``batch_size`` /
``sequence_length``).

Attention implementation: :func:`cahp_deploy.arch.export_attention` (transformers 4.x: ``sdpa``
wherever transformers supports it, else ``eager`` (ELECTRA); 5.x: ``eager``): the path ORT's
transformer optimizer fuses into ``Attention`` for each version (DESIGN.md, "Measurements behind the code").
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from torch import nn

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.export.config import EXPORTERS

log = logging.getLogger(__name__)

TASK = "text-classification"
#: Below 11 torch cannot export the dynamic slices of the position ids (measured: 9 and 10 fail).
MIN_OPSET = 11
#: the opset when none is asked for: Optimum's default (``OnnxConfig.DEFAULT_ONNX_OPSET``) for every
#: supported architecture, used by both exporters so the choice of exporter does not change it
DEFAULT_OPSET = 18
_OPTIMUM_DIST = "optimum-onnx"


def optimum_unusable() -> str | None:
    """Why Optimum cannot export here (not installed, or its transformers range excludes the installed
    one), or None when it can. Reads package metadata only; nothing is imported."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        dist = metadata.distribution(_OPTIMUM_DIST)
    except metadata.PackageNotFoundError:
        return f"{_OPTIMUM_DIST} is not installed"
    installed = metadata.version("transformers")
    for line in dist.requires or []:
        req = Requirement(line)
        if req.name.lower() == "transformers" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            if not req.specifier.contains(Version(installed), prereleases=True):
                return f"{_OPTIMUM_DIST} {dist.version} requires transformers{req.specifier}, installed is {installed}"
    return None


def resolve_exporter(exporter: str = "auto") -> tuple[str, str]:
    """``(optimum | torch, why)`` for ``--exporter``; a :class:`CahpError` when Optimum is asked for and unusable."""
    if exporter not in EXPORTERS:
        raise CahpError(f"--exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if exporter == "torch":
        return "torch", "asked for (--exporter torch)"
    unusable = optimum_unusable()
    if exporter == "optimum":
        if unusable:
            raise CahpError(f"--exporter optimum cannot run: {unusable}; install the extra that pins a transformers "
                            "it supports (pip install 'cahp-deploy[optimum]'), or use --exporter torch (or auto)")
        return "optimum", "asked for (--exporter optimum)"
    if unusable:
        return "torch", f"auto: {unusable}"
    return "optimum", f"auto: {_OPTIMUM_DIST} is installed and supports the installed transformers"


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


def resolve_opset(model: nn.Module, opset: int | None, exporter: str = "auto") -> int:
    """The opset to use: the user's, checked against what the exporters can do, or the default
    (Optimum's config's for the optimum exporter, :data:`DEFAULT_OPSET` for torch: the same number)."""
    if opset is None:
        if resolve_exporter(exporter)[0] == "optimum":
            return int(onnx_config_for(model).DEFAULT_ONNX_OPSET)
        return DEFAULT_OPSET
    hi = max_opset()
    if not MIN_OPSET <= int(opset) <= hi:
        raise CahpError(f"--opset {opset} cannot be exported (torch/Optimum support {MIN_OPSET}..{hi}); pick one in that range")
    return int(opset)


def attn_implementation_for(config) -> str:
    """The attention implementation to export with: :func:`cahp_deploy.arch.export_attention`."""
    return arch.export_attention(config)


def export_onnx(model: nn.Module, path: Path, opset: int, exporter: str = "auto") -> list[str]:
    """Write ``model`` as ONNX to ``path`` (dynamic batch/sequence) with ``exporter``; return the input names."""
    name, _ = resolve_exporter(exporter)
    try:
        if name == "torch":
            from cahp_deploy.export.torch_export import export_torch

            input_names = export_torch(model, Path(path), opset)
        else:
            from optimum.exporters.onnx.convert import export

            onnx_config = onnx_config_for(model)
            with warnings.catch_warnings():
                # The tracer warns about constants in transformers' mask code; parity checks the result.
                warnings.filterwarnings("ignore", message=".*(results are registered as constants|Converting a tensor to a Python).*")
                input_names, _ = export(model, onnx_config, Path(path), opset=opset, device="cpu")
    except CahpError:
        raise
    except Exception as e:  # torch.onnx raises many types; all mean "this opset/graph cannot be exported"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CahpError(f"ONNX export ({name}) at opset {opset} failed: {first[:300]}; try another --opset"
                        + (" or --exporter torch" if name == "optimum" else "")) from e
    log.info("exported %s with %s (opset %d, inputs %s)", path, name, opset, input_names)
    return list(input_names)
