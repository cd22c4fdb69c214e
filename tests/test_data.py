"""load_labelled on files that are wrong in one way each: a one-line CahpError naming what to fix,
never a raw ``datasets``/pyarrow error and never a silently changed row (0.7 -> 0, null -> "None").

The CLI side (exit code 2, one line, nothing written) is in test_commands_bad_inputs.py.
"""

from __future__ import annotations

import json
import os

import pytest

from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _truncated_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"] * 50, "label": [0, 1] * 25}), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _error(path, split="validation", **kwargs) -> str:
    with pytest.raises(CahpError) as e:
        load_labelled(path, split, **kwargs)
    message = str(e.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------
# files that do not parse


@pytest.mark.parametrize("name, content, fragments", [
    ("validation.jsonl", _jsonl([{"text": "a", "label": 0}, '{"text": "b", "label"', {"text": "c", "label": 1}]),
     ["not valid JSON Lines", "line 2", "Expecting ':' delimiter"]),
    ("validation.jsonl", _jsonl(['{"text": "a", "label": 0']), ["not valid JSON Lines", "line 1"]),
    ("validation.json", '[{"text": "a", "label": 0},\n {"text": "b", "label" 1}]\n',
     ["not valid JSON", "line 2"]),
    ("validation.csv", 'text,label\n"a,0\nb,1\n', ["cannot read data file", "as CSV", "EOF inside string"]),
], ids=["jsonl-truncated-line-in-the-middle", "jsonl-truncated-only-line", "json-array", "csv-open-quote"])
def test_a_file_that_does_not_parse_is_named_with_the_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_text(content)
    for target in (tmp_path, path):  # as a split of a directory, and as the data file itself
        message = _error(target)
        assert str(path) in message
        for fragment in fragments:
            assert fragment in message, message


@pytest.mark.parametrize("write", [
    lambda p: p.write_bytes(os.urandom(512)),
    _truncated_parquet,
], ids=["random-bytes", "truncated"])
def test_a_corrupt_parquet_file_is_named(tmp_path, write):
    path = tmp_path / "validation.parquet"
    write(path)
    message = _error(tmp_path)
    assert str(path) in message and "not a readable parquet file" in message


def test_a_file_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "validation.csv"
    path.write_bytes("text,label\ncafé crème,0\n".encode("latin-1"))
    message = _error(tmp_path)
    assert str(path) in message and "not UTF-8" in message


# ------------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize("bad, shown", [
    (0.7, "0.7"), ("pos", '"pos"'), (True, "true"), (None, "null"),
], ids=["fraction", "string", "bool", "null"])
def test_a_label_that_is_not_a_class_id_is_rejected_with_an_example(tmp_path, bad, shown):
    (tmp_path / "validation.jsonl").write_text(_jsonl([
        {"text": "a", "label": 0}, {"text": "b", "label": bad}, {"text": "c", "label": 1},
    ]))
    message = _error(tmp_path)
    for fragment in ("'label'", "[validation]", "must be integer class ids", "row 1", shown):
        assert fragment in message, message


def test_a_float_label_is_not_truncated(tmp_path):
    """0.7 once became class 0 without a word."""
    (tmp_path / "validation.jsonl").write_text(_jsonl([{"text": "a", "label": 0.7}, {"text": "b", "label": 1}]))
    assert "0.7" in _error(tmp_path)


def test_integer_valued_float_labels_are_class_ids(tmp_path):
    """pandas reads a label column with a gap as float (2.0); the whole-number values are still ids."""
    (tmp_path / "validation.jsonl").write_text(_jsonl([{"text": "a", "label": 2.0}, {"text": "b", "label": 0}]))
    (tmp_path / "train.csv").write_text("text,label\na,1.0\nb,0.0\n")
    assert load_labelled(tmp_path, "validation").labels.tolist() == [2, 0]
    data = load_labelled(tmp_path, "train")
    assert data.labels.tolist() == [1, 0] and str(data.labels.dtype) == "int64"


def test_a_blank_csv_label_cell_is_rejected(tmp_path):
    (tmp_path / "validation.csv").write_text("text,label\na,0\nb,\nc,1\n")
    message = _error(tmp_path)
    assert "'label'" in message and "row 1" in message and "null" in message


# ------------------------------------------------------------------------------------------------
# texts


@pytest.mark.parametrize("name, content, column, row", [
    ("validation.jsonl", _jsonl([{"text": "a", "label": 0}, {"text": None, "label": 1}]), "text", 1),
    ("validation.csv", "text,label\na,0\nb,1\n,0\n", "text", 2),
    ("validation.jsonl", _jsonl([{"text": "a", "label": 0}, {"label": 1}]), "text", 1),
    ("validation.jsonl", _jsonl([{"premise": "p", "hypothesis": None, "label": 0}]), "hypothesis", 0),
], ids=["json-null", "empty-csv-cell", "row-without-the-column", "null-pair"])
def test_a_null_text_is_rejected_with_the_row(tmp_path, name, content, column, row):
    (tmp_path / name).write_text(content)
    message = _error(tmp_path)
    for fragment in (f"text column {column!r}", "[validation]", "null", f"row {row} (0-based)"):
        assert fragment in message, message
    assert "None" not in message


def test_an_empty_string_text_is_accepted(tmp_path):
    """"" is a text (the tokenizer gives it the special tokens alone); only a missing value is refused."""
    (tmp_path / "validation.jsonl").write_text(_jsonl([{"text": "", "label": 0}, {"text": "b", "label": 1}]))
    assert load_labelled(tmp_path, "validation").texts == ["", "b"]


def test_a_list_text_is_rejected(tmp_path):
    (tmp_path / "validation.jsonl").write_text(_jsonl([{"text": ["a", "b"], "label": 0}]))
    assert "not a string" in _error(tmp_path)


# ------------------------------------------------------------------------------------------------
# a UTF-8 byte-order mark (Excel, Windows tools) is valid input


@pytest.mark.parametrize("name, content", [
    ("validation.jsonl", _jsonl([{"text": "café", "label": 0}, {"text": "b", "label": 1}])),
    ("validation.json", json.dumps([{"text": "café", "label": 0}, {"text": "b", "label": 1}])),
    ("validation.csv", "text,label\r\ncafé,0\r\nb,1\r\n"),
], ids=["jsonl", "json", "csv"])
def test_a_utf8_bom_is_read_as_utf8(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    for target in (tmp_path, path):
        data = load_labelled(target, "validation")
        assert data.text_column == "text"
        assert data.texts == ["café", "b"] and data.labels.tolist() == [0, 1]


def test_a_bom_alone_is_an_empty_file(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n")
    message = _error(tmp_path)
    assert str(path) in message and "no rows" in message


# ------------------------------------------------------------------------------------------------
# the directory and the split


def test_a_directory_without_split_files(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here")
    assert "no .jsonl, .csv or .parquet split files" in _error(tmp_path)


def test_a_split_that_is_not_there_lists_those_that_are(tmp_path):
    (tmp_path / "train.jsonl").write_text(_jsonl([{"text": "a", "label": 0}]))
    (tmp_path / "test.csv").write_text("text,label\na,0\n")
    message = _error(tmp_path, "validation")
    assert "split 'validation' not in" in message and "test, train" in message


def test_rows_without_the_text_column(tmp_path):
    (tmp_path / "validation.jsonl").write_text(_jsonl([{"sentence": "a", "label": 0}]))
    message = _error(tmp_path)
    assert "column 'text' not found" in message and "sentence, label" in message and "--text-column" in message
