"""SmoothQuant-style activation smoothing before dynamic INT8 (``export --int8-smooth ALPHA``, and the
INT8 search's first lever after a gate miss: the most sensitive nodes smoothed, all still INT8).

Dynamic INT8 scales each MatMul input per tensor, so a few outlier channels (BERT's early FFN
inputs) leave the other channels with a handful of levels. Smoothing moves that range into the
weights, exactly in fp32 (Xiao et al., SmoothQuant, 2023)::

    x @ W  ==  (x * 1/s) @ (s[:, None] * W),   s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)

``max|x_j|`` comes from the calibration feeds (the INT8 tuning rows). BERT is post-LayerNorm: the
LayerNorm feeding a MatMul also feeds the residual, so ``1/s`` cannot be folded into it; it is an
explicit ``Mul`` (per token: ``K`` multiplies next to the MatMul's ``K x N``). What alpha does on
MiniLM: DESIGN.md, "Measurements behind the code".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import onnx
import onnx.numpy_helper as nh

from cahp_deploy.errors import CahpError
from cahp_deploy.export.parity import Feed

#: the scale is clipped to this range, so a dead channel does not blow up its weights
SCALE_RANGE = (1e-2, 1e2)


def smoothable_nodes(model: onnx.ModelProto, only: Collection[str] | None = None) -> dict:
    """The nodes :func:`smooth` can smooth (every quantizable one but ``Gemm``), by name; ``only``: those named."""
    from cahp_deploy.export.int8.tuning import quantizable_nodes

    return {c.name: c for c in quantizable_nodes(model) if c.op_type != "Gemm" and (only is None or c.name in only)}


def input_absmax(model: onnx.ModelProto, feeds: Sequence[Feed], threads: int = 2) -> dict:
    """Per-channel max |x| of every smoothable node's input over ``feeds`` (what :func:`smooth` calibrates
    with; compute it once when smoothing the same graph several ways)."""
    by_name = {n.name: n for n in model.graph.node}
    return _input_absmax(model, feeds, sorted({by_name[c].input[0] for c in smoothable_nodes(model)}), threads)


def _input_absmax(model: onnx.ModelProto, feeds: Sequence[Feed], tensors: Sequence[str], threads: int) -> dict:
    """Per-channel max |x| (last axis) of ``tensors`` over every feed, exposed as extra graph outputs."""
    from cahp_deploy.export.int8.tuning import session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in tensors:
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    s = session(m, threads)
    names = [o.name for o in s.get_outputs()]
    inputs = {i.name for i in s.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        got = dict(zip(names, s.run(None, {k: v for k, v in f.items() if k in inputs})))
        for t in tensors:
            a = np.abs(got[t]).reshape(-1, got[t].shape[-1]).max(0)
            out[t] = a if t not in out else np.maximum(out[t], a)
    return out


def smooth(model: onnx.ModelProto, feeds: Sequence[Feed], alpha: float, threads: int = 2,
           only: Collection[str] | None = None, absmax: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """The graph with every weight MatMul / fused Attention smoothed (Gemm: pooled vectors, left alone),
    or only the nodes named in ``only``: each smoothed input is one more elementwise ``Mul`` at run time.
    ``absmax``: :func:`input_absmax` of ``model`` (else computed from ``feeds``)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise CahpError(f"--int8-smooth {alpha} must be in [0, 1] (0.75 measured best; see experiments/results/int8)")
    cands = smoothable_nodes(model, only)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    by_name = {n.name: n for n in m.graph.node}
    amax = absmax if absmax is not None else _input_absmax(model, feeds, sorted({by_name[c].input[0] for c in cands}), threads)
    nodes = []
    for n in m.graph.node:
        if n.name in cands:
            c = cands[n.name]
            w = nh.to_array(inits[c.weight]).astype(np.float32)
            a = np.maximum(amax[n.input[0]], 1e-5)
            s = np.clip(a ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha), *SCALE_RANGE).astype(np.float32)
            inits[c.weight].CopyFrom(nh.from_array((w * s[:, None]).astype(np.float32), c.weight))
            m.graph.initializer.append(nh.from_array((1.0 / s).astype(np.float32), f"{n.name}_smooth_inv"))
            nodes.append(onnx.helper.make_node("Mul", [n.input[0], f"{n.name}_smooth_inv"], [f"{n.name}_smoothed"],
                                               name=f"{n.name}_smooth"))
            n.input[0] = f"{n.name}_smoothed"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, {"alpha": float(alpha), "nodes": len(cands), "node_names": sorted(cands), "scale_range": list(SCALE_RANGE),
               "calibration": "max |x| per input channel over the INT8 tuning rows"}


__all__ = ["SCALE_RANGE", "input_absmax", "smooth", "smoothable_nodes"]
