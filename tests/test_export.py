"""The export stage: parity on every architecture and keep-pattern, fused-head check, variants, bad input.

Tiny models get re-drawn weights (std 0.3) so logits are O(1) and one head moves them by ~0.1: with
the default 0.02 init every variant "agrees" with PyTorch to 1e-6 and the gates would have no teeth.
Exports skip the optimization timing (``measure=False``) except in the one test that checks it.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cahp_deploy import arch as cahp_arch
from cahp_deploy.commands.cli import main
from cahp_deploy.errors import CahpError
from cahp_deploy.export import export, load_manifest, variant_path, verify
from cahp_deploy.export import optimize as ortopt
from cahp_deploy.export import onnx_export, parity
from cahp_deploy.pruning import prune
from cahp_deploy.selection.result import Selection
from conftest import save_strong_model, tiny_config, tokenizer_dir, write_tiny_data

LAYERS, HEADS = 3, 4
#: optimum.onnxruntime's ORTModel loads the artifacts where optimum-onnx is installed (the pinned lane)
HAS_ORTMODEL = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.onnxruntime") is not None
#: transformers 4.x, whose export attention is sdpa where the class has it
OPTIMUM_ERA = cahp_arch.transformers_row().export_attention == "sdpa"


def _save_strong_model(arch: str, out: Path, seed: int = 1) -> Path:
    return save_strong_model(arch, out, seed, layers=LAYERS, heads=HEADS)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def dense(root) -> dict[str, Path]:
    return {a: _save_strong_model(a, root / f"dense-{a}") for a in ("bert", "roberta", "distilbert", "electra")}


@pytest.fixture(scope="module")
def data(root) -> Path:
    return write_tiny_data(root / "data", n_train=10, n_val=40)


def _patterns(arch: str) -> dict[str, list[list[int]]]:
    """Two random keep-patterns: one with a zero-head layer, one without; each has a layer keeping
    2 of 4 heads (width 16, divisible by the original 4: the layer a global head count gets wrong)."""
    rng = random.Random(f"{arch}-keep")
    counts_zero = [0, 2, rng.randint(1, HEADS)]
    counts_full = [rng.randint(1, HEADS), rng.randint(1, HEADS), 2]
    rng.shuffle(counts_zero)
    rng.shuffle(counts_full)
    make = lambda counts: [sorted(rng.sample(range(HEADS), c)) for c in counts]  # noqa: E731
    return {"zero": make(counts_zero), "ragged": make(counts_full)}


def _pruned(dense_dir: Path, keep: list[list[int]], out: Path) -> Path:
    sel = Selection(method="manual", kept_heads=keep, num_heads_total=LAYERS * HEADS, heads_per_layer=HEADS)
    return prune(dense_dir, sel, out)


@pytest.fixture(scope="module")
def full_artifact(root, dense, data) -> Path:
    """Dense BERT with every variant and real (tiny) data, through the CLI."""
    from click.testing import CliRunner

    from cahp_deploy.commands.cli import cli

    out = root / "art-full"
    args = ["export", str(dense["bert"]), "--out", str(out), "--quantize", "int8", "--fp16",
            "--data", str(data), "--no-timing"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0 and result.output.startswith(f"wrote {out}: fp32 ")
    return out


# ----------------------------------------------------------------------------- parity per arch / pattern

CASES = [(a, p) for a in ("bert", "roberta", "distilbert") for p in ("zero", "ragged")] + [("electra", "zero")]


@pytest.mark.parametrize("arch,pattern", CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_pruned_export_parity_and_fused_heads(root, dense, arch, pattern):
    keep = _patterns(arch)[pattern]
    model_dir = _pruned(dense[arch], keep, root / f"pruned-{arch}-{pattern}")
    # spread the variants over the cases: int8 (per-channel) on DistilBERT, fp16 on RoBERTa
    kw = {"quantize": "int8", "per_channel": True} if arch == "distilbert" else {}
    if arch == "roberta":
        kw["fp16"] = True
    art = export(model_dir, root / f"art-{arch}-{pattern}", measure=False, **kw)
    m = load_manifest(art)

    assert m["kept_heads"] == keep and m["heads_per_layer"] == [len(k) for k in keep]
    assert m["num_heads_kept"] == sum(len(k) for k in keep) and m["num_heads_total"] == LAYERS * HEADS
    assert m["pruning"]["kept_heads"] == keep and m["selection_sha256"] == m["pruning"]["selection_sha256"]
    assert (art / "pruning.json").is_file()
    for v in ("fp32", "optimized"):
        p = m["variants"][v]["parity"]
        assert p["passed"] and p["max_abs_diff"] <= parity.FP32_ATOL and p["argmax_agreement"] == 1.0

    # every layer with heads has one fused Attention node with that layer's head count
    opt = m["variants"]["optimized"]
    assert opt["choice"] == "no_skip_layernorm" and opt["measured"] is False
    graph = onnx.load(str(variant_path(art, "optimized")))
    nodes = [n for n in graph.graph.node if n.op_type == "Attention"]
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in nodes]
    assert heads == [len(k) for k in keep if k]
    assert [a["layer"] for a in opt["attention"]] == [i for i, k in enumerate(keep) if k]
    assert not any(n.op_type == "SkipLayerNormalization" for n in graph.graph.node)

    # inputs are what the architecture takes (RoBERTa/DistilBERT exports have no token_type_ids)
    assert ("token_type_ids" in m["input_names"]) == (arch in ("bert", "electra"))
    if arch == "distilbert":
        assert m["variants"]["int8"]["per_channel"] is True
        assert m["variants"]["int8"]["parity"]["on"] == "random_tokens"
    if arch == "roberta":
        assert m["variants"]["fp16"]["parity"]["passed"]
    # transformers 4.x: sdpa, but ELECTRA has none and ORT fuses its eager graph (DistilBERT's eager it
    # does not); 5.x: eager for all (arch.TRANSFORMERS)
    assert m["attn_implementation"] == cahp_arch.export_attention(tiny_config(arch))
    assert m["attn_implementation"] == ("eager" if arch == "electra" or not OPTIMUM_ERA else "sdpa")
    assert verify(art)["smoke"].keys() == m["variants"].keys()
    if (arch, pattern) == ("distilbert", "zero") and HAS_ORTMODEL:
        _check_ortmodel_loads_pruned(art)


def _check_ortmodel_loads_pruned(art: Path) -> None:
    """config.json carries cahp_kept_heads (ORTModel ignores it); the graph has no token_type_ids."""
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    assert "cahp_kept_heads" in json.loads((art / "config.json").read_text())
    model = ORTModelForSequenceClassification.from_pretrained(art, file_name="model_optimized.onnx")
    enc = AutoTokenizer.from_pretrained(art)(["a fine movie", "bad"], padding=True, return_tensors="pt")
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- the full artifact


def test_full_artifact_files_manifest_and_loaders(full_artifact):
    import onnxruntime as ort

    m = load_manifest(full_artifact)
    assert set(m["variants"]) == {"fp32", "optimized", "int8", "fp16"}
    listed = set(m["files"])
    assert {"model.onnx", "model_optimized.onnx", "model_int8.onnx", "model_fp16.onnx", "config.json"} <= listed
    assert any(f in listed for f in ("tokenizer.json", "vocab.txt"))
    on_disk = {p.name for p in full_artifact.iterdir()} - {"manifest.json"}
    assert on_disk == listed
    for name, rec in m["files"].items():
        assert rec["bytes"] == (full_artifact / name).stat().st_size
    assert m["kept_heads"] is None and m["pruning"] is None and m["num_heads_kept"] == LAYERS * HEADS
    assert m["opset"] == 18 and m["model_type"] == "bert" and m["num_labels"] == 3
    assert all(m["versions"][p] for p in ("torch", "transformers", "onnx", "onnxruntime"))
    assert m["exporter"]["name"] == ("optimum" if onnx_export.optimum_unusable() is None else "torch")
    assert (m["versions"]["optimum-onnx"] is not None) == HAS_ORTMODEL
    assert m["export_seconds"] > 0 and m["parity_data"]["split"] == "validation"
    assert m["attn_implementation"] == cahp_arch.export_attention(tiny_config("bert")) and m["task"] == "text-classification"

    p = m["variants"]["int8"]["parity"]
    assert p["on"] == "data" and p["data"]["num_examples"] == 40 and p["argmax_agreement"] >= 0.99
    assert m["variants"]["fp16"]["checked_on"] == "CPUExecutionProvider"
    assert m["variants"]["fp16"]["parity"]["max_abs_diff"] <= parity.FP16_ATOL

    # plain onnxruntime, every variant, fed only the inputs the graph declares
    from transformers import AutoConfig

    feeds = parity.random_feeds(m["input_names"], AutoConfig.from_pretrained(full_artifact))
    smoke = [{k: np.asarray(x) for k, x in f.items()} for f in m["smoke"]["inputs"]]
    ref = np.asarray(m["smoke"]["logits"])
    for v in m["variants"]:
        s = ort.InferenceSession(str(variant_path(full_artifact, v)), providers=["CPUExecutionProvider"])
        assert parity.ort_logits(s, feeds).shape == (sum(len(f["input_ids"]) for f in feeds), 3)
        assert np.abs(parity.ort_logits(s, smoke) - ref).max() < 0.05


@pytest.mark.skipif(not HAS_ORTMODEL, reason="optimum-onnx is not installed (the transformers 5.x lane)")
def test_loads_with_optimum_ortmodel(full_artifact):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(full_artifact)(["a fine movie", "awful"], padding=True, return_tensors="pt")
    ref = None
    for name in ("model.onnx", "model_optimized.onnx", "model_int8.onnx"):
        logits = ORTModelForSequenceClassification.from_pretrained(full_artifact, file_name=name)(**enc).logits
        assert logits.shape == (2, 3)
        ref = logits if ref is None else ref
        assert torch.allclose(logits, ref, atol=0.05)


# ----------------------------------------------------------------------------- fused-head check


def test_fused_head_check_catches_a_global_head_count(root, dense):
    """ORT's fallback puts the dense head count (4) on a layer that keeps 2: width 16 is divisible by 4,
    so the graph runs and gives wrong logits. The check must see it and set it right."""
    import onnxruntime as ort

    keep = [[1, 3], [0, 1, 2], [2]]
    model_dir = _pruned(dense["bert"], keep, root / "pruned-headcheck")
    art = export(model_dir, root / "art-headcheck", optimize=False, measure=False)
    fused = ortopt.build_candidate(art / "model.onnx", "no_skip_layernorm", "bert")
    nodes = ortopt.check_attention_heads(fused, [2, 3, 1], head_dim=8, correct=False)
    assert [(n.layer, n.num_heads_found) for n in nodes] == [(0, 2), (1, 3), (2, 1)]

    layer0 = next(n for n in fused.graph.node if n.op_type == "Attention")
    next(a for a in layer0.attribute if a.name == "num_heads").i = 4  # the global fallback
    m = load_manifest(art)
    feeds = [{k: np.asarray(v) for k, v in f.items()} for f in m["smoke"]["inputs"]]
    ref = np.asarray(m["smoke"]["logits"])
    wrong = parity.ort_logits(ort.InferenceSession(fused.SerializeToString()), feeds)
    assert np.abs(wrong - ref).max() > 1e-3  # it runs, silently wrong

    with pytest.raises(ortopt.FusionCheckError, match="num_heads=4, the layer keeps 2"):
        ortopt.check_attention_heads(fused, [2, 3, 1], head_dim=8, correct=False)
    nodes = ortopt.check_attention_heads(fused, [2, 3, 1], head_dim=8, correct=True)
    assert [n.corrected for n in nodes] == [True, False, False]
    right = parity.ort_logits(ort.InferenceSession(fused.SerializeToString()), feeds)
    assert np.abs(right - ref).max() <= parity.FP32_ATOL

    with pytest.raises(ortopt.FusionCheckError, match="3 fused attention nodes for 4 layers with heads"):
        ortopt.check_attention_heads(fused, [2, 3, 1, 1], head_dim=8)  # a layer left unfused
    with pytest.raises(ortopt.FusionCheckError, match="Attention_2 sits in layer 2, graph order says layer 3"):
        ortopt.check_attention_heads(fused, [2, 3, 0, 1], head_dim=8)  # order and parameter names disagree
    with pytest.raises(ortopt.FusionCheckError, match="packs Q/K/V 16 wide"):
        ortopt.check_attention_heads(fused, [4, 3, 1], head_dim=8)  # wrong width, not correctable


# ----------------------------------------------------------------------------- the SkipLayerNorm fix and the choice


def test_residual_sum_keeps_ort_session_from_fusing_skip_layernorm(root, full_artifact):
    """The optimized graph must stay free of SkipLayerNormalization after ORT's own session
    fusions (its float CPU kernel is the measured regression)."""
    import onnxruntime as ort

    def session_ops(model: onnx.ModelProto, name: str) -> set[str]:
        path = root / f"{name}.onnx"
        onnx.save(model, str(path))
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(root / f"{name}.session.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}

    fused = ortopt.build_candidate(full_artifact / "model.onnx", "no_skip_layernorm", "bert")
    assert {n.op_type for n in fused.graph.node} >= {"Attention", "Sum", "LayerNormalization"}
    undone = onnx.ModelProto()
    undone.CopyFrom(fused)
    for n in undone.graph.node:  # undo the Sum rewrite: turning the Python fusion off alone is not enough
        if n.op_type == "Sum":
            n.op_type = "Add"
    assert "SkipLayerNormalization" in session_ops(undone, "undone")
    ops = session_ops(fused, "fused")
    assert "SkipLayerNormalization" not in ops and "Attention" in ops


def test_choose_never_picks_a_candidate_slower_than_unfused():
    t = {
        "unfused": {"b1x128": 10.0, "b32x128": 300.0},
        "ort_default": {"b1x128": 11.0, "b32x128": 250.0},  # faster overall, slower at b1
        "no_skip_layernorm": {"b1x128": 9.5, "b32x128": 280.0},
    }
    assert ortopt.choose(t)[0] == "no_skip_layernorm"
    t["no_skip_layernorm"]["b32x128"] = 301.0
    choice, scores = ortopt.choose(t)
    assert choice == "unfused" and scores["ort_default"] is None and scores["unfused"] == 1.0


def test_optimize_measures_interleaved_and_records_the_choice(full_artifact, tmp_path):
    res = ortopt.optimize(
        full_artifact / "model.onnx", tmp_path / "opt.onnx", tmp_path / "cand", onnx_model_type="bert",
        heads_per_layer=[4, 4, 4], head_dim=8, vocab_size=30522, measure=True, budget_s=0.5,
    )
    rec = res.record
    assert rec["measured"] and set(rec["timings_ms"]) == {"unfused", "ort_default", "no_skip_layernorm"}
    assert all(set(t) == {"b1x128", "b32x128"} for t in rec["timings_ms"].values())
    assert rec["choice"] == ortopt.choose(rec["timings_ms"])[0]
    assert (tmp_path / "opt.onnx").read_bytes() == res.candidates[rec["choice"]].read_bytes()


def test_a_rejected_fusion_is_not_shipped(full_artifact, tmp_path, monkeypatch):
    """A fused graph failing the head check is never the optimized artifact: the plain graph is, and why."""
    def reject(*a, **kw):
        raise ortopt.FusionCheckError("fused node Attention_0 (layer 0) packs Q/K/V 32 wide, expected 2 heads x 8")

    monkeypatch.setattr(ortopt, "check_attention_heads", reject)
    res = ortopt.optimize(
        full_artifact / "model.onnx", tmp_path / "opt.onnx", tmp_path / "cand", onnx_model_type="bert",
        heads_per_layer=[4, 4, 4], head_dim=8, vocab_size=30522, measure=True,
    )
    assert res.choice == "unfused" and set(res.record["rejected"]) == {"ort_default", "no_skip_layernorm"}
    assert "rejected by the head-count check" in res.record["reason"]
    assert (tmp_path / "opt.onnx").read_bytes() == (full_artifact / "model.onnx").read_bytes()


@pytest.mark.parametrize("arch,usable", [("bert", 64), ("roberta", 63)])
def test_short_position_table_export_times_and_tunes_within_it(root, arch, usable):
    """max_position_embeddings=64: timing, INT8 tuning and parity feeds must stay inside the table
    (RoBERTa's positions start after its pad id 0, so 63 tokens), never the 128 the defaults use."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = tiny_config(arch, layers=2, heads=2)
    cfg.max_position_embeddings = 64
    torch.manual_seed(0)
    model_dir = root / f"short-{arch}"
    AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval().save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(model_dir)

    art = export(model_dir, root / f"art-short-{arch}", optimize=True, measure=True, quantize="int8", per_channel=False)
    m = load_manifest(art)
    opt = m["variants"]["optimized"]
    assert opt["measured"] and opt["timing_shapes"] == [f"b1x{usable}", f"b32x{usable}"]
    assert all(set(t) == {f"b1x{usable}", f"b32x{usable}"} for t in opt["timings_ms"].values())
    assert set(m["variants"]["int8"]["timings_ms"]["int8"]) == {f"b1x{usable}", f"b32x{usable}"}
    assert max(s for _, s in m["variants"]["int8"]["tuning"]["data"]["shapes"]) == usable
    # INT8's source: the candidate whose INT8 graph ran fastest, timed within the table too
    src = m["variants"]["int8"]["source_choice"]
    assert src["measured"] and src["timing_shapes"] == [f"b1x{usable}", f"b32x{usable}"]
    assert set(src["timings_ms"]) == set(opt["timings_ms"])
    assert src["source"] == ortopt.choose(src["timings_ms"], baseline=opt["choice"])[0]
    expected = ("optimized" if src["source"] == opt["choice"] else "fp32" if src["source"] == "unfused"
                else f"fusion candidate {src['source']}")
    assert m["variants"]["int8"]["source"] == expected


def test_int8_source_is_timed_as_int8(full_artifact, tmp_path):
    """Each fusion candidate quantized (every weight MatMul INT8) and timed; without timing, the fp32 choice."""
    res = ortopt.optimize(
        full_artifact / "model.onnx", tmp_path / "opt.onnx", tmp_path / "cand", onnx_model_type="bert",
        heads_per_layer=[4, 4, 4], head_dim=8, vocab_size=30522, measure=False,
    )
    name, rec = ortopt.choose_int8_source(res.candidates, res.choice, tmp_path / "cand", measure=True,
                                          vocab_size=30522, budget_s=0.5)
    assert rec["measured"] and set(rec["timings_ms"]) == set(res.candidates) and name == rec["source"]
    assert name == ortopt.choose(rec["timings_ms"], baseline=res.choice)[0]
    probes = {p.name for p in (tmp_path / "cand").glob("*_int8_probe.onnx")}
    assert probes == {f"{n}_int8_probe.onnx" for n in res.candidates}
    assert ortopt.choose_int8_source(res.candidates, res.choice, tmp_path / "cand", measure=False) == (
        res.choice, {"source": res.choice, "measured": False, "reason": "the fp32 choice (INT8 sources not timed: "
                                                                         "measure=False)"})


# ----------------------------------------------------------------------------- bad input


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_inputs_fail_in_one_line_and_write_nothing(root, dense, tmp_path, capsys):
    out = tmp_path / "art"
    bert = str(dense["bert"])
    assert "does not exist" in _cli_error(["export", str(tmp_path / "nope"), "--out", str(out)], capsys)
    (tmp_path / "empty").mkdir()
    assert "not a Hugging Face model directory" in _cli_error(["export", str(tmp_path / "empty"), "--out", str(out)], capsys)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    assert "unsupported architecture 'gpt2'" in _cli_error(["export", str(gpt2), "--out", str(out)], capsys)

    for opset in ("9", "99"):
        assert f"--opset {opset} cannot be exported" in _cli_error(["export", bert, "--out", str(out), "--opset", opset], capsys)
    assert "CUDAExecutionProvider" in _cli_error(["export", bert, "--out", str(out), "--fp16", "--provider", "cuda"], capsys)
    assert "--per-channel" in _cli_error(["export", bert, "--out", str(out), "--quantize", "none", "--per-channel"],
                                         capsys)
    assert _nothing_written(out)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists; pass --force" in _cli_error(["export", bert, "--out", str(out)], capsys)
    assert (out / "keep.txt").read_text() == "mine"


def test_fp16_without_a_way_to_check_it_fails(root, dense, tmp_path, monkeypatch):
    """No provider can run the fp16 graph (an op without fp16 kernel): refuse to ship it unchecked."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def no_fp16_kernels(path, *a, **kw):
        if str(path).endswith("model_fp16.onnx"):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for MatMul(13) node")
        return real(path, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", no_fp16_kernels)
    out = tmp_path / "art"
    with pytest.raises(CahpError, match="cannot run the fp16 graph, so it cannot be checked"):
        export(dense["distilbert"], out, optimize=False, fp16=True, measure=False)
    assert _nothing_written(out)


def test_failed_parity_writes_nothing(dense, tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "FP32_ATOL", -1.0)
    out = tmp_path / "art"
    with pytest.raises(CahpError, match="parity check failed for fp32 on random inputs"):
        export(dense["roberta"], out, optimize=False, measure=False)
    assert _nothing_written(out)


def test_parity_on_the_first_rows_only(dense, tmp_path):
    """`run --eval-max-examples N` checks parity on the rows bench scores, not the whole split."""
    data = write_tiny_data(tmp_path / "data")
    art = export(dense["bert"], tmp_path / "art", data=data, split="validation", max_examples=7, measure=False)
    m = load_manifest(art)
    assert m["parity_data"]["num_examples"] == 7 and m["variants"]["fp32"]["parity"]["on"] == "data"
