"""Labelled data: loading, validation and length-bucketed batches.

Accepted sources (``--data``):

* a directory of split files, ``<split>.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` (split = file stem);
* a directory written by ``datasets.Dataset(Dict).save_to_disk``;
* a single data file (then ``--split`` is ignored: the file is the split);
* a Hugging Face hub dataset id (needs network; nothing is downloaded here).

Files are UTF-8, with or without a byte-order mark (as Excel and Windows tools write them).

Every problem the user can fix is raised here as a :class:`CahpError`, before any model work starts:
an empty or unreadable file (naming it, and for JSON the line that does not parse), a missing column,
a null text, a label that is not an integer class id.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import logging
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
_FORMAT_NAMES = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "parquet"}


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
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        rows = (r for r in csv.reader(f) if r)
        next(rows, None)  # the header
        return next(rows, None) is not None


def _parquet_has_rows(path: Path) -> bool:
    """Whether the parquet footer counts any rows; a file without a readable footer (random bytes, a
    truncated download) is named here, as ``datasets`` would let pyarrow's ArrowInvalid escape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows > 0
    except (pa.ArrowException, OSError) as e:
        raise CahpError(f"data file {path} is not a readable parquet file: {_first_line(e)}") from e


def _has_rows(path: Path) -> bool:
    """False for a blank file, a header-only CSV or a zero-row parquet (JSON ``[]`` is caught on load)."""
    with open(path, "rb") as f:
        if not f.read(1 << 16).removeprefix(codecs.BOM_UTF8).strip():
            return False
    by_format = {".csv": _csv_has_rows, ".parquet": _parquet_has_rows}
    return by_format[path.suffix](path) if path.suffix in by_format else True


def _no_rows(path: Path, split: str) -> CahpError:
    return CahpError(f"split {split!r} ({path}) is empty: it has no rows")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_syntax_error(path: Path) -> str | None:
    """Where a JSON or JSON Lines file stops parsing (``"line 3: Expecting ':' delimiter"``), or None.

    Only called after a load failed, so reading the whole file costs nothing on the good path. A file
    that parses as one JSON document is judged whole; otherwise line by line, as JSON Lines.
    """
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # a JSON array: the document's own position is the answer
            return f"line {e.lineno}: {e.msg}"
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {lineno}: {e.msg}"
    return None


def _unreadable(path: Path, e: BaseException) -> CahpError:
    """The one-line reason ``datasets`` could not read a split file (its own error says only
    "An error occurred while generating the dataset"; the reader's error is its ``__cause__``)."""
    from datasets.exceptions import DatasetGenerationError

    chain, cause = [], e
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    bad_bytes = next((c for c in chain if isinstance(c, UnicodeDecodeError)), None)
    if bad_bytes is not None:
        return CahpError(f"data file {path} is not UTF-8 text ({bad_bytes.reason}); save it as UTF-8")
    kind = _FORMAT_NAMES[path.suffix]
    if path.suffix in (".json", ".jsonl"):
        where = _json_syntax_error(path)
        if where:
            return CahpError(f"data file {path} is not valid {kind}: {where}")
    reason = e.__cause__ if isinstance(e, DatasetGenerationError) and e.__cause__ is not None else e
    return CahpError(f"cannot read data file {path} as {kind}: {_first_line(reason)}")


@contextlib.contextmanager
def _datasets_quiet():
    """``datasets`` logs a reader's failure on stderr before raising it; the error raised is enough."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_file(path: Path, split: str):
    """One split file as a ``datasets.Dataset``.

    Zero-row files make ``datasets`` fail deep inside with raw errors (blank JSON: StopIteration,
    header-only CSV or ``[]``: "Instruction 'train' corresponds to no data", empty parquet:
    ArrowInvalid), so they are caught first and named. So are files it cannot parse (a truncated JSON
    line, an unclosed CSV quote, bytes that are not UTF-8): DatasetGenerationError, ArrowInvalid,
    pandas' ParserError and UnicodeDecodeError are all ValueError or DatasetGenerationError.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if not _has_rows(path):
        raise _no_rows(path, split)
    try:
        with _datasets_quiet():
            return datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except ValueError as e:
        if "corresponds to no data" in str(e):  # zero rows the checks above cannot see (a JSON ``[]``)
            raise _no_rows(path, split) from e
        raise _unreadable(path, e) from e
    except DatasetGenerationError as e:
        raise _unreadable(path, e) from e


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


def _strip_bom_from_columns(ds):
    """A BOM that a reader left on the first column name (``"\\ufefftext"``) is the file's, not the name's."""
    first = ds.column_names[0] if ds.column_names else ""
    if first.startswith("\ufeff") and first[1:] not in ds.column_names:
        ds = ds.rename_column(first, first[1:])
    return ds


def _show(value) -> str:
    """A bad cell as the user wrote it: JSON spelling (``true``, ``"pos"``), null for a missing value."""
    if value is None or (isinstance(value, float) and value != value):
        return "null (missing)"
    shown = json.dumps(value, default=str, ensure_ascii=False)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _is_class_id(value) -> bool:
    # bool is an int subclass, but true/false is a mistake, not class 1/0; 2.0 is how pandas writes 2
    # once a CSV column has a gap elsewhere, so integer-valued floats are ids.
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def _class_ids(values, column: str, where: str) -> np.ndarray:
    """Labels as int64 class ids, or a CahpError naming the first value that is not one.

    Rejected: fractions (0.7: truncating to 0 would train on the wrong class), strings ("pos": names
    must be mapped to ids first), true/false and null. Accepted: ints and integer-valued floats (2.0).
    """
    values = list(values)
    bad = [i for i, v in enumerate(values) if not _is_class_id(v)]
    if bad:
        first = bad[0]
        raise CahpError(
            f"labels in column {column!r} of {where} must be integer class ids (0, 1, 2, ...); "
            f"{len(bad)} of {len(values)} are not, the first at row {first} (0-based): {_show(values[first])}"
        )
    return np.asarray([int(v) for v in values], dtype=np.int64)


def _text_values(values, column: str, where: str) -> list[str]:
    """A text column as strings, or a CahpError naming the first row without text.

    A null (JSON null, an empty CSV cell, a row without the column) is rejected: ``str(None)`` would
    feed the model the word "None". A list or object is rejected too. An empty string ``""`` is
    accepted: it is a text, and the tokenizer encodes it as the special tokens alone. Numbers (a CSV
    column that pandas read as numeric) become their string.
    """
    values = list(values)

    def ok(v) -> bool:
        return v is not None and not (isinstance(v, float) and v != v) and not isinstance(v, (list, dict))

    bad = [i for i, v in enumerate(values) if not ok(v)]
    if bad:
        v = values[bad[0]]
        what = "null (missing)" if v is None or isinstance(v, float) else f"not a string: {_show(v)}"
        raise CahpError(
            f"text column {column!r} of {where} is {what} at row {bad[0]} (0-based), in {len(bad)} of "
            f"{len(values)} rows; fill or drop those rows (an empty string \"\" is accepted)"
        )
    return [v if isinstance(v, str) else str(v) for v in values]


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
    """Load one labelled split and check it is usable.

    Checked: the file parses, the columns are present, there is at least one row, every text (and
    text pair) is a string (``""`` included) and not null, every label is an integer class id (``2.0``
    included; ``0.7``, ``"pos"``, ``true`` and null are not). Each failure is one :class:`CahpError`
    naming the file or split, the column and the first bad row (0-based, in file order).
    """
    data = str(data)
    ds, split_name, hashes = _load_table(data, split)
    ds = _strip_bom_from_columns(ds)
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
    where = f"{data} [{split_name}]"
    labels = _class_ids(ds[label_column], label_column, where)
    texts = _text_values(ds[text_column], text_column, where)
    pairs = _text_values(ds[text_pair_column], text_pair_column, where) if text_pair_column else None
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


def load_texts(
    data: str | os.PathLike,
    split: str = "train",
    text_column: str | None = None,
    text_pair_column: str | None = None,
) -> LabelledData:
    """Load the text columns of one split, with no label column needed (unlabelled in-domain text,
    e.g. ``run --distill-data``); the returned rows carry label 0, which nothing may read."""
    data = str(data)
    ds, split_name, hashes = _load_table(data, split)
    ds = _strip_bom_from_columns(ds)
    columns = list(ds.column_names)
    text_column, text_pair_column = _pick_columns(columns, text_column, text_pair_column)
    for col in (text_column, text_pair_column):
        if col is not None and col not in columns:
            raise CahpError(f"column {col!r} not found in {data} [{split_name}]; columns: {', '.join(columns)} "
                            "(choose with --text-column / --text-pair-column)")
    if len(ds) == 0:
        raise CahpError(f"split {split_name!r} of {data} is empty")
    where = f"{data} [{split_name}]"
    texts = _text_values(ds[text_column], text_column, where)
    pairs = _text_values(ds[text_pair_column], text_pair_column, where) if text_pair_column else None
    return LabelledData(texts=texts, labels=np.zeros(len(texts), dtype=np.int64), pairs=pairs, source=data,
                        split=split_name, file_hashes=hashes, text_column=text_column,
                        text_pair_column=text_pair_column)


def without_rows_of(rows: LabelledData, *others: LabelledData) -> tuple[LabelledData, int]:
    """``rows`` less every row whose text (and pair) appears verbatim in ``others``; and how many went."""
    seen = {(t, None if o.pairs is None else o.pairs[i]) for o in others for i, t in enumerate(o.texts)}
    keep = [i for i, t in enumerate(rows.texts) if (t, None if rows.pairs is None else rows.pairs[i]) not in seen]
    return rows.subset(keep), len(rows) - len(keep)


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
