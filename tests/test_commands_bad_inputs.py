"""The bad-input matrix: every row through the real CLI entry point.

Each row must give exactly one line on stderr (``error: ...``), exit code 2, and leave nothing
half-written where the output would have gone (no output, no temp sibling).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import cli

SELECTION_SCHEMA = "cahp-deploy/selection/1"


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"


def assert_nothing_written(path: Path) -> None:
    assert not path.exists(), f"{path} was written"
    if path.parent.exists():
        leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
        assert not leftovers, f"temp files left beside {path}: {leftovers}"


# ------------------------------------------------------------------------------------------------
# fixtures: broken models and broken data, each built once


@pytest.fixture(scope="module")
def bert(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture(scope="module")
def broken(tmp_path_factory, bert) -> dict[str, Path]:
    """Models and data that are wrong in exactly one way each."""
    import transformers as tf

    from conftest import tokenizer_dir, write_tiny_data

    root = tmp_path_factory.mktemp("broken")
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir())

    no_weights = root / "no_weights"
    shutil.copytree(bert, no_weights)
    (no_weights / "model.safetensors").unlink()

    encoder = root / "encoder"  # a BertModel: no classification head
    tf.BertModel(tf.BertConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                               intermediate_size=32, max_position_embeddings=64)).save_pretrained(encoder)
    tok.save_pretrained(encoder)

    albert = root / "albert"  # shared layers: not in the architecture table
    cfg = tf.AlbertConfig(embedding_size=16, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                          intermediate_size=32, max_position_embeddings=64, num_labels=3)
    cfg.architectures = ["AlbertForSequenceClassification"]
    tf.AlbertForSequenceClassification(cfg).save_pretrained(albert)
    tok.save_pretrained(albert)

    def data(name: str, rows_by_split: dict[str, list[dict]]) -> Path:
        d = root / name
        d.mkdir()
        for split, rows in rows_by_split.items():
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    good = write_tiny_data(root / "good")
    val = [json.loads(line) for line in (good / "validation.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (good / "train.jsonl").read_text().splitlines()]
    return {
        "no_weights": no_weights,
        "encoder": encoder,
        "albert": albert,
        "good": good,
        "wrong_columns": data("wrong_columns", {
            "train": [{"sentence": r["text"], "y": r["label"]} for r in train],
            "validation": [{"sentence": r["text"], "y": r["label"]} for r in val],
        }),
        "one_class": data("one_class", {"train": [{**r, "label": 0} for r in train], "validation": val}),
        "bad_labels": data("bad_labels", {"train": [{**r, "label": 7 if i == 3 else r["label"]} for i, r in enumerate(train)],
                                          "validation": val}),
        "empty_split": data("empty_split", {"train": [], "validation": val}),
    }


# ------------------------------------------------------------------------------------------------
# rows that fail before any model work: run (and select) validate everything first


@pytest.mark.parametrize(
    "model_key, data_key, fragments",
    [
        ("missing", "good", ["does not exist"]),
        ("no_weights", "good", ["no weights"]),
        ("encoder", "good", ["not a sequence classifier"]),
        ("albert", "good", ["unsupported architecture", "albert"]),
        ("bert", "missing", ["does not exist"]),
        ("bert", "wrong_columns", ["column", "text", "--text-column"]),
        ("bert", "one_class", ["1 class"]),
        ("bert", "bad_labels", ["labels outside", "7"]),
        ("bert", "empty_split", ["empty"]),
    ],
    ids=["missing-model", "no-weights", "not-a-classifier", "unsupported-arch", "missing-data",
         "missing-column", "one-class", "labels-out-of-range", "empty-split"],
)
@pytest.mark.parametrize("command", ["run", "select"])
def test_bad_model_or_data(command, model_key, data_key, fragments, bert, broken, tmp_path):
    model = {"bert": bert, "missing": tmp_path / "no-such-model"}.get(model_key) or broken[model_key]
    data = tmp_path / "no-such-data" if data_key == "missing" else broken[data_key]
    out = tmp_path / ("out" if command == "run" else "selection.json")
    code, _, err = cli(command, model, "--data", data, "--out", out)
    assert_one_line_error(code, err, *fragments)
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------
# data files that are malformed, or hold values that would be silently changed (0.7 -> class 0,
# null -> the text "None"): each is a train split beside a good validation split


def _truncated_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"] * 50, "label": [0, 1, 2] * 16 + [0, 1]}), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _jsonl_with(rows: list[dict], row: int, line: str) -> str:
    lines = [json.dumps(r) for r in rows]
    lines[row] = line
    return "".join(x + "\n" for x in lines)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, broken) -> dict[str, tuple[Path, list[str]]]:
    """{case: (data dir, fragments its one error line must hold)}."""
    root = tmp_path_factory.mktemp("bad_data")
    good = broken["good"]
    train = [json.loads(line) for line in (good / "train.jsonl").read_text().splitlines()]

    def with_row(row: dict) -> str:
        return _jsonl_with(train, 4, json.dumps(row))

    cases = {
        "malformed-jsonl": ("train.jsonl", _jsonl_with(train, 4, '{"text": "a", "label"'),
                            ["train.jsonl", "not valid JSON Lines", "line 5"]),
        "random-bytes-parquet": ("train.parquet", b"PAR1" + bytes(range(256)) * 4,
                                 ["train.parquet", "not a readable parquet file"]),
        "truncated-parquet": ("train.parquet", _truncated_parquet, ["train.parquet", "not a readable parquet file"]),
        "not-utf8-csv": ("train.csv", "text,label\ncafé,0\nthé,1\n".encode("latin-1"), ["train.csv", "not UTF-8"]),
        "float-label": ("train.jsonl", with_row({"text": "a b", "label": 0.7}),
                        ["'label'", "[train]", "integer class ids", "row 4", "0.7"]),
        "string-label": ("train.jsonl", with_row({"text": "a b", "label": "pos"}), ["'label'", "[train]", '"pos"']),
        "bool-label": ("train.jsonl", with_row({"text": "a b", "label": True}), ["'label'", "[train]", "true"]),
        "null-label": ("train.jsonl", with_row({"text": "a b", "label": None}), ["'label'", "[train]", "null"]),
        "null-text": ("train.jsonl", with_row({"text": None, "label": 1}),
                      ["text column 'text'", "[train]", "null", "row 4"]),
        "empty-csv-text-cell": ("train.csv", "text,label\na b,0\n,1\nc d,2\n",
                                ["text column 'text'", "[train]", "null", "row 1"]),
        "null-text-pair": ("train.jsonl", _jsonl([{"premise": "a", "hypothesis": "b", "label": 0},
                                                  {"premise": "c", "hypothesis": None, "label": 1}]),
                           ["text column 'hypothesis'", "[train]", "null", "row 1"]),
        "empty-file": ("train.jsonl", "", ["train.jsonl", "no rows"]),
        "no-split-files": ("notes.txt", "nothing here", ["no .jsonl, .csv or .parquet split files"]),
    }
    out = {}
    for case, (name, content, fragments) in cases.items():
        d = root / case
        d.mkdir()
        if name != "notes.txt":
            shutil.copy(good / "validation.jsonl", d / "validation.jsonl")
        path = d / name
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        out[case] = (d, fragments)
    return out


_BAD_DATA_CASES = ["malformed-jsonl", "random-bytes-parquet", "truncated-parquet", "not-utf8-csv", "float-label",
                   "string-label", "bool-label", "null-label", "null-text", "empty-csv-text-cell", "null-text-pair",
                   "empty-file", "no-split-files"]


@pytest.mark.parametrize("case", _BAD_DATA_CASES)
@pytest.mark.parametrize("command", ["run", "select"])
def test_malformed_or_silently_wrong_data(command, case, bert, bad_data, tmp_path, caplog):
    data, fragments = bad_data[case]
    out = tmp_path / ("out" if command == "run" else "selection.json")
    with caplog.at_level("WARNING"):
        code, _, err = cli(command, bert, "--data", data, "--out", out)
    assert_one_line_error(code, err, *fragments)
    assert "Traceback" not in err
    # datasets logs a reader's failure on its own stderr handler, which would be a second line
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("datasets")]
    assert_nothing_written(out)


def test_a_split_that_does_not_exist(bert, broken, tmp_path):
    out = tmp_path / "selection.json"
    code, _, err = cli("select", bert, "--data", broken["good"], "--split", "tarin", "--out", out)
    assert_one_line_error(code, err, "split 'tarin' not in", "available: train, validation")
    assert_nothing_written(out)


def test_utf8_bom_data_is_valid_input(bert, broken, tmp_path):
    """Excel and Windows tools start UTF-8 files with a BOM; select reads them as the plain file."""
    from cahp_deploy.data import load_labelled

    plain = load_labelled(broken["good"], "train")
    data = tmp_path / "bom"
    data.mkdir()
    rows = "".join(f"{json.dumps(t)},{y}\r\n" for t, y in zip(plain.texts, plain.labels.tolist()))
    (data / "train.csv").write_bytes(b"\xef\xbb\xbf" + f"text,label\r\n{rows}".encode())
    (data / "validation.jsonl").write_bytes(b"\xef\xbb\xbf" + (broken["good"] / "validation.jsonl").read_bytes())
    loaded = load_labelled(data, "train")
    assert loaded.text_column == "text"
    assert loaded.texts == plain.texts and loaded.labels.tolist() == plain.labels.tolist()
    assert len(load_labelled(data, "validation")) == len(load_labelled(broken["good"], "validation"))
    out = tmp_path / "selection.json"
    code, _, err = cli("select", bert, "--data", data, "--out", out, "--method", "random", "--heads", "4")
    assert code == 0, err
    assert len(json.loads(out.read_text())["kept_heads"]) == 3  # the tiny BERT's layers


def test_eval_split_equal_to_selection_split(bert, broken, tmp_path):
    code, _, err = cli("run", bert, "--data", broken["good"], "--out", tmp_path / "out",
                       "--select-split", "train", "--eval-split", "train")
    assert_one_line_error(code, err, "must differ")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flags, fragments", [
    (["--recover-split", "validation"], ("must differ from the recovery split",)),
    (["--recover-epochs", "0"], ("--recover-epochs must be positive",)),
    (["--max-accuracy-drop", "1", "--method", "random", "--heads", "4"], ("searches CAHP", "--method random")),
    (["--max-accuracy-drop", "1", "--heads", "4"], ("chooses the number of heads itself",)),
    (["--max-accuracy-drop", "-1"], ("must be in [0, 100]",)),
    (["--ladder", "macs", "--mac-step", "0.05"], ("--mac-step", "--max-accuracy-drop")),
    (["--max-accuracy-drop", "1", "--ladder", "heads", "--mac-step", "0.05"], ("--mac-step", "--ladder macs")),
    (["--max-accuracy-drop", "1", "--ladder", "macs", "--mac-step", "0.7"], ("--mac-step", "(0, 0.5)")),
    (["--max-accuracy-drop", "1", "--ladder", "macs", "--search-step", "2"], ("--search-step", "--mac-step")),
    (["--distill-data", "."], ("--distill-data", "--max-accuracy-drop")),
    (["--max-accuracy-drop", "1", "--distill-data", "/nonexistent/text"], ("--distill-data: ", "does not exist")),
])
def test_bad_recovery_or_budget_options(flags, fragments, bert, broken, tmp_path):
    code, _, err = cli("run", bert, "--data", broken["good"], "--out", tmp_path / "out", *flags)
    assert_one_line_error(code, err, *fragments)
    assert_nothing_written(tmp_path / "out")


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_cuda_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", ["run", "bench", "export", "predict"])
def test_cuda_asked_where_absent(command, bert, broken, tmp_path, request):
    out = tmp_path / "out"
    if command == "run":
        args = ["run", bert, "--data", broken["good"], "--out", out]
    elif command == "export":
        args = ["export", bert, "--out", out, "--fp16"]
    else:
        art = request.getfixturevalue("artifact")
        args = ["bench", art, "--baseline", art, "--out", out] if command == "bench" else ["predict", art, "a text"]
    code, _, err = cli(*args, "--provider", "cuda")
    assert_one_line_error(code, err, "CUDAExecutionProvider", "onnxruntime-gpu")
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------
# selections that do not fit the model (prune)


def _selection(kept: list[list[int]], heads: int = 4) -> dict:
    return {
        "schema": SELECTION_SCHEMA, "method": "random", "kept_heads": kept,
        "num_heads_total": heads * len(kept), "heads_per_layer": heads, "num_layers": len(kept),
    }


@pytest.mark.parametrize(
    "kept, fragments",
    [
        ([[0, 1], [2, 3]], ["2 layers", "another model"]),  # the tiny BERT has 3 layers
        ([[], [], []], ["no head"]),
    ],
    ids=["selection-for-another-model", "selection-keeps-nothing"],
)
def test_bad_selection(kept, fragments, bert, tmp_path):
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps(_selection(kept)))
    out = tmp_path / "pruned"
    code, _, err = cli("prune", bert, "--selection", sel, "--out", out)
    assert_one_line_error(code, err, *fragments)
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------
# outputs that exist without --force, for every stage that writes one


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, bert) -> Path:
    from cahp_deploy.export import export

    return export(bert, tmp_path_factory.mktemp("art") / "dense", optimize=False)


@pytest.mark.parametrize("command", ["run", "select", "prune", "export", "bench", "demo"])
def test_existing_output_without_force(command, bert, broken, tmp_path, request):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "mine.txt").write_text("do not touch")
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps(_selection([[0], [1], [2]])))
    if command == "select":
        out = tmp_path / "existing.json"
        out.write_text("{}")
    args = {
        "run": ["run", bert, "--data", broken["good"], "--out", out],
        "select": ["select", bert, "--data", broken["good"], "--out", out],
        "prune": ["prune", bert, "--selection", sel, "--out", out],
        "export": ["export", bert, "--out", out],
        "demo": ["demo", "--out", out],
    }.get(command)
    if command == "bench":
        art = request.getfixturevalue("artifact")
        args = ["bench", art, "--baseline", art, "--out", out]
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()
    code, _, err = cli(*args)
    assert_one_line_error(code, err, "exists", "--force")
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()
    assert after == before


# ------------------------------------------------------------------------------------------------
# a tampered artifact


def test_tampered_artifact(artifact, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(artifact, bad)
    onnx_file = bad / "model.onnx"
    blob = bytearray(onnx_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(blob))
    code, _, err = cli("verify", bad)
    assert_one_line_error(code, err, "model.onnx")
    out = tmp_path / "report"
    code, _, err = cli("bench", bad, "--baseline", artifact, "--out", out)
    assert_one_line_error(code, err, "model.onnx")
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------
# Ctrl-C in the middle of an export: no partial artifact, and a rerun resumes


TINY_RUN = ["--method", "random", "--heads", "6", "--batch", "1", "--seq", "16", "--min-seconds", "0.01",
            "--min-reps", "2", "--warmup", "1", "--no-traffic", "--no-timing", "--variant", "optimized"]


def test_interrupted_run_leaves_no_partial_artifact_and_resumes(bert, broken, tmp_path, monkeypatch):
    from cahp_deploy import export as export_stage

    real_export = export_stage.export
    calls = []

    def export_then_interrupt(model_dir, out, **kwargs):
        """Do the real export into the temp dir, then Ctrl-C before it is renamed into place."""
        import cahp_deploy.atomic as atomic

        real_atomic_dir = atomic.atomic_dir

        def interrupted_atomic_dir(target, force=False):
            import contextlib

            @contextlib.contextmanager
            def cm():
                with real_atomic_dir(target, force) as tmp:
                    yield tmp
                    calls.append(sorted(p.name for p in tmp.iterdir()))
                    raise KeyboardInterrupt

            return cm()

        monkeypatch.setattr(atomic, "atomic_dir", interrupted_atomic_dir)
        for mod in list(__import__("sys").modules.values()):
            if getattr(mod, "__name__", "").startswith("cahp_deploy.export") and hasattr(mod, "atomic_dir"):
                monkeypatch.setattr(mod, "atomic_dir", interrupted_atomic_dir)
        return real_export(model_dir, out, **kwargs)

    monkeypatch.setattr(export_stage, "export", export_then_interrupt)
    out = tmp_path / "run"
    code, _, err = cli("run", bert, "--data", broken["good"], "--out", out, *TINY_RUN)
    assert code == 130, err
    assert "interrupted" in err
    assert calls and any(name.endswith(".onnx") for name in calls[0]), "the export had written files"
    artifacts = out / "artifacts"
    assert not (artifacts / "dense").exists()
    assert not [p for p in artifacts.iterdir() if p.name.startswith(".")] if artifacts.exists() else True
    record = json.loads((out / "run.json").read_text())
    assert set(record["stages"]) == {"select", "prune", "refit", "recover"}

    monkeypatch.undo()
    code, stdout, err = cli("run", bert, "--data", broken["good"], "--out", out, *TINY_RUN)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    status = {name: s["status"] for name, s in record["stages"].items()}
    assert status == {"select": "skipped", "prune": "skipped", "refit": "skipped", "recover": "skipped", "export-dense": "done",
                      "export-pruned": "done", "bench": "done", "confirm": "done"}
    assert (out / "report" / "report.md").is_file()
