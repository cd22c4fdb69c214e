"""Accuracy on the labelled split, computed with ONNX Runtime on the very file that was timed.

PyTorch accuracy of the pruned model says nothing about the INT8 file a server will load;
quantization and graph rewrites change predictions. So every (artifact, variant) predicts the split
through its own session, and agreement with the baseline's predictions shows how many answers
changed, which a plain accuracy delta hides (two errors can cancel out).
"""

from __future__ import annotations

import numpy as np

from cahp_deploy.bench.inputs import Feed
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.onnx_runtime import feed, input_dtypes


#: rows per batch when ONNX graphs are scored (a dynamic-INT8 graph's labels depend on it: its input scales are per batch)
SCORING_BATCH = 32


def encode(tokenizer, data: LabelledData, max_length: int, batch_size: int = SCORING_BATCH,
           bucket: bool = True) -> list[tuple[np.ndarray, Feed]]:
    """Length-bucketed batches (little padding, so this is fast; ``bucket=False``: in the data's order) with the
    row indices of each."""
    out = []
    for idx, enc, _ in iter_batches(tokenizer, data, batch_size=batch_size, max_length=max_length, bucket=bucket,
                                    return_tensors="np"):
        arrays = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
        b, s = arrays["input_ids"].shape
        arrays.setdefault("token_type_ids", np.zeros((b, s), dtype=np.int64))
        out.append((np.asarray(idx), Feed(arrays, num_sequences=b, padded_length=s, real_tokens=0)))
    return out


def predict(session, batches: list[tuple[np.ndarray, Feed]], num_examples: int) -> np.ndarray:
    """Predicted class id of every row, in the split's order."""
    dtypes = input_dtypes(session)
    output = session.get_outputs()[0].name
    preds = np.full(num_examples, -1, dtype=np.int64)
    for idx, batch in batches:
        logits = session.run([output], feed(dtypes, batch.arrays))[0]
        preds[idx] = np.asarray(logits, dtype=np.float32).argmax(axis=-1)
    return preds


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def agreement(preds: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows on which two models predict the same class."""
    return float(np.mean(preds == reference))
