"""Labelled data: loading, validation and length-bucketed batches.

Accepted sources (``--data``):

* a directory of split files, ``<split>.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` (split = file stem);
* a directory written by ``datasets.Dataset(Dict).save_to_disk``;
* a single data file (then ``--split`` is ignored: the file is the split);
* a Hugging Face hub dataset id (needs network; nothing is downloaded here).

Every problem the user can fix is raised here as a :class:`CahpError`, before any model work starts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_file

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Pair tasks are recognised by these column names when --text-column is not given.
_PAIR_COLUMNS = (("premise", "hypothesis"), ("sentence1", "sentence2"), ("question", "sentence"))


@dataclass
class LabelledData:
    """One split of labelled text: what every stage consumes.

    ``pairs`` is None for single-sentence tasks. ``labels`` is an int64 array.
    """

    texts: list[str]
    labels: np.ndarray
    pairs: list[str] | None = None
    source: str = ""
    split: str = ""
    file_hashes: dict[str, str] = field(default_factory=dict)
    text_column: str = "text"
    text_pair_column: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def subset(self, indices) -> LabelledData:
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledData(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
            source=self.source,
            split=self.split,
            file_hashes=self.file_hashes,
            text_column=self.text_column,
            text_pair_column=self.text_pair_column,
        )

    def head(self, n: int | None) -> LabelledData:
        """The first ``n`` rows (all when ``n`` is None)."""
        return self if n is None or n >= len(self) else self.subset(range(n))

    def provenance(self) -> dict:
        return {
            "data": self.source,
            "split": self.split,
            "num_examples": len(self),
            "data_hashes": self.file_hashes,
            "text_column": self.text_column,
            "text_pair_column": self.text_pair_column,
        }


def _split_files(directory: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.iterdir()) if p.suffix in _FILE_BUILDERS}


def _looks_like_path(data: str) -> bool:
    return os.sep in data or data.startswith(".") or Path(data).suffix in _FILE_BUILDERS


def _csv_has_rows(path: Path) -> bool:
    """Whether a CSV has a data row after its header (blank lines skipped, as the CSV builder does)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = (r for r in csv.reader(f) if r)
        next(rows, None)  # the header
        return next(rows, None) is not None


def _parquet_has_rows(path: Path) -> bool:
    """Whether the parquet footer counts any rows; an unreadable file is left to the loader to report."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows > 0
    except Exception:  # noqa: BLE001 - not ours to diagnose here
        return True


def _has_rows(path: Path) -> bool:
    """False for a blank file, a header-only CSV or a zero-row parquet (JSON ``[]`` is caught on load)."""
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip():
            return False
    by_format = {".csv": _csv_has_rows, ".parquet": _parquet_has_rows}
    return by_format[path.suffix](path) if path.suffix in by_format else True


def _no_rows(path: Path, split: str) -> CahpError:
    return CahpError(f"split {split!r} ({path}) is empty: it has no rows")


def _load_file(path: Path, split: str):
    """One split file as a ``datasets.Dataset``.

    Zero-row files make ``datasets`` fail deep inside with raw errors (blank JSON: StopIteration,
    header-only CSV or ``[]``: "Instruction 'train' corresponds to no data", empty parquet:
    ArrowInvalid), so they are caught first and named.
    """
    import datasets

    if not _has_rows(path):
        raise _no_rows(path, split)
    try:
        return datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except ValueError as e:  # zero rows the checks above cannot see (a JSON ``[]``)
        if "corresponds to no data" in str(e):
            raise _no_rows(path, split) from e
        raise


def _load_table(data: str, split: str):
    """Return (datasets.Dataset, the split's name, {file: sha256})."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(data)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise CahpError(f"data file {path} has an unknown format; use .jsonl, .csv or .parquet")
        return _load_file(path, path.stem), path.stem, {path.name: sha256_file(path)}
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise CahpError(
                        f"split {split!r} not in {path}; available: {', '.join(loaded.keys())}"
                    )
                loaded = loaded[split]
            hashes = {p.name: sha256_file(p) for p in sorted(path.rglob("*.arrow"))}
            return loaded, split, hashes
        files = _split_files(path)
        if not files:
            raise CahpError(f"no .jsonl, .csv or .parquet split files in data directory {path}")
        if split not in files:
            raise CahpError(f"split {split!r} not in {path}; available: {', '.join(files)}")
        f = files[split]
        return _load_file(f, split), split, {f.name: sha256_file(f)}
    if _looks_like_path(data):
        raise CahpError(f"data path {data} does not exist")
    try:  # a hub dataset id
        ds = datasets.load_dataset(data, split=split)
    except Exception as e:  # network, unknown id, unknown split: all the user's to fix
        raise CahpError(f"cannot load dataset {data!r} split {split!r} from the hub: {e}".splitlines()[0]) from e
    return ds, split, {}


def _pick_columns(columns: list[str], text_column: str | None, text_pair_column: str | None):
    if text_column is None:
        for a, b in _PAIR_COLUMNS:
            if a in columns and b in columns:
                return a, b
        text_column = "text"
    return text_column, text_pair_column


def load_labelled(
    data: str | os.PathLike,
    split: str = "train",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
) -> LabelledData:
    """Load one labelled split and check it is usable (columns present, not empty, integer labels)."""
    data = str(data)
    ds, split_name, hashes = _load_table(data, split)
    columns = list(ds.column_names)
    text_column, text_pair_column = _pick_columns(columns, text_column, text_pair_column)
    for col in (text_column, text_pair_column, label_column):
        if col is not None and col not in columns:
            raise CahpError(
                f"column {col!r} not found in {data} [{split_name}]; columns: {', '.join(columns)} "
                "(choose with --text-column / --text-pair-column)"
            )
    if len(ds) == 0:
        raise CahpError(f"split {split_name!r} of {data} is empty")
    try:
        labels = np.asarray(ds[label_column], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise CahpError(f"labels in column {label_column!r} of {data} must be integer class ids") from e
    texts = [str(t) for t in ds[text_column]]
    pairs = [str(t) for t in ds[text_pair_column]] if text_pair_column else None
    return LabelledData(
        texts=texts,
        labels=labels,
        pairs=pairs,
        source=data,
        split=split_name,
        file_hashes=hashes,
        text_column=text_column,
        text_pair_column=text_pair_column,
    )


def check_labels(data: LabelledData, num_labels: int, min_classes: int = 1) -> None:
    """Labels must be model label ids; ``min_classes`` >= 2 for anything that compares classes."""
    bad = data.labels[(data.labels < 0) | (data.labels >= num_labels)]
    if bad.size:
        raise CahpError(
            f"labels outside the model's {num_labels} labels (0..{num_labels - 1}) in "
            f"{data.source} [{data.split}]: {sorted(set(bad.tolist()))[:5]}"
        )
    n = len(data.classes)
    if n < min_classes:
        raise CahpError(
            f"{data.source} [{data.split}] has {n} class(es); at least {min_classes} are needed"
        )


def bucket_order(lengths: np.ndarray) -> np.ndarray:
    """Indices sorted by length (stable), so each batch pads to a similar length."""
    return np.argsort(lengths, kind="stable")


def token_lengths(tokenizer, data: LabelledData, max_length: int) -> np.ndarray:
    enc = tokenizer(
        data.texts, data.pairs, truncation=True, max_length=max_length, add_special_tokens=True
    )
    return np.asarray([len(ids) for ids in enc["input_ids"]], dtype=np.int64)


def iter_batches(
    tokenizer,
    data: LabelledData,
    batch_size: int = 32,
    max_length: int = 128,
    bucket: bool = True,
    return_tensors: str = "pt",
) -> Iterator[tuple[np.ndarray, dict, np.ndarray]]:
    """Yield ``(indices, encoding, labels)`` with dynamic padding to each batch's longest example.

    With ``bucket`` the examples are visited in length order (indices say which rows they are),
    which keeps padding, and so wasted compute, small.
    """
    if bucket:
        order = bucket_order(token_lengths(tokenizer, data, max_length))
    else:
        order = np.arange(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = [data.texts[i] for i in idx]
        pairs = None if data.pairs is None else [data.pairs[i] for i in idx]
        enc = tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors=return_tensors,
        )
        yield idx, dict(enc), data.labels[idx]
