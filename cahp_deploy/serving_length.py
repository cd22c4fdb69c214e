"""The one max length of a run: the length the artifact serves, chosen once and used by every stage.

A promise measured at 128 tokens describes a model that never sees the rest of a longer row; the
deployed artifact reads up to its own max length. So `run` chooses one length before any stage starts
(``--max-length``, or the longest row of its data in tokens, capped at the model's positions), and
selection, recovery, the budget search, export's INT8 gate, the shipping decision, the confirmation and
bench's accuracy all score at it; the manifest records it as ``max_length`` and ``predict`` and the
handoff serve at it. Bench's *timing* shapes are separate (``--seq``): they measure speed, not accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cahp_deploy.arch import max_sequence_length
from cahp_deploy.errors import CahpError

#: the length an artifact made outside `run` serves, when the model allows it (BERT's 512 positions)
DEFAULT_SERVING_LENGTH = 512


def check_max_length(max_length: int | None, config, flag: str = "--max-length") -> int | None:
    """``max_length`` when it fits the model's position table; a one-line error otherwise."""
    if max_length is None:
        return None
    limit = max_sequence_length(config)
    if not 2 <= int(max_length) <= limit:
        raise CahpError(f"{flag} {max_length} must be between 2 and the model's {limit} positions "
                        "(max_position_embeddings)")
    return int(max_length)


def default_serving_length(config) -> int:
    """What an artifact serves when nothing chose a length: :data:`DEFAULT_SERVING_LENGTH`, capped at the positions."""
    return min(DEFAULT_SERVING_LENGTH, max_sequence_length(config))


def of_manifest(manifest: dict, config) -> int:
    """The length an exported artifact serves: its manifest's ``max_length`` (what `run` chose and measured
    its promise at), else :func:`default_serving_length` of its config (``config.json`` dict or HF config)."""
    return int(manifest.get("max_length") or default_serving_length(config))


def _lengths(tokenizer, data, cap: int) -> np.ndarray:
    """Tokens per row (special tokens included), counted up to ``cap``."""
    from cahp_deploy.data import token_lengths

    return np.asarray(token_lengths(tokenizer, data, cap), dtype=np.int64)


def resolve_max_length(tokenizer, config, datasets: list[Any], asked: int | None = None) -> dict[str, Any]:
    """The run's max length and how it was chosen.

    ``asked`` (``--max-length``) when given (checked against the positions); otherwise the longest row
    of ``datasets`` in tokens, capped at the positions. Per split, the rows longer than the chosen
    length (truncated everywhere alike) are counted: the summary reports them.
    """
    limit = max_sequence_length(config)
    check_max_length(asked, config)
    lengths = {d.split: _lengths(tokenizer, d, limit + 1) for d in datasets if d is not None and len(d)}
    longest = max((int(v.max()) for v in lengths.values()), default=2)
    chosen = int(asked) if asked is not None else max(2, min(longest, limit))
    return {
        "max_length": chosen,
        "how": "--max-length" if asked is not None else
        ("the longest row of the data" if longest <= limit else "the model's positions (rows are longer)"),
        "positions": limit,
        "longest_row_tokens": longest if longest <= limit else f"> {limit}",
        "rows_longer": {split: int((v > chosen).sum()) for split, v in lengths.items()},
    }


def words(record: dict[str, Any]) -> str:
    """One line for the log and the summary."""
    longer = {s: n for s, n in record["rows_longer"].items() if n}
    tail = ("; rows longer than that are truncated: " + ", ".join(f"{n} of {s}" for s, n in longer.items())) \
        if longer else "; no row is longer"
    return f"max length {record['max_length']} tokens ({record['how']}){tail}"


__all__ = ["DEFAULT_SERVING_LENGTH", "check_max_length", "default_serving_length", "of_manifest", "resolve_max_length",
           "words"]
