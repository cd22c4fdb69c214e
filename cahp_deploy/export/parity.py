"""Parity: does each ONNX variant compute what the PyTorch model computes?

Inputs: random token ids at several (batch, sequence) shapes, rows padded to different lengths
(padding is where masks go wrong), and, when labelled data is given, its tokenized examples (the
distribution that matters). The reference is always the PyTorch model's fp32 logits.

Gates (a failure aborts the export; nothing is written):

* ``fp32`` and ``optimized``: max |logit diff| <= :data:`FP32_ATOL` and identical argmax.
* ``int8``: by default the paired accuracy drop vs fp32 on the data split, within 0.5 points at its
  90 % upper bound (:mod:`cahp_deploy.export.int8.gate`); or argmax agreement >=
  :data:`INT8_MIN_AGREEMENT` when asked. Without data the agreement on random tokens is recorded
  (``on: random_tokens``) and gated at the looser :data:`INT8_MIN_AGREEMENT_RANDOM`: random text has
  many near-ties that real text does not.
* ``fp16``: max |logit diff| <= :data:`FP16_ATOL` and identical argmax wherever the fp32 top-2
  margin exceeds ``2 * FP16_ATOL`` (closer calls may legitimately flip at half precision).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cahp_deploy.arch import max_sequence_length
from cahp_deploy.onnx_runtime import Feed, compare
from cahp_deploy.onnx_runtime import logits as ort_logits

if TYPE_CHECKING:  # torch is only needed for the reference logits; verify() runs without it
    from torch import nn

FP32_ATOL = 1e-4
FP16_ATOL = 1e-2
INT8_MIN_AGREEMENT = 0.99
INT8_MIN_AGREEMENT_RANDOM = 0.90
#: at most this many data examples per parity run (recorded as num_examples). They are also the INT8
#: accuracy gate's rows, whose power grows with them: at a zero drop, a 0.5-point bound at 90 % allows
#: about 18 rows where fp32 and INT8 disagree on correctness in 1,101 rows, about 380 in 5,000.
MAX_DATA_EXAMPLES = 5000
#: (batch, sequence) shapes of the random parity inputs; sequences are capped by the model's positions
RANDOM_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (2, 16), (3, 37), (4, 64))

def max_sequence(config) -> int:
    """Longest sequence the position table allows (see :func:`cahp_deploy.arch.max_sequence_length`)."""
    return max_sequence_length(config)


def random_feeds(input_names: Sequence[str], config, seed: int = 0,
                 shapes: Sequence[tuple[int, int]] = RANDOM_SHAPES) -> list[Feed]:
    """Random ids; row r of a batch keeps ``seq - r * seq // (batch + 1)`` tokens, the rest is padding."""
    rng = np.random.default_rng(seed)
    vocab = int(getattr(config, "vocab_size", 1000))
    pad = int(getattr(config, "pad_token_id", 0) or 0)
    two_types = int(getattr(config, "type_vocab_size", 1) or 1) >= 2
    limit = max_sequence(config)
    feeds = []
    for batch, seq in shapes:
        seq = min(seq, limit)
        ids = rng.integers(min(5, vocab - 1), vocab, (batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        types = np.zeros((batch, seq), dtype=np.int64)
        for r in range(batch):
            keep = max(1, seq - r * seq // (batch + 1))
            ids[r, keep:], mask[r, keep:] = pad, 0
            if two_types and keep > 2:
                types[r, keep // 2 : keep] = 1  # a second segment, as sentence pairs have
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds.append({k: v for k, v in feed.items() if k in input_names})
    return feeds


def data_feeds(tokenizer, data, input_names: Sequence[str], config, batch_size: int = 32,
               limit: int | None = MAX_DATA_EXAMPLES, max_length: int | None = None) -> tuple[list[Feed], np.ndarray]:
    """Tokenized batches of ``data`` (first ``limit`` rows, length-bucketed) and their labels, in feed order,
    each row cut at ``max_length`` (the length the artifact serves; None: its default)."""
    from cahp_deploy.data import iter_batches
    from cahp_deploy.serving_length import default_serving_length

    rows = data.head(limit)
    feeds, labels = [], []
    max_length = default_serving_length(config) if max_length is None else int(max_length)
    for _idx, enc, y in iter_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length, return_tensors="np"):
        feeds.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in input_names})
        labels.append(np.asarray(y))
    return feeds, np.concatenate(labels)


def torch_logits(model: nn.Module, feeds: Iterable[Feed]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = [model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.float().numpy() for f in feeds]
    return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())
