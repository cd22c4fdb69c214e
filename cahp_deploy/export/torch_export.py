"""The plain fp32 ONNX export of an already-loaded classifier through ``torch.onnx``, without Optimum.

The graph contract is Optimum's for ``text-classification``, so no later stage can tell which exporter
ran: inputs ``ArchSpec.onnx_inputs`` in that order (``input_ids``, ``attention_mask``, and
``token_type_ids`` for BERT and ELECTRA), int64, axes 0 and 1 dynamic (``batch_size``,
``sequence_length``); one output ``logits`` (``batch_size``, num_labels); the model's ragged per-layer
heads and neurons as they are (zero-head layers are the Add + LayerNorm of
:mod:`cahp_deploy.pruning.empty_attention`).

Why the TorchScript exporter (``dynamo=False``, which Optimum uses too): ONNX Runtime's transformer
optimizer matches the graphs it writes. The dynamo exporter's graph of the same tiny BERT (torch
2.13, transformers 5.25, opset 18) keeps parity but fuses no ``Attention`` and no
``EmbedLayerNormalization`` node (only SkipLayerNormalization and BiasGelu), for eager and sdpa alike.

One rewrite after export (:func:`pin_head_counts`): transformers 5.x reshapes Q/K/V with
``view(batch, seq, -1, head_dim)``, so the head count in the graph is ``-1`` and the optimizer, which
reads it from that shape, fuses nothing ("Failed to detect num_heads"). Each such ``-1`` is replaced
by the width of the projection that feeds the Reshape divided by ``head_dim``: the value ``-1``
resolves to at run time, so the graph computes the same thing, per layer (ragged layers included)::

    MatMul(x, W[H, w]) ─► Add(b) ─► Reshape(·, Concat(B, S, -1, d))   ==>   Reshape(·, Concat(B, S, w/d, d))

transformers 4.x writes the count as a constant already; there the rewrite finds nothing to do.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from cahp_deploy import arch

log = logging.getLogger(__name__)

OUTPUT_NAME = "logits"
#: names of the dynamic axes (Optimum's, so the graphs are interchangeable)
BATCH_AXIS, SEQUENCE_AXIS = "batch_size", "sequence_length"
#: (batch, sequence) of the example inputs traced (Optimum's default dummy shapes)
_TRACE_SHAPE = (2, 16)


def _example_inputs(config, names: tuple[str, ...]) -> dict:
    """Traced example: random ids, the second row padded (so no all-ones mask shortcut is baked in)."""
    import torch

    batch, seq = _TRACE_SHAPE
    seq = min(seq, arch.max_sequence_length(config))
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size", 1000))
    values = {
        "input_ids": torch.randint(5, max(6, vocab), (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
    }
    values["attention_mask"][1, seq // 2:] = 0
    return {n: values[n] for n in names}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _scalar(value: np.ndarray | None) -> int | None:
    if value is None or value.size != 1:
        return None
    return int(value.reshape(-1)[0])


def pin_head_counts(model: onnx.ModelProto) -> int:
    """Replace the ``-1`` head count of every projection -> ``[B, S, -1, d]`` Reshape by ``width // d``.

    Only Reshapes whose data input is ``Add(MatMul(·, W), bias)`` with a constant ``W`` and whose
    shape is a 4-input ``Concat`` with constant ``-1`` and ``d`` in the last two places are touched
    (Q, K and V of every layer). Returns how many were rewritten.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consts = _constants(graph)
    changed = 0
    replaced: set[str] = set()
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        shape = producer.get(node.input[1])
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            continue
        heads, d = _scalar(consts.get(shape.input[2])), _scalar(consts.get(shape.input[3]))
        if heads != -1 or not d or d <= 0:
            continue
        add = producer.get(node.input[0])
        width = None
        if add is not None and add.op_type == "Add":
            for name in add.input:
                mm = producer.get(name)
                if mm is not None and mm.op_type == "MatMul" and mm.input[1] in consts:
                    width = int(consts[mm.input[1]].shape[-1])
        if width is None or width % d:
            continue
        pinned = f"{node.name or node.output[0]}/cahp_num_heads"
        graph.initializer.append(numpy_helper.from_array(np.array([width // d], dtype=np.int64), pinned))
        replaced.add(shape.input[2])
        shape.input[2] = pinned
        changed += 1
    # the -1 constants nothing reads any more (ORT would warn about each at load)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] in replaced and n.output[0] not in used]
    for n in dead:
        graph.node.remove(n)
    for t in [t for t in graph.initializer if t.name in replaced and t.name not in used]:
        graph.initializer.remove(t)
    return changed


def export_torch(model: nn.Module, path: Path, opset: int) -> list[str]:
    """Write ``model`` as ONNX to ``path`` with ``torch.onnx`` (TorchScript exporter); return the input names.

    Raises what ``torch.onnx.export`` raises; :func:`cahp_deploy.export.onnx_export.export_onnx`
    turns that into one :class:`~cahp_deploy.errors.CahpError`.
    """
    import torch

    names = tuple(arch.spec_for(model).onnx_inputs)
    axes = {n: {0: BATCH_AXIS, 1: SEQUENCE_AXIS} for n in names}
    axes[OUTPUT_NAME] = {0: BATCH_AXIS}
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the default from torch 2.9 on; see the module docstring
    path = Path(path)
    # The model itself is traced (no wrapper module), so node and initializer names are Optimum's
    # ("/bert/encoder/layer.0/..."); the inputs go in as keyword arguments (a dict as the last
    # positional argument), and with return_dict the one non-None output is the logits.
    return_dict = model.config.return_dict
    model.config.return_dict = True
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about constants in transformers' mask code; parity checks the result.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (_example_inputs(model.config, names),), str(path), input_names=list(names),
                output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=int(opset), do_constant_folding=True,
                **kwargs,
            )
    finally:
        model.config.return_dict = return_dict
    graph = onnx.load(str(path))
    outputs = [o.name for o in graph.graph.output]
    if outputs != [OUTPUT_NAME]:
        raise RuntimeError(f"torch.onnx wrote outputs {outputs}, expected [{OUTPUT_NAME!r}]")
    pinned = pin_head_counts(graph)
    if pinned:
        onnx.save(graph, str(path))
    log.info("exported %s with torch.onnx (opset %d, inputs %s, %d head counts pinned)", path, opset, names, pinned)
    return list(names)


__all__ = ["export_torch", "pin_head_counts"]
