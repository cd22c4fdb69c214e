"""What the sessions are fed: a fixed (batch x seq) grid, or "real traffic" batches from the data.

The grid answers "how long does a full batch of N sequences of length S take" and is what speedups
are quoted on. Real traffic answers "what does my data cost": batches drawn at random from the split
(shuffled with a fixed seed, not length-bucketed) and padded only to each batch's longest sequence,
so the length distribution of the data, short sentences and long pairs alike, is what is timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cahp_deploy import arch
from cahp_deploy.data import LabelledData, iter_batches


@dataclass
class Feed:
    """One batch, as numpy arrays keyed by input name (every name any session might take)."""

    arrays: dict[str, np.ndarray]
    num_sequences: int
    padded_length: int
    real_tokens: int


def max_sequence_length(config: dict) -> int:
    """Longest input (in tokens, special tokens included) the model's position table allows."""
    return arch.max_sequence_length(config)


def grid_feed(batch: int, seq: int, vocab_size: int, seed: int = 0) -> Feed:
    """A full (batch, seq) batch: random token ids, no padding. Ids do not change the compute."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, max(2, vocab_size), size=(batch, seq), dtype=np.int64)
    arrays = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }
    return Feed(arrays, num_sequences=batch, padded_length=seq, real_tokens=batch * seq)


def traffic_feeds(
    tokenizer,
    data: LabelledData,
    batch_size: int,
    max_length: int,
    num_sequences: int,
    seed: int = 0,
) -> list[Feed]:
    """Batches of ``batch_size`` drawn without replacement from ``data`` (at most ``num_sequences``)."""
    order = np.random.default_rng(seed).permutation(len(data))[: max(1, num_sequences)]
    sample = data.subset(order)
    feeds = []
    for _, enc, _ in iter_batches(tokenizer, sample, batch_size=batch_size, max_length=max_length, bucket=False, return_tensors="np"):
        arrays = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
        mask = arrays.get("attention_mask")
        b, s = arrays["input_ids"].shape
        real = int(mask.sum()) if mask is not None else b * s
        if "token_type_ids" not in arrays:
            arrays["token_type_ids"] = np.zeros((b, s), dtype=np.int64)
        feeds.append(Feed(arrays, num_sequences=b, padded_length=s, real_tokens=real))
    return feeds
