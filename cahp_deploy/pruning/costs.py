"""Parameter and multiply-accumulate (MAC) accounting for a head layout, before and after pruning.

MACs are per sequence of ``seq_len`` tokens (128 in pruning.json), counted over the encoder
layers' matrix products only; embeddings (lookups), the pooler and the classifier (once per
sequence, unchanged by pruning) are left out, so ``flop_ceiling_speedup`` is an upper bound for
what removing heads can buy. Per layer with h kept heads of size d, hidden H, feed-forward I, S tokens::

    attention = 4·S·H·(h·d)        Q, K, V (H -> h·d) and output (h·d -> H) projections
              + 2·h·S·S·d          scores QKᵀ and context softmax·V
    ffn       = 2·S·H·I            (independent of heads)

Softmax, LayerNorm, GELU and bias adds are elementwise, O(S·H), and ignored.
"""

from __future__ import annotations

from typing import Any

from cahp_deploy import arch

SEQ_LEN = 128


def intermediate_size(config) -> int:
    return int(getattr(config, arch.spec_for(config).config_intermediate))


def layer_macs(heads: int, head_dim: int, hidden: int, intermediate: int, seq_len: int = SEQ_LEN) -> tuple[int, int]:
    """(attention MACs, feed-forward MACs) of one layer keeping ``heads`` heads."""
    width = heads * head_dim
    attention = 4 * seq_len * hidden * width + 2 * heads * seq_len * seq_len * head_dim
    ffn = 2 * seq_len * hidden * intermediate
    return attention, ffn


def macs_per_sequence(config, heads_per_layer: list[int], seq_len: int = SEQ_LEN) -> dict[str, int]:
    """{"attention", "ffn", "total"} MACs of the encoder for one sequence of ``seq_len`` tokens."""
    d, hidden, inter = arch.head_dim(config), arch.hidden_size(config), intermediate_size(config)
    att = ffn = 0
    for h in heads_per_layer:
        a, f = layer_macs(h, d, hidden, inter, seq_len)
        att += a
        ffn += f
    return {"attention": att, "ffn": ffn, "total": att + ffn}


def params_removed(config, kept_heads: list[list[int]]) -> int:
    """Parameters that pruning removes: per removed head, d·(4H + 3) (Q/K/V rows + biases, O columns).

    The output projection's bias stays (a zero-head layer still adds it), so it is not counted.
    """
    n_layers, dense = arch.dense_head_grid(config)
    d, hidden = arch.head_dim(config), arch.hidden_size(config)
    removed_heads = n_layers * dense - sum(len(k) for k in kept_heads)
    return removed_heads * d * (4 * hidden + 3)


def pruning_costs(config, kept_heads: list[list[int]], params_before: int, params_after: int,
                  seq_len: int = SEQ_LEN) -> dict[str, Any]:
    """The accounting fields of pruning.json (see DESIGN.md, "pruned model dir")."""
    n_layers, dense = arch.dense_head_grid(config)
    before = macs_per_sequence(config, [dense] * n_layers, seq_len)
    after = macs_per_sequence(config, [len(k) for k in kept_heads], seq_len)
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
    }
