"""handoff: Triton config checked against the graph, ORT-format parity, vocabulary trimming, card, verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli
from cahp_deploy.errors import CahpError
from cahp_deploy.export import export
from cahp_deploy.handoff import verify_handoff as verify
from cahp_deploy.handoff import choose_variant, handoff
from cahp_deploy.handoff import triton, vocab


KEEP = [[0, 2], [1], [0, 1, 3]]  # a ragged CAHP-like keep pattern: the handoff is for pruned artifacts


@pytest.fixture(scope="module")
def artifact(tiny_models, tiny_data, tmp_path_factory) -> Path:
    from cahp_deploy.pruning import prune
    from cahp_deploy.selection import Selection

    root = tmp_path_factory.mktemp("handoff")
    sel = Selection(method="manual", kept_heads=KEEP, num_heads_total=12, heads_per_layer=4)
    pruned = prune(tiny_models["bert"], sel, root / "pruned")
    return export(pruned, root / "art", measure=False, data=str(tiny_data), split="validation")


@pytest.fixture(scope="module")
def triton_dir(artifact, tmp_path_factory) -> Path:
    return handoff(artifact, tmp_path_factory.mktemp("tri") / "h", "triton", name="tiny", max_batch_size=8, instances=2)


def _onnx_io(path: Path) -> dict:
    """Names, ONNX elem types and ranks straight from onnx (independent of triton.graph_io)."""
    import onnx

    g = onnx.load(str(path)).graph
    init = {t.name for t in g.initializer}
    return {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in list(g.input) + list(g.output) if v.name not in init}


def test_triton_config_matches_the_graph(triton_dir):
    model = triton_dir / "model_repository" / "tiny" / "1" / "model.onnx"
    cfg = triton.parse_pbtxt((triton_dir / "model_repository" / "tiny" / "config.pbtxt").read_text())
    assert cfg["platform"] == ["onnxruntime_onnx"] and cfg["max_batch_size"] == [8]
    assert cfg["instance_group"][0]["kind"] == ["KIND_CPU"] and cfg["instance_group"][0]["count"] == [2]
    assert cfg["dynamic_batching"][0]["preferred_batch_size"] == [2, 4, 8]
    onnx_types = {7: "TYPE_INT64", 1: "TYPE_FP32"}
    declared = {t["name"][0]: (t["data_type"][0], len(t["dims"])) for t in cfg["input"] + cfg["output"]}
    expected = {n: (onnx_types[et], rank - 1) for n, (et, rank) in _onnx_io(model).items()}  # batch dim dropped
    assert declared == expected and set(declared) >= {"input_ids", "attention_mask", "logits"}
    assert cfg["output"][0]["dims"] == [3]  # 3 labels
    labels = (triton_dir / "model_repository" / "tiny" / "labels.txt").read_text().splitlines()
    assert len(labels) == 3
    compile((triton_dir / "client.py").read_text(), "client.py", "exec")  # the example client is valid Python


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace('name: "input_ids"', 'name: "ids"'), "differ from the graph"),
    (lambda t: t.replace("TYPE_FP32", "TYPE_FP16"), "data_type TYPE_FP16"),
    (lambda t: t.replace("dims: [ 3 ]", "dims: [ 3, 1 ]"), "rank 2"),
    (lambda t: t.replace("dims: [ 3 ]", "dims: [ 4 ]"), "do not match"),
    (lambda t: t.replace("onnxruntime_onnx", "tensorrt_plan"), "platform"),
])
def test_check_config_catches_each_drift(triton_dir, edit, match):
    model = triton_dir / "model_repository" / "tiny" / "1" / "model.onnx"
    text = (triton_dir / "model_repository" / "tiny" / "config.pbtxt").read_text()
    triton.check_config(text, model)
    with pytest.raises(CahpError, match=match):
        triton.check_config(edit(text), model)


def test_parse_pbtxt_handwritten():
    text = '# comment\nname: "m"\nmax_batch_size: 4\ninput [ { name: "a" dims: [ -1, 2 ] }, { name: "b" dims: [] } ]\n' \
           'dynamic_batching { }\nparameters { key: "x" value: { string_value: "1" } }\n'
    cfg = triton.parse_pbtxt(text)
    assert cfg == {"name": ["m"], "max_batch_size": [4],
                   "input": [{"name": ["a"], "dims": [-1, 2]}, {"name": ["b"], "dims": []}],
                   "dynamic_batching": [{}], "parameters": [{"key": ["x"], "value": [{"string_value": ["1"]}]}]}
    with pytest.raises(CahpError, match="ends in the middle"):
        triton.parse_pbtxt('input [ { name: "a" ')


def test_verify_checks_a_handoff_dir(triton_dir, tmp_path, capsys):
    res = verify(triton_dir)
    assert res["smoke"]["optimized"]["max_abs_diff"] <= 1e-4
    copy = tmp_path / "h"
    shutil.copytree(triton_dir, copy)
    cfg = copy / "model_repository" / "tiny" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size: 8", "max_batch_size: 9"))
    code, _, err = cli("verify", copy)
    assert code == 2 and "config.pbtxt was tampered with" in err
    shutil.rmtree(copy)
    shutil.copytree(triton_dir, copy)
    (copy / "model_repository" / "tiny" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(CahpError, match="extra.onnx is not listed"):
        verify(copy)


def test_model_card_says_what_was_measured(triton_dir, artifact):
    card = (triton_dir / "MODEL_CARD.md").read_text()
    m = json.loads((artifact / "manifest.json").read_text())
    acc = m["variants"]["optimized"]["parity"]["data"]["accuracy"]
    assert f"{acc:.2%}" in card and "split `validation`" in card and "90% Wilson CI" in card
    assert "Attention heads kept: 6 of 12 (per layer [2, 1, 3])" in card and "Parameters " in card
    assert "cahp-deploy handoff" in card and "Not measured in this artifact" in card
    rec = json.loads((triton_dir / "handoff.json").read_text())
    assert rec["files"]["model_repository/tiny/1/model.onnx"]["sha256"] in card


def test_variant_rule():
    m = {"variants": {"fp32": {}, "optimized": {}, "int8": {}}}
    assert choose_variant(m)[0] == "optimized"
    assert choose_variant({**m, "recommended": "int8"}) == ("int8", "recommended by the artifact's manifest")
    assert choose_variant({**m, "recommended": "fp16"})[0] == "optimized"  # recommends one it lacks
    assert choose_variant({"variants": {"fp32": {}}})[0] == "fp32"
    assert choose_variant(m, "int8")[0] == "int8"
    with pytest.raises(CahpError, match="--variant 'fp16' is not in this artifact"):
        choose_variant(m, "fp16")


def test_the_shipped_choice_comes_from_confirm_json_and_the_artifact_is_not_rewritten(artifact, tmp_path):
    from conftest import run_dir_with_confirm

    pruned = run_dir_with_confirm(artifact, tmp_path, "fp32", confirmed=False)
    before = (pruned / "manifest.json").read_bytes()
    out = handoff(pruned, tmp_path / "h", "dir")
    rec = json.loads((out / "handoff.json").read_text())
    assert rec["variant"] == "fp32" and rec["variant_reason"].endswith("confirm.json")
    card = (out / "MODEL_CARD.md").read_text()
    assert "NOT confirmed: do not rely on it" in card and "upper bound +1.30" in card
    assert (pruned / "manifest.json").read_bytes() == before  # the choice is read, never written into the artifact
    # an artifact exported again after the run is no longer described by its confirm.json
    (pruned / "manifest.json").write_bytes(before.replace(b"{", b"{\n", 1))
    rec = json.loads((handoff(pruned, tmp_path / "h2", "dir") / "handoff.json").read_text())
    assert rec["variant"] == "optimized" and "NOT confirmed" not in (tmp_path / "h2" / "MODEL_CARD.md").read_text()


def test_ort_mobile_with_trimmed_vocab(artifact, tiny_data, tmp_path):
    out = handoff(artifact, tmp_path / "m", "ort-mobile", trim_vocab=str(tiny_data))
    rec = json.loads((out / "handoff.json").read_text())
    assert (out / "model.ort").stat().st_size > 0
    assert "com.microsoft" in (out / "model.required_operators_and_types.config").read_text() or \
        "ai.onnx" in (out / "model.required_operators_and_types.config").read_text()
    p = rec["ort_parity"]
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and "rows of" in p["inputs"]
    t = rec["trim_vocab"]
    assert t["vocab_before"] == 30522 and t["vocab_after"] < 200 and t["bytes_after"] < t["bytes_before"]
    assert t["covered_parity"]["max_abs_diff"] <= 1e-5
    assert t["heldout"]["unk_tokens_after"] <= t["heldout"]["dropped_tokens"]
    assert t["heldout"]["split"] == "validation" and 0 <= t["heldout"]["unk_rate_after"] <= 1
    assert verify(out)["smoke"]
    # the trimmed tokenizer and config agree with the graph
    cfg = json.loads((out / "tokenizer" / "config.json").read_text())
    assert cfg["vocab_size"] == t["vocab_after"] == len((out / "tokenizer" / "vocab.txt").read_text().splitlines())


def test_trimmed_model_gives_the_same_logits_on_covered_text(artifact, tiny_data, tmp_path):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    out = handoff(artifact, tmp_path / "d", "dir", trim_vocab=str(tiny_data))
    old_tok = AutoTokenizer.from_pretrained(str(artifact))
    new_tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    texts = ["the movie was great and lovely", "boring plot with dull actors"]  # words of the tiny train set
    old = old_tok(texts, padding=True, return_tensors="np")
    new = new_tok(texts, padding=True, return_tensors="np")
    assert old_tok.convert_ids_to_tokens(old["input_ids"][0]) == new_tok.convert_ids_to_tokens(new["input_ids"][0])
    assert new["input_ids"].max() < 200
    ref = ort.InferenceSession(str(artifact / "model_optimized.onnx")).run(None, dict(old))[0]
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, dict(new))[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # a word whose pieces were dropped becomes [UNK], and the trimmed tokenizer says so
    assert new_tok.convert_ids_to_tokens(new_tok("xylophone")["input_ids"])[1] == "[UNK]"


def test_trim_tokenizer_json_renumbers_consistently():
    tok = {"model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "[CLS]": 4}},
           "added_tokens": [{"id": 0, "content": "[PAD]"}, {"id": 1, "content": "[UNK]"}, {"id": 4, "content": "[CLS]"}],
           "post_processor": {"type": "TemplateProcessing", "special_tokens": {"[CLS]": {"ids": [4]}}},
           "padding": {"pad_id": 0}}
    new = vocab.trim_tokenizer_json(tok, np.array([0, 1, 3, 4]))
    assert new["model"]["vocab"] == {"[PAD]": 0, "[UNK]": 1, "b": 2, "[CLS]": 3}
    assert [a["id"] for a in new["added_tokens"]] == [0, 1, 3]
    assert new["post_processor"]["special_tokens"]["[CLS]"]["ids"] == [3]
    with pytest.raises(CahpError, match="supports WordPiece"):
        vocab.trim_tokenizer_json({**tok, "model": {**tok["model"], "type": "BPE"}}, np.array([0, 1]))
    with pytest.raises(CahpError, match="added token"):
        vocab.trim_tokenizer_json(tok, np.array([1, 2, 3]))


def test_cli_errors_are_one_line(artifact, tmp_path):
    code, _, err = cli("handoff", artifact, "--out", tmp_path / "x", "--target", "triton", "--max-batch-size", "-1")
    assert code == 2 and "--max-batch-size -1" in err and not (tmp_path / "x").exists()
    code, _, err = cli("handoff", artifact, "--out", tmp_path / "x", "--variant", "fp16")
    assert code == 2 and "not in this artifact" in err
    code, _, err = cli("handoff", tmp_path, "--out", tmp_path / "y")
    assert code == 2 and "not an artifact dir" in err
    code, out, _ = cli("handoff", artifact, "--out", tmp_path / "z", "--target", "dir")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'z'}: dir from optimized")


_WORDS = ["the", "movie", "was", "great", "boring", "unbelievable", "cinematography", "actors", "plot",
          "xylophone", "ok", "runs", "running", "quickly", "! ?", "42"]


@pytest.fixture(scope="module")
def wordpiece_dir() -> Path:
    from conftest import tokenizer_dir

    return Path(tokenizer_dir())


def test_trimmed_wordpiece_is_exact_on_the_texts_it_was_trimmed_from(wordpiece_dir, tmp_path_factory):
    from hypothesis import given, settings, strategies as st
    from transformers import AutoTokenizer

    orig = vocab.load_fast_tokenizer(wordpiece_dir)
    sentence = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=6).map(" ".join)

    @settings(max_examples=8, deadline=None)
    @given(st.lists(sentence, min_size=1, max_size=4), sentence)
    def prop(kept_texts, other):
        keep = vocab.kept_ids(orig, kept_texts)
        d = tmp_path_factory.mktemp("wp")
        vocab.trim_tokenizer_dir(wordpiece_dir, d, keep)
        new = AutoTokenizer.from_pretrained(str(d))
        for text in kept_texts:  # covered: the same pieces, ids renumbered by rank in keep
            assert new(text)["input_ids"] == [int(np.searchsorted(keep, i)) for i in orig(text)["input_ids"]]
        covered, stats = vocab.coverage(orig, keep, [other])
        unk = vocab.unk_stats(new, [other])
        assert unk["unk_tokens"] <= stats["dropped_tokens"]  # a dropped piece costs at most its word
        if covered[0]:
            assert new.convert_ids_to_tokens(new(other)["input_ids"]) == orig.convert_ids_to_tokens(orig(other)["input_ids"])

    prop()


def test_wilson_interval_by_hand():
    from cahp_deploy.handoff.model_card import wilson

    # z = 1.645 (90%): centre (0.5 + z²/200) / (1 + z²/100) = 0.5; half = z·sqrt(0.0025 + z²/40000) / 1.02706 = 0.0812
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4188, abs=2e-4) and hi == pytest.approx(0.5812, abs=2e-4)
    assert wilson(1.0, 10)[1] == 1.0 and wilson(1.0, 10)[0] < 1.0


def test_model_card_latency_comes_from_a_bench_report(artifact, tiny_models, tiny_data, tmp_path):
    from cahp_deploy.bench import bench

    # exported like the artifact (with --data): export saves the tokenizer's padding state, and bench
    # refuses tokenizer files that differ
    dense = export(tiny_models["bert"], tmp_path / "dense", measure=False, data=str(tiny_data), split="validation")
    bench([artifact], dense, tmp_path / "rep", variants=["optimized"], batches=(1, 2), seqs=(8,), min_seconds=0.0,
          min_reps=3, warmup=1, traffic=False, plots=False, progress=False)
    out = handoff(artifact, tmp_path / "h", "dir", bench_report=tmp_path / "rep")
    rec = json.loads((out / "handoff.json").read_text())
    assert [(c["batch"], c["seq"]) for c in rec["bench"]["cells"]] == [(1, 8), (2, 8)]
    card = (out / "MODEL_CARD.md").read_text()
    p50 = rec["bench"]["cells"][0]["p50_ms"]
    assert f"| grid | 1 | 8 | {p50:.2f} |" in card and "load average" in card
    with pytest.raises(CahpError, match="no artifact from the same source model"):
        handoff(artifact, tmp_path / "h2", "dir", bench_report=_other(tmp_path))


def _other(tmp_path: Path) -> Path:
    """A report whose only artifact is of another model (identity fields changed)."""
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    for a in rep["artifacts"]:
        a["source_model_sha256"] = "0" * 64
    p = tmp_path / "other.json"
    p.write_text(json.dumps(rep))
    return p


@pytest.mark.shared
def test_trimmed_tokenizer_on_real_sst5(tmp_path):
    """SST-5 train texts set the vocabulary; on validation, covered rows tokenize identically (renumbered)."""
    from conftest import shared_path
    from cahp_deploy.data import load_labelled

    model, data = shared_path("models", "minilm-sst5"), shared_path("data", "sst5")
    orig = vocab.load_fast_tokenizer(model)
    train, val = load_labelled(data, "train"), load_labelled(data, "validation")
    keep = vocab.kept_ids(orig, train.texts)
    vocab.trim_tokenizer_dir(model, tmp_path, keep)
    new = vocab.load_fast_tokenizer(tmp_path)
    assert len(new) == len(keep) == 12400  # measured: experiments/results/handoff/README.md
    covered, stats = vocab.coverage(orig, keep, val.texts)
    assert covered.sum() == 758 and stats["dropped_tokens"] == 488
    old_ids, new_ids = vocab.token_ids(orig, val.texts), vocab.token_ids(new, val.texts)
    for i in np.flatnonzero(covered):
        assert new_ids[i] == np.searchsorted(keep, old_ids[i]).tolist()
    assert vocab.unk_stats(new, val.texts)["unk_tokens"] == 8
