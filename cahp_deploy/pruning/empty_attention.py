"""What a layer with zero kept heads computes in place of its attention sub-block.

With every head gated off, the context entering the output projection is all zeros, so the output
projection yields its bias ``b`` alone. The dense model then continues with residual + LayerNorm::

    BERT-like block:   attention(x) = LN(x + dropout(b))          (LN lives inside the attention block)
    DistilBERT block:  attention(x) = b   ->  block does sa_layer_norm(b + x)

These modules compute exactly that with plain tensor ops: no Q/K/V, no softmax, no reshape of an
empty head axis (which crashes transformers' own ``prune_heads``), no data-dependent branching, so
``torch.onnx`` / Optimum export them as an Add (+ LayerNorm).

Both accept the keyword arguments their Hugging Face counterparts receive and return
``(output, weights_or_None)``: what transformers 5.x's blocks unpack from every attention module, and
what 4.x's take too (DistilBERT 4.x reads ``[0]`` when it did not ask for weights). Attention weights,
when asked for (4.x's ``output_attentions``), are an empty (B, 0, S, S) tensor: the layer has no heads,
and callers that stack per-layer attentions still get the right rank.
"""

from __future__ import annotations

import torch
from torch import nn


def _no_heads_weights(x: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    return x.new_zeros((b, 0, s, s))


class EmptyAttentionWithNorm(nn.Module):
    """BERT-like zero-head attention block: ``LayerNorm(x + dropout(b_out))``.

    ``bias`` is the output projection's bias; ``LayerNorm`` is the block's own post-attention norm
    (same parameters, moved here), so the trained statistics are kept.
    """

    def __init__(self, bias: torch.Tensor, norm: nn.Module, dropout_p: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = norm
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, hidden_states: torch.Tensor, *args, output_attentions: bool = False, **kwargs):
        # Training: drop per element, as the dense model drops its (B, S, H) projection output.
        # Eval: a broadcast Add, which ORT fuses with the LayerNorm.
        bias = self.dropout(self.bias.expand_as(hidden_states)) if self.training else self.bias
        out = self.LayerNorm(hidden_states + bias)
        return out, (_no_heads_weights(hidden_states) if output_attentions else None)


class EmptyAttention(nn.Module):
    """DistilBERT-like zero-head attention: returns the output projection's bias for every token."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, query: torch.Tensor, *args, output_attentions: bool = False, **kwargs):
        out = self.bias.expand_as(query)
        return out, (_no_heads_weights(query) if output_attentions else None)
