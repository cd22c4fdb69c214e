"""Physical removal of heads and FFN neurons: narrow the projections, replace emptied layers.

For a layer keeping heads ``kept`` (original indices, ascending) with head size d::

    Q, K, V  (H -> heads*d)   keep output rows   [h*d, (h+1)*d) for h in kept  (weight and bias)
    O        (heads*d -> H)   keep input columns [h*d, (h+1)*d) for h in kept  (bias unchanged)

This is exactly the dense model with the other heads' context multiplied by 0 (``gates.head_mask``):
the removed columns of O only ever saw those zeros. A layer keeping no head has no context at all;
its attention block is replaced by :mod:`cahp_deploy.pruning.empty_attention` (output = O's bias).

FFN neurons kept ``kept`` (original indices) of a layer::

    FFN in   (H -> I)   keep output rows    kept  (weight and bias)
    FFN out  (I -> H)   keep input columns  kept  (bias unchanged)

which is exactly the dense model with the other neurons' activations multiplied by 0
(``gates.neuron_mask``). A layer keeping no neuron computes only FFN-out's bias; it keeps one
*inert* unit (zero weights in, zero weights out, the original output bias), because zero-width
tensors break ONNX export and ORT's fusions while one unit costs 2·H MACs per token. Its output is
exactly the bias, so the residual passes through.

The shape is recorded in the config (``cahp_kept_heads``, ``cahp_dense_heads``, and for neurons
``cahp_kept_neurons``, ``cahp_dense_intermediate``) so
:func:`cahp_deploy.pruning.load_pruned` can rebuild it without ``prune_heads``.

transformers 4.x and 5.x, where they differ here (``arch.TRANSFORMERS``):
  * ``_hf_pruned_heads`` writes ``config.pruned_heads`` only where ``hf_pruned_heads`` (4.x; 5.0
    removed the field and ``PreTrainedModel.prune_heads``): on 5.x it writes nothing and
    ``from_pretrained`` of a pruned dir fails on shapes; ``load_pruned`` is then the only loader.
  * ``_narrow_layer`` sets ``pruned_heads`` on the attention modules when they have it (4.x
    bookkeeping for a later ``prune_heads`` call); 5.x modules lack it and it is skipped.
  * the head-count/width attributes (``ArchSpec.heads_attr``/``width_attr``) keep their names in 5.x,
    whose attention reshapes with ``-1`` heads anyway; ``empty_attention`` returns the pair both take.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.hf_classifier import KEPT_HEADS_FIELD
from cahp_deploy.pruning.empty_attention import EmptyAttention, EmptyAttentionWithNorm

#: config.json field: heads per layer of the dense architecture the kept indices refer to.
DENSE_HEADS_FIELD = "cahp_dense_heads"
#: config.json field: FFN neurons per layer of the dense architecture the kept neuron indices refer to.
DENSE_INTERMEDIATE_FIELD = "cahp_dense_intermediate"
KEPT_NEURONS_FIELD = arch.KEPT_NEURONS_FIELD

def validate_kept_heads(kept_heads, num_layers: int, heads_per_layer: int, source: str = "selection") -> list[list[int]]:
    """Check a per-layer list of kept head indices against a (layers, heads) grid; return it sorted.

    Raises :class:`CahpError` for a wrong layer count, indices out of range or repeated, and a
    selection keeping no head at all (a classifier needs at least one attention head somewhere;
    zero-head *layers* are fine).
    """
    if not isinstance(kept_heads, Sequence) or isinstance(kept_heads, str):
        raise CahpError(f"{source}: kept_heads must be a list of per-layer lists, got {type(kept_heads).__name__}")
    if len(kept_heads) != num_layers:
        raise CahpError(
            f"{source} has {len(kept_heads)} layers but the model has {num_layers}; "
            "it was made for another model: run select on this model"
        )
    out = []
    for layer, heads in enumerate(kept_heads):
        if not isinstance(heads, Sequence) or isinstance(heads, str):
            raise CahpError(f"{source}: kept_heads[{layer}] must be a list of head indices, got {heads!r}")
        if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) for h in heads):
            raise CahpError(f"{source}: kept_heads[{layer}] must hold integer head indices, got {list(heads)!r}")
        heads = [int(h) for h in heads]
        bad = [h for h in heads if not 0 <= h < heads_per_layer]
        if bad:
            raise CahpError(
                f"{source}: layer {layer} keeps head(s) {bad} out of range; the model has heads 0..{heads_per_layer - 1} "
                "per layer: was the selection made for another model?"
            )
        if len(set(heads)) != len(heads):
            repeated = sorted({h for h in heads if heads.count(h) > 1})
            raise CahpError(f"{source}: layer {layer} lists head(s) {repeated} more than once; list each kept head once")
        out.append(sorted(heads))
    if sum(len(h) for h in out) == 0:
        raise CahpError(f"{source} keeps no head in any layer; keep at least one head")
    return out


def validate_kept_neurons(kept_neurons, num_layers: int, intermediate: int, source: str = "selection") -> list[list[int]]:
    """Check a per-layer list of kept FFN neuron indices against (layers, intermediate); return it sorted.

    Zero-neuron layers are allowed here (the selection decides whether they may happen); the block
    still computes (the residual passes through).
    """
    if not isinstance(kept_neurons, Sequence) or isinstance(kept_neurons, str):
        raise CahpError(f"{source}: kept_neurons must be a list of per-layer lists, got {type(kept_neurons).__name__}")
    if len(kept_neurons) != num_layers:
        raise CahpError(f"{source} has {len(kept_neurons)} layers of neurons but the model has {num_layers}; "
                        "it was made for another model: run select on this model")
    out = []
    for layer, neurons in enumerate(kept_neurons):
        if not isinstance(neurons, Sequence) or isinstance(neurons, str) or any(
                isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in neurons):
            raise CahpError(f"{source}: kept_neurons[{layer}] must be a list of integer neuron indices")
        neurons = sorted(int(n) for n in neurons)
        if neurons and not (0 <= neurons[0] and neurons[-1] < intermediate):
            raise CahpError(f"{source}: layer {layer} keeps neuron(s) out of range; the model has neurons "
                            f"0..{intermediate - 1} per layer: was the selection made for another model?")
        if len(set(neurons)) != len(neurons):
            raise CahpError(f"{source}: layer {layer} lists a neuron more than once; list each kept neuron once")
        out.append(neurons)
    return out


def _narrow_ffn(block: nn.Module, spec: arch.ArchSpec, kept: list[int]) -> None:
    """Keep FFN neurons ``kept`` of one block (original order); none left: one inert unit."""
    ffn_in, ffn_out = arch.get_path(block, spec.ffn_in), arch.get_path(block, spec.ffn_out)
    if kept:
        index = torch.tensor(kept, dtype=torch.long)
        arch.set_path(block, spec.ffn_in, _narrowed_linear(ffn_in, index, dim=0))
        arch.set_path(block, spec.ffn_out, _narrowed_linear(ffn_out, index, dim=1))
        return
    inert_in = _narrowed_linear(ffn_in, torch.zeros(1, dtype=torch.long), dim=0)
    inert_out = _narrowed_linear(ffn_out, torch.zeros(1, dtype=torch.long), dim=1)
    with torch.no_grad():
        inert_in.weight.zero_()
        inert_out.weight.zero_()
        if inert_in.bias is not None:
            inert_in.bias.zero_()
    arch.set_path(block, spec.ffn_in, inert_in)
    arch.set_path(block, spec.ffn_out, inert_out)


def _head_columns(kept: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])


def _narrowed_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``linear`` keeping rows (dim=0, outputs) or columns (dim=1, inputs) ``index``."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, index)
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _narrow_layer(block: nn.Module, spec: arch.ArchSpec, kept: list[int], dense: int, head_dim: int) -> None:
    """Keep ``kept`` heads (>= 1) of one block, in original order."""
    index = _head_columns(kept, head_dim)
    for path in (spec.query, spec.key, spec.value):
        arch.set_path(block, path, _narrowed_linear(arch.get_path(block, path), index, dim=0))
    arch.set_path(block, spec.output, _narrowed_linear(arch.get_path(block, spec.output), index, dim=1))
    attention = arch.get_path(block, spec.self_attention)
    setattr(attention, spec.heads_attr, len(kept))
    setattr(attention, spec.width_attr, len(kept) * head_dim)
    removed = set(range(dense)) - set(kept)
    # transformers 4.x bookkeeping, so a later HF prune_heads() maps indices right (absent in v5).
    for module in {id(m): m for m in (attention, arch.get_path(block, spec.attention_block))}.values():
        if hasattr(module, "pruned_heads"):
            module.pruned_heads = removed


def _empty_layer(block: nn.Module, spec: arch.ArchSpec) -> None:
    """Replace a zero-head block's attention sub-block by its output-projection bias (+ norm)."""
    bias = arch.get_path(block, spec.output).bias
    if bias is None:  # no supported architecture lacks it; zeros is what the dense model adds then
        bias = torch.zeros(arch.get_path(block, spec.output).out_features)
    if spec.attention_norm is None:
        replacement: nn.Module = EmptyAttention(bias)
    else:
        norm = arch.get_path(block, spec.attention_norm)
        parent = arch.get_path(block, spec.attention_norm.rpartition(".")[0])
        dropout = next((m.p for m in parent.children() if isinstance(m, nn.Dropout)), 0.0)
        replacement = EmptyAttentionWithNorm(bias, norm, dropout)
    old = arch.get_path(block, spec.attention_block)
    replacement.train(old.training)
    arch.set_path(block, spec.attention_block, replacement)


def _hf_pruned_heads(kept_heads: list[list[int]], dense: int) -> dict[int, list[int]]:
    """``config.pruned_heads`` for transformers 4.x ``from_pretrained``, or {} when it cannot apply.

    {} where transformers has no ``pruned_heads`` (``arch.TransformersRow.hf_pruned_heads``, 5.x).
    4.x's ``prune_heads`` crashes on a layer losing every head, so {} then too (use ``load_pruned``).
    """
    if not arch.transformers_row().hf_pruned_heads or any(len(k) == 0 for k in kept_heads):
        return {}
    return {i: sorted(set(range(dense)) - set(k)) for i, k in enumerate(kept_heads) if len(k) < dense}


def prune_model(model: nn.Module, kept_heads: list[list[int]],
                kept_neurons: list[list[int]] | None = None) -> nn.Module:
    """Physically remove every head not in ``kept_heads`` (per layer, original indices) and, when
    ``kept_neurons`` is given, every FFN neuron not in it; in place.

    ``model`` must be a dense classifier of a supported architecture. Layers may keep any number
    of heads (ragged), including zero; at least one head must remain overall. Returns ``model``
    with ``config.cahp_kept_heads`` / ``config.cahp_dense_heads`` set (and, on transformers 4.x
    when every layer keeps a head, ``config.pruned_heads`` so plain ``from_pretrained`` reloads it).
    """
    spec = arch.spec_for(model)
    config = model.config
    if getattr(config, KEPT_HEADS_FIELD, None) is not None:
        raise CahpError("the model is already pruned (config has cahp_kept_heads); prune the dense source model")
    n_layers, dense = arch.dense_head_grid(config)
    kept_heads = validate_kept_heads(kept_heads, n_layers, dense, source="kept_heads")
    d = arch.head_dim(config)
    blocks = arch.layers(model)
    for block, kept in zip(blocks, kept_heads, strict=True):
        if len(kept) == dense:
            continue
        if kept:
            _narrow_layer(block, spec, kept, dense, d)
        else:
            _empty_layer(block, spec)
    setattr(config, KEPT_HEADS_FIELD, kept_heads)
    setattr(config, DENSE_HEADS_FIELD, dense)
    config.pruned_heads = _hf_pruned_heads(kept_heads, dense)
    if kept_neurons is not None:
        inter = arch.intermediate_size(config)
        kept_neurons = validate_kept_neurons(kept_neurons, n_layers, inter, source="kept_neurons")
        for block, kept in zip(blocks, kept_neurons, strict=True):
            if len(kept) < inter:
                _narrow_ffn(block, spec, kept)
        setattr(config, KEPT_NEURONS_FIELD, kept_neurons)
        setattr(config, DENSE_INTERMEDIATE_FIELD, inter)
    return model
