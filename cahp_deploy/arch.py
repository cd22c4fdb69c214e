"""The architecture table: where each supported encoder keeps its layers, heads and projections.

Every stage (signals, gates, pruning, export) reaches into a model only through :func:`spec_for`.
Adding an architecture is one :class:`ArchSpec` entry here plus a tiny-model row in
``tests/conftest.py``. No other module may mention ``bert`` or ``distilbert`` attribute paths.

Paths are dotted attribute paths. ``layers`` is relative to ``model.base_model``; every other path is
relative to one layer (one Transformer block).

transformers v5 note: the paths below are the 4.x module names. v5 keeps the module names for these
encoders but drops ``head_mask``/``prune_heads``; nothing here relies on either.
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
    ArchSpec(model_types=("roberta", "xlm-roberta"), **_BERT_LIKE),
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

    Only the eager attention path runs it; SDPA/flash kernels never materialize the maps.
    """
    spec = spec_for(model)
    if spec.attention_probs is None:
        raise CahpError(f"{model.config.model_type}: attention maps cannot be intercepted")
    if not attention_probs_supported(model):
        raise CahpError(
            f"attention maps need eager attention, the model uses {model.config._attn_implementation!r}; "
            "load it with attn_implementation='eager'"
        )
    return get_path(layers(model)[layer], spec.attention_probs)


def attention_probs_supported(model: nn.Module) -> bool:
    """Whether the model returns attention probabilities (needs the eager attention path)."""
    return getattr(model.config, "_attn_implementation", "eager") == "eager"


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
]
