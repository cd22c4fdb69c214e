"""Parameter and multiply-accumulate (MAC) accounting for a head layout, before and after pruning.

MACs are per sequence of ``seq_len`` tokens (128 in pruning.json), counted over the encoder
layers' matrix products only; embeddings (lookups), the pooler and the classifier (once per
sequence, unchanged by pruning) are left out, so ``flop_ceiling_speedup`` is an upper bound for
what removing heads and neurons can buy. Per layer with h kept heads of size d, hidden H, n kept FFN
neurons (I when the FFN is not pruned), S tokens::

    attention = 4·S·H·(h·d)        Q, K, V (H -> h·d) and output (h·d -> H) projections
              + 2·h·S·S·d          scores QKᵀ and context softmax·V
    ffn       = 2·S·H·n            FFN in (H -> n) and out (n -> H)

A layer pruned to no neuron keeps one inert unit (see ``pruning.rewrite``); it is counted as 1.

Softmax, LayerNorm, GELU and bias adds are elementwise, O(S·H), and ignored.
"""

from __future__ import annotations

from typing import Any

from cahp_deploy import arch

SEQ_LEN = 128


intermediate_size = arch.intermediate_size


def layer_macs(heads: int, head_dim: int, hidden: int, intermediate: int, seq_len: int = SEQ_LEN) -> tuple[int, int]:
    """(attention MACs, feed-forward MACs) of one layer keeping ``heads`` heads and ``intermediate`` neurons."""
    width = heads * head_dim
    attention = 4 * seq_len * hidden * width + 2 * heads * seq_len * seq_len * head_dim
    ffn = 2 * seq_len * hidden * intermediate
    return attention, ffn


def _neuron_widths(config, n_layers: int, neurons_per_layer: list[int] | None) -> list[int]:
    if neurons_per_layer is None:
        return [intermediate_size(config)] * n_layers
    return [max(int(n), 1) for n in neurons_per_layer]  # an emptied FFN keeps one inert unit


def per_layer_macs(config, heads_per_layer: list[int], neurons_per_layer: list[int] | None = None,
                   seq_len: int = SEQ_LEN) -> list[tuple[int, int]]:
    """Per layer, (attention MACs, FFN MACs) for one sequence of ``seq_len`` tokens."""
    d, hidden = arch.head_dim(config), arch.hidden_size(config)
    widths = _neuron_widths(config, len(heads_per_layer), neurons_per_layer)
    return [layer_macs(h, d, hidden, n, seq_len) for h, n in zip(heads_per_layer, widths, strict=True)]


def macs_per_sequence(config, heads_per_layer: list[int], seq_len: int = SEQ_LEN,
                      neurons_per_layer: list[int] | None = None) -> dict[str, int]:
    """{"attention", "ffn", "total"} MACs of the encoder for one sequence of ``seq_len`` tokens."""
    layers = per_layer_macs(config, heads_per_layer, neurons_per_layer, seq_len)
    att = sum(a for a, _ in layers)
    ffn = sum(f for _, f in layers)
    return {"attention": att, "ffn": ffn, "total": att + ffn}


def params_removed(config, kept_heads: list[list[int]]) -> int:
    """Parameters that pruning removes: per removed head, d·(4H + 3) (Q/K/V rows + biases, O columns).

    The output projection's bias stays (a zero-head layer still adds it), so it is not counted.
    """
    n_layers, dense = arch.dense_head_grid(config)
    d, hidden = arch.head_dim(config), arch.hidden_size(config)
    removed_heads = n_layers * dense - sum(len(k) for k in kept_heads)
    return removed_heads * d * (4 * hidden + 3)


def layer_parameters(model) -> list[dict[str, int]]:
    """Per layer, parameters of the attention sub-block and of the FFN projections (counted on the model)."""
    spec = arch.spec_for(model)
    out = []
    for block in arch.layers(model):
        att = sum(p.numel() for p in arch.get_path(block, spec.attention_block).parameters())
        ffn = sum(p.numel() for path in (spec.ffn_in, spec.ffn_out)
                  for p in arch.get_path(block, path).parameters())
        out.append({"attention": int(att), "ffn": int(ffn)})
    return out


def pruning_costs(config, kept_heads: list[list[int]], params_before: int, params_after: int,
                  seq_len: int = SEQ_LEN, kept_neurons: list[list[int]] | None = None,
                  layer_params: dict[str, list[dict[str, int]]] | None = None) -> dict[str, Any]:
    """The accounting fields of pruning.json (see DESIGN.md, "pruned model dir").

    ``layer_params`` ({"before": [...], "after": [...]}, from :func:`layer_parameters`) adds the
    per-layer parameter split.
    """
    n_layers, dense = arch.dense_head_grid(config)
    heads_after = [len(k) for k in kept_heads]
    neurons_after = None if kept_neurons is None else [len(k) for k in kept_neurons]
    before = macs_per_sequence(config, [dense] * n_layers, seq_len)
    after = macs_per_sequence(config, heads_after, seq_len, neurons_after)
    layer_before = per_layer_macs(config, [dense] * n_layers, None, seq_len)
    layer_after = per_layer_macs(config, heads_after, neurons_after, seq_len)
    per_layer = []
    for i in range(n_layers):
        row: dict[str, Any] = {
            "layer": i,
            "heads": heads_after[i],
            "neurons": intermediate_size(config) if neurons_after is None else neurons_after[i],
            f"macs_seq{seq_len}": {"attention_before": layer_before[i][0], "attention_after": layer_after[i][0],
                                   "ffn_before": layer_before[i][1], "ffn_after": layer_after[i][1]},
        }
        if layer_params is not None:
            row["params"] = {f"{part}_{when}": layer_params[when][i][part]
                             for when in ("before", "after") for part in ("attention", "ffn")}
        per_layer.append(row)
    return {
        "params_before": int(params_before),
        "params_after": int(params_after),
        f"macs_seq{seq_len}": {
            "attention_before": before["attention"],
            "attention_after": after["attention"],
            "ffn_before": before["ffn"],
            "ffn_after": after["ffn"],
            "total_before": before["total"],
            "total_after": after["total"],
        },
        "flop_ceiling_speedup": before["total"] / after["total"],
        "per_layer": per_layer,
    }
