"""The offline demonstration: a labelled sample set shipped in the package and a short fine-tune.

``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` here are short review-style sentences written for
this project by :mod:`cahp_deploy.demo.make_data` (binary sentiment, 0 negative, 1 positive). They are a
demonstration set, small on purpose, not a benchmark.
"""

from __future__ import annotations

from pathlib import Path


def data_dir() -> Path:
    """The directory of the packaged demo splits (usable as ``--data``)."""
    return Path(__file__).resolve().parent


__all__ = ["data_dir"]
