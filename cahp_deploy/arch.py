"""The architecture table: where each supported encoder keeps its layers, heads and projections.

Every stage (signals, gates, pruning, export) reaches into a model only through :func:`spec_for`.
Adding an architecture is one :class:`ArchSpec` entry here plus a tiny-model row in
``tests/conftest.py``. No other module may mention ``bert`` or ``distilbert`` attribute paths.

Paths are dotted attribute paths. ``layers`` is relative to ``model.base_model``; every other path is
relative to one layer (one Transformer block).

transformers 4.x and 5.x: the module paths below are the same in both (v5 drops ``head_mask`` and
``prune_heads``; nothing here relies on either). What v5 changed that this project relies on is in
the second table, :data:`TRANSFORMERS`, one row per major version: which attention implementation
exports to a graph ONNX Runtime fuses, and whether eager attention runs ``attention_probs`` as a
module (v5 computes the probabilities with a functional dropout, so a hook there never fires; the
probe attention below restores the hook point). Code elsewhere asks this module, never the version.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cahp_deploy.errors import CahpError

if TYPE_CHECKING:  # annotations only: bench and verify use the position helpers without torch
    from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """How to reach the attention internals of one encoder family.

    Attributes
    ----------
    model_types : model_type strings from ``config.json`` that this entry serves.
    layers : path from ``model.base_model`` to the ``nn.ModuleList`` of blocks.
    self_attention : path from a block to the module that owns Q/K/V and the head-count attributes.
    query, key, value, output : paths from a block to the four projection ``nn.Linear`` modules.
        ``output`` is the attention output projection; its *input* is the concatenated per-head
        context, (B, S, heads*head_dim), which is where head gates are applied.
    attention_block : path from a block to the module a zero-head layer replaces (it must return the
        output projection's bias in place of the attention output).
    heads_attr, width_attr : attributes on ``self_attention`` holding the head count and the
        concatenated width (heads * head_dim); the pruner rewrites both.
    onnx_inputs : the exported graph's inputs, in order (Optimum's text-classification configs: RoBERTa
        and DistilBERT take no ``token_type_ids``); both exporters write these names.
    attention_norm : path from a block to the LayerNorm that ``attention_block`` itself applies to
        residual + attention (BERT-like), or None when the block applies it outside (DistilBERT).
        It decides what a zero-head layer's replacement returns: LN(x + b) or b.
    config_heads, config_layers, config_hidden : attribute names in the HF config.
    onnx_model_type : ``model_type`` for ONNX Runtime's transformer optimizer.
    ffn_in, ffn_out : paths from a block to the feed-forward projections: ``ffn_in`` (H -> I, the
        intermediate "neurons", followed by the activation) and ``ffn_out`` (I -> H). Neuron n is row
        n of ``ffn_in`` (and its bias) and column n of ``ffn_out``; the *input* of ``ffn_out``,
        (B, S, I), holds the activations, where neuron gates and FFN signatures are taken.
    attention_probs : path from a block to the module whose *output* is the attention probabilities,
        (B, heads, S, S), right before they multiply V (the eager path's attention dropout, an
        identity in eval mode). A forward hook there can read or replace the maps (attention
        attribution, head confidence); ``None`` where no such module exists.
    """

    model_types: tuple[str, ...]
    layers: str
    self_attention: str
    query: str
    key: str
    value: str
    output: str
    attention_block: str
    heads_attr: str
    width_attr: str
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    config_heads: str = "num_attention_heads"
    config_layers: str = "num_hidden_layers"
    config_hidden: str = "hidden_size"
    config_intermediate: str = "intermediate_size"
    onnx_model_type: str = "bert"
    attention_probs: str | None = None
    attention_norm: str | None = None
    onnx_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")


_BERT_LIKE = dict(
    layers="encoder.layer",
    self_attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    output="attention.output.dense",
    attention_block="attention",
    heads_attr="num_attention_heads",
    width_attr="all_head_size",
    attention_norm="attention.output.LayerNorm",
    attention_probs="attention.self.dropout",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(model_types=("bert",), **_BERT_LIKE),  # BERT and MiniLM checkpoints
    ArchSpec(model_types=("roberta", "xlm-roberta"), **_BERT_LIKE, onnx_inputs=("input_ids", "attention_mask")),
    ArchSpec(model_types=("electra",), **_BERT_LIKE),
    ArchSpec(
        model_types=("distilbert",),
        layers="transformer.layer",
        self_attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        attention_block="attention",
        heads_attr="n_heads",
        width_attr="dim",
        config_heads="n_heads",
        config_layers="n_layers",
        config_hidden="dim",
        config_intermediate="hidden_dim",
        attention_probs="attention.dropout",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        onnx_inputs=("input_ids", "attention_mask"),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.model_types)


def spec_for(model_or_config) -> ArchSpec:
    """The :class:`ArchSpec` of a model or config; a :class:`CahpError` naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise CahpError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def get_path(root: nn.Module, path: str) -> nn.Module:
    return functools.reduce(getattr, path.split("."), root)


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, module)


def layers(model: nn.Module) -> nn.ModuleList:
    return get_path(model.base_model, spec_for(model).layers)


def num_layers(config) -> int:
    return int(getattr(config, spec_for(config).config_layers))


def num_heads(config) -> int:
    """Heads per layer of the *dense* architecture."""
    return int(getattr(config, spec_for(config).config_heads))


def hidden_size(config) -> int:
    return int(getattr(config, spec_for(config).config_hidden))


def head_dim(config) -> int:
    return hidden_size(config) // num_heads(config)


def heads_per_layer(model: nn.Module) -> list[int]:
    """Current head count of every layer (after pruning, these differ from the config)."""
    config = model.config
    kept = getattr(config, "cahp_kept_heads", None)
    if kept is not None:
        return [len(k) for k in kept]
    return [num_heads(config)] * num_layers(config)


def output_projection(model: nn.Module, layer: int) -> nn.Linear:
    return get_path(layers(model)[layer], spec_for(model).output)


def intermediate_size(config) -> int:
    """FFN width (neurons per layer) of the *dense* architecture."""
    return int(getattr(config, spec_for(config).config_intermediate))


#: config.json field in which the pruner records kept FFN neurons per layer (original indices).
KEPT_NEURONS_FIELD = "cahp_kept_neurons"


def neurons_per_layer(model: nn.Module) -> list[int]:
    """Current FFN width of every layer (after neuron pruning, these differ from the config)."""
    config = model.config
    kept = getattr(config, KEPT_NEURONS_FIELD, None)
    if kept is not None:
        return [len(k) for k in kept]
    return [intermediate_size(config)] * num_layers(config)


def ffn_output_projection(model: nn.Module, layer: int) -> nn.Linear:
    """Layer ``layer``'s FFN output projection; its input is the (B, S, neurons) activations."""
    return get_path(layers(model)[layer], spec_for(model).ffn_out)


def attention_probs_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is layer ``layer``'s attention probabilities (see ``ArchSpec.attention_probs``).

    Only the eager attention path runs it; SDPA/flash kernels never materialize the maps. Where
    transformers' eager attention does not call it (5.x, ``TransformersRow.probs_via_module``), the
    model is first switched to :data:`ATTENTION_PROBE` (the same math, the module called): a hook
    on the returned module then fires on every version.
    """
    spec = spec_for(model)
    if spec.attention_probs is None:
        raise CahpError(f"{model.config.model_type}: attention maps cannot be intercepted")
    if not attention_probs_supported(model):
        raise CahpError(
            f"attention maps need eager attention, the model uses {model.config._attn_implementation!r}; "
            "load it with attn_implementation='eager'"
        )
    use_attention_probe(model)
    return get_path(layers(model)[layer], spec.attention_probs)


def attention_probs_supported(model: nn.Module) -> bool:
    """Whether the model returns attention probabilities (needs the eager attention path or the probe)."""
    return getattr(model.config, "_attn_implementation", "eager") in ("eager", ATTENTION_PROBE)


# ----------------------------------------------------------------------------- transformers versions


@dataclass(frozen=True)
class TransformersRow:
    """What one transformers major version does with the internals this project relies on.

    Attributes
    ----------
    export_attention : attention implementation the exporters trace: ``"sdpa"`` (where the class
        supports it, else ``"eager"``) or ``"eager"``. Measured with ORT 1.32's transformer optimizer
        on tiny BERT/RoBERTa/DistilBERT/ELECTRA: 4.57's sdpa graphs fuse into ``Attention`` for every
        architecture, its eager DistilBERT graph (``masked_fill``) does not; 5.x's eager graphs fuse
        for all four, its sdpa graphs for none (a constant scale and an ``IsNaN`` guard the
        optimizer does not match).
    probs_via_module : eager attention runs ``ArchSpec.attention_probs`` as a module (4.x:
        ``self.dropout(probs)``); False where it calls ``nn.functional.dropout`` (5.x).
    dtype_kwarg : ``from_pretrained``'s keyword for the weight dtype (``torch_dtype`` was renamed in
        4.56 and warns in 5.x).
    hf_pruned_heads : ``config.pruned_heads`` + ``prune_heads`` exist, so a pruned dir that keeps a
        head in every layer also reloads with plain ``from_pretrained`` (4.x; removed in 5.0, where
        :func:`cahp_deploy.pruning.load_pruned` is the only loader).
    """

    major: int
    export_attention: str
    probs_via_module: bool
    dtype_kwarg: str
    hf_pruned_heads: bool


TRANSFORMERS: dict[int, TransformersRow] = {
    4: TransformersRow(4, export_attention="sdpa", probs_via_module=True, dtype_kwarg="torch_dtype",
                       hf_pruned_heads=True),
    5: TransformersRow(5, export_attention="eager", probs_via_module=False, dtype_kwarg="dtype",
                       hf_pruned_heads=False),
}

#: attention implementation registered with transformers 5.x's ``AttentionInterface``: eager attention
#: whose probabilities go through ``ArchSpec.attention_probs`` as a module, so hooks can read or replace them.
ATTENTION_PROBE = "cahp_eager"


@functools.lru_cache(maxsize=1)
def transformers_row() -> TransformersRow:
    """The :data:`TRANSFORMERS` row of the installed transformers (read from its metadata: no import)."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError as e:
        raise CahpError("transformers is not installed; pip install 'transformers>=4.45,<6'") from e
    major = int(version.split(".")[0])
    if major not in TRANSFORMERS:
        raise CahpError(f"transformers {version} is not supported; supported: "
                        f"{', '.join(f'{m}.x' for m in sorted(TRANSFORMERS))} (pip install 'transformers>=4.45,<6')")
    return TRANSFORMERS[major]


def export_attention(config) -> str:
    """The attention implementation to load a model with for ONNX export (see ``TransformersRow.export_attention``)."""
    if transformers_row().export_attention == "eager":
        return "eager"
    import transformers

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers 5.x's eager attention, with the probabilities passed through the probe module.

    ::

        (B,N,S,d) q ──► q·kᵀ·scaling ──► + mask ──► softmax ──► attention_probs module ──► ·v ──► (B,S,N,d)

    The module is the block's attention dropout (``ArchSpec.attention_probs``): in training it drops
    with the same ``p`` as the functional call it replaces (``dropout`` is ignored), in eval it is
    the identity, so outputs are those of ``eager``.
    """
    import torch

    spec = spec_for(module.config)
    prefix = spec.self_attention + "."
    probs = get_path(module, spec.attention_probs[len(prefix):])
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = probs(torch.nn.functional.softmax(weights, dim=-1))
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


@functools.lru_cache(maxsize=1)
def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_PROBE, _probe_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_PROBE, eager_mask)  # the additive mask eager gets


def maps_attention() -> str:
    """The attention implementation to load a model with when its attention maps are needed:
    ``eager`` where eager attention runs ``ArchSpec.attention_probs``, else :data:`ATTENTION_PROBE`."""
    if transformers_row().probs_via_module:
        return "eager"
    _register_probe()
    return ATTENTION_PROBE


def attentions_per_layer(model: nn.Module, attentions, attention_mask) -> list:
    """``output_attentions``' maps with one entry per layer: an empty (B, 0, S, S) tensor for a layer
    with no head.

    transformers 4.x returns what each block's attention module returns (the zero-head module of
    :mod:`cahp_deploy.pruning.empty_attention` returns the empty tensor); 5.x records the maps with
    hooks on its own self-attention class, so a replaced zero-head layer contributes nothing and the
    tuple is shorter. Either way the result lines up with :func:`heads_per_layer`.
    """
    heads = heads_per_layer(model)
    maps = list(attentions)
    if len(maps) == len(heads):
        return maps
    live = [i for i, h in enumerate(heads) if h > 0]
    if len(maps) != len(live):
        raise CahpError(f"the model returned {len(maps)} attention maps for {len(heads)} layers ({len(live)} with heads)")
    n, s = attention_mask.shape
    out = [attention_mask.new_zeros((n, 0, s, s), dtype=maps[0].dtype) for _ in heads]
    for i, m in zip(live, maps):
        out[i] = m
    return out


def use_attention_probe(model: nn.Module) -> None:
    """Route an eager model's attention through :data:`ATTENTION_PROBE` where the version needs it (idempotent)."""
    name = maps_attention()
    if model.config._attn_implementation == name:
        return
    spec = spec_for(model)
    prefix = spec.self_attention + "."
    if spec.attention_probs is None or not spec.attention_probs.startswith(prefix):
        raise CahpError(f"{model.config.model_type}: the attention-probability module is not inside the attention module")
    model.config._attn_implementation = name


def dense_head_grid(config) -> tuple[int, int]:
    """(layers, heads per layer) of the dense architecture."""
    return num_layers(config), num_heads(config)


#: model types whose position ids start after the padding index (RoBERTa: 514 embeddings, 512 tokens)
POSITION_OFFSET_TYPES: tuple[str, ...] = ("roberta", "xlm-roberta", "camembert")


def max_sequence_length(config) -> int:
    """Longest input (tokens, special ones included) the position table allows.

    Feeding more crashes the embedding lookup, so every internally chosen length is clamped to this.
    RoBERTa-family position ids start at ``pad_token_id + 1``, so that many fewer are usable.
    ``config`` is a HF config or a ``config.json`` dict.
    """
    def get(key: str):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    n = int(get("max_position_embeddings") or 512)
    if get("model_type") in POSITION_OFFSET_TYPES:
        pad = get("pad_token_id")
        n -= (1 if pad is None else int(pad)) + 1  # HF's RoBERTa pad id is 1
    return n


def clamp_shapes(shapes, max_seq: int) -> tuple[tuple[int, int], ...]:
    """(batch, seq) shapes with every seq capped at ``max_seq`` (default shapes assume 128+ positions)."""
    return tuple((int(b), min(int(s), int(max_seq))) for b, s in shapes)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "SUPPORTED_MODEL_TYPES",
    "dense_head_grid",
    "get_path",
    "head_dim",
    "heads_per_layer",
    "intermediate_size",
    "neurons_per_layer",
    "ffn_output_projection",
    "KEPT_NEURONS_FIELD",
    "hidden_size",
    "layers",
    "max_sequence_length",
    "clamp_shapes",
    "POSITION_OFFSET_TYPES",
    "num_heads",
    "num_layers",
    "output_projection",
    "set_path",
    "spec_for",
    "attention_probs_supported",
    "attention_probs_module",
    "ATTENTION_PROBE",
    "attentions_per_layer",
    "TRANSFORMERS",
    "TransformersRow",
    "export_attention",
    "maps_attention",
    "transformers_row",
    "use_attention_probe",
]
