"""The torch.onnx exporter: Optimum's graph contract without Optimum, on transformers 4.x and 5.x.

Every case exports a pruned tiny model (random heads *and* FFN neurons, one layer with no head) with
``exporter="torch"`` and checks what the Optimum path promises: input/output names and dynamic axes,
parity <= 1e-4 on every variant, and per layer one fused ``Attention`` with that layer's head count,
plus SkipLayerNormalization, BiasGelu and EmbedLayerNormalization in the ``ort_default`` candidate.
Where Optimum is usable (the pinned lane), the two exporters' graphs are compared node for node.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.export import export, load_manifest, onnx_export, parity, variant_path
from cahp_deploy.export.torch_export import pin_head_counts
from cahp_deploy.pruning import prune
from cahp_deploy.selection.result import Selection
from conftest import cli, save_strong_model, tiny_config, tokenizer_dir

LAYERS, HEADS = 3, 4
INTERMEDIATE = 2 * HEADS * 8  # conftest's tiny models: hidden = heads * 8, FFN = 2 * hidden
OPTIMUM = onnx_export.optimum_unusable() is None


def _strong_model(arch_name: str, out: Path, seed: int = 3) -> Path:
    return save_strong_model(arch_name, out, seed, layers=LAYERS, heads=HEADS)


def _pattern(arch_name: str) -> tuple[list[list[int]], list[list[int]]]:
    """Random kept heads (one layer none, one layer 2 of 4) and random kept neurons (one layer 1)."""
    rng = random.Random(f"{arch_name}-torch-export")
    counts = [0, 2, rng.randint(1, HEADS)]
    rng.shuffle(counts)
    heads = [sorted(rng.sample(range(HEADS), c)) for c in counts]
    widths = [1, rng.randint(2, INTERMEDIATE - 1), INTERMEDIATE]
    rng.shuffle(widths)
    neurons = [sorted(rng.sample(range(INTERMEDIATE), w)) for w in widths]
    return heads, neurons


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_torch")


@pytest.fixture(scope="module")
def pruned(root) -> dict[str, Path]:
    out = {}
    for a in ("bert", "roberta", "distilbert", "electra"):
        dense = _strong_model(a, root / f"dense-{a}")
        heads, neurons = _pattern(a)
        sel = Selection(method="manual", kept_heads=heads, num_heads_total=LAYERS * HEADS, heads_per_layer=HEADS,
                        kept_neurons=neurons, neurons_per_layer=INTERMEDIATE)
        out[a] = prune(dense, sel, root / f"pruned-{a}")
    return out


def _counts(m: dict, candidate: str) -> dict[str, int]:
    return m["variants"]["optimized"]["candidates"][candidate]["op_counts"]


@pytest.mark.parametrize("arch_name", ["bert", "roberta", "distilbert", "electra"])
def test_torch_export_contract_parity_and_fusions_per_layer(root, pruned, arch_name):
    heads, neurons = _pattern(arch_name)
    art = export(pruned[arch_name], root / f"art-{arch_name}", measure=False, exporter="torch")
    m = load_manifest(art)
    assert m["exporter"] == {"name": "torch", "why": "asked for (--exporter torch)"}
    assert m["kept_heads"] == heads and m["kept_neurons"] == neurons
    assert m["opset"] == onnx_export.DEFAULT_OPSET and m["attn_implementation"] == arch.export_attention(
        tiny_config(arch_name))

    # the graph contract: inputs (int64, dynamic batch/sequence), one logits output (dynamic batch)
    graph = onnx.load(str(variant_path(art, "fp32"))).graph
    expected_inputs = list(arch.spec_for(tiny_config(arch_name)).onnx_inputs)
    assert [i.name for i in graph.input] == expected_inputs == m["input_names"]
    for i in graph.input:
        assert i.type.tensor_type.elem_type == TensorProto.INT64
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    (out,) = graph.output
    assert out.name == "logits" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch_size", 3]

    for v in ("fp32", "optimized"):
        p = m["variants"][v]["parity"]
        assert p["passed"] and p["max_abs_diff"] <= parity.FP32_ATOL and p["argmax_agreement"] == 1.0

    # per layer: one fused Attention with that layer's head count, in the chosen and the full candidate
    opt = m["variants"]["optimized"]
    live = [i for i, k in enumerate(heads) if k]
    assert [(a["layer"], a["num_heads"]) for a in opt["attention"]] == [(i, len(heads[i])) for i in live]
    assert not any(a["corrected"] for a in opt["attention"])
    full = _counts(m, "ort_default")
    assert full["Attention"] == len(live)
    assert full["SkipLayerNormalization"] >= 2 * LAYERS - 1  # RoBERTa/ELECTRA's first one stays a LayerNorm
    assert full.get("BiasGelu", 0) + full.get("FastGelu", 0) == LAYERS
    # EmbedLayerNormalization: where Optimum's graph gets it too: not RoBERTa (its position ids are a
    # CumSum), and only when layer 0 keeps a head (ORT fuses it with the first Attention's mask)
    assert full.get("EmbedLayerNormalization", 0) == int(arch_name != "roberta" and bool(heads[0]))
    assert "SkipLayerNormalization" not in _counts(m, "no_skip_layernorm")


@pytest.mark.skipif(not OPTIMUM, reason="optimum-onnx is not usable with this transformers (the pinned lane compares)")
@pytest.mark.parametrize("arch_name", ["bert", "distilbert"])
def test_torch_and_optimum_write_the_same_graph(root, pruned, arch_name):
    """Same pruned model, both exporters: same inputs, outputs, opset, node sequence and outputs."""
    import onnxruntime as ort
    from transformers import AutoConfig

    arts = {ex: export(pruned[arch_name], root / f"same-{arch_name}-{ex}", measure=False, exporter=ex)
            for ex in ("torch", "optimum")}
    ms = {ex: load_manifest(a) for ex, a in arts.items()}
    assert ms["optimum"]["exporter"]["name"] == "optimum"
    for key in ("input_names", "opset", "attn_implementation"):
        assert ms["torch"][key] == ms["optimum"][key]
    assert _counts(ms["torch"], "ort_default") == _counts(ms["optimum"], "ort_default")
    graphs = {ex: onnx.load(str(variant_path(a, "fp32"))).graph for ex, a in arts.items()}
    assert [n.op_type for n in graphs["torch"].node] == [n.op_type for n in graphs["optimum"].node]
    assert [i.name for i in graphs["torch"].input] == [i.name for i in graphs["optimum"].input]
    feeds = parity.random_feeds(ms["torch"]["input_names"], AutoConfig.from_pretrained(arts["torch"]))
    outs = {ex: parity.ort_logits(ort.InferenceSession(str(variant_path(a, "optimized")),
                                                       providers=["CPUExecutionProvider"]), feeds)
            for ex, a in arts.items()}
    assert np.abs(outs["torch"] - outs["optimum"]).max() <= 1e-5


def test_cli_exporter_option_is_recorded(root, pruned):
    out = root / "cli-art"
    code, stdout, stderr = cli("export", pruned["bert"], "--out", out, "--exporter", "torch", "--no-timing",
                               "--no-optimize")
    assert code == 0, stderr
    assert stdout.strip().endswith("[exporter: torch]")
    assert load_manifest(out)["exporter"]["name"] == "torch"
    code, _, stderr = cli("export", pruned["bert"], "--out", root / "cli-bad", "--exporter", "onnxmltools")
    assert code == 2 and "--exporter" in stderr


# ----------------------------------------------------------------------------- choosing the exporter


def test_auto_falls_back_to_torch_with_the_reason(monkeypatch):
    monkeypatch.setattr(onnx_export, "optimum_unusable", lambda: "optimum-onnx is not installed")
    assert onnx_export.resolve_exporter("auto") == ("torch", "auto: optimum-onnx is not installed")
    assert onnx_export.resolve_exporter("torch")[0] == "torch"
    with pytest.raises(CahpError, match=r"--exporter optimum cannot run: optimum-onnx is not installed; .*\[optimum\]"):
        onnx_export.resolve_exporter("optimum")
    with pytest.raises(CahpError, match="--exporter 'tf2onnx' is not one of auto, optimum, torch"):
        onnx_export.resolve_exporter("tf2onnx")


def test_auto_picks_optimum_only_where_its_transformers_range_holds(monkeypatch):
    """optimum-onnx 0.1.0 declares transformers<4.58: with a 5.x transformers auto must not take it."""
    pytest.importorskip("optimum.exporters.onnx")
    from importlib import metadata

    real = metadata.version
    assert onnx_export.optimum_unusable() is None or real("transformers").startswith("5.")
    monkeypatch.setattr(metadata, "version", lambda name: "5.25.0" if name == "transformers" else real(name))
    why = onnx_export.optimum_unusable()
    if why is not None:  # a later optimum-onnx may support 5.x; then there is nothing to refuse
        assert why.startswith("optimum-onnx ") and "installed is 5.25.0" in why
        assert onnx_export.resolve_exporter("auto")[0] == "torch"


# ----------------------------------------------------------------------------- the head-count rewrite


def _projection_reshape(width: int, head_dim: int, heads_value: int) -> onnx.ModelProto:
    """x (B,S,8) -> MatMul(W 8 x width) -> Add(b) -> Reshape(Concat(B, S, heads_value, head_dim))."""
    w = numpy_helper.from_array(np.ones((8, width), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(width, np.float32), "b")
    consts = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
              (("B", 2), ("S", 5), ("heads", heads_value), ("d", head_dim))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="q/MatMul"),
        helper.make_node("Add", ["mm", "b"], ["q"], name="q/Add"),
        helper.make_node("Concat", ["B", "S", "heads", "d"], ["shape"], axis=0, name="Concat"),
        helper.make_node("Reshape", ["q", "shape"], ["y"], name="Reshape"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", "N", "D"])], [w, b, *consts])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _heads_in_shape(model: onnx.ModelProto) -> int:
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return int(init[concat.input[2]][0])


def test_pin_head_counts_replaces_minus_one_by_width_over_head_dim():
    # width 24, head_dim 8 -> 3 heads (a pruned layer's width: the -1 resolves to exactly this)
    model = _projection_reshape(24, 8, -1)
    assert pin_head_counts(model) == 1 and _heads_in_shape(model) == 3
    assert "heads" not in {t.name for t in model.graph.initializer}  # the dead -1 is removed
    onnx.checker.check_model(model)
    # already a count (transformers 4.x): untouched
    model = _projection_reshape(24, 8, 3)
    assert pin_head_counts(model) == 0 and _heads_in_shape(model) == 3
    # width not a multiple of head_dim: not a head reshape, untouched
    model = _projection_reshape(20, 8, -1)
    assert pin_head_counts(model) == 0 and _heads_in_shape(model) == -1


# ----------------------------------------------------------------------------- `run --no-recover`


def test_run_no_recover_end_to_end(tiny_models, tiny_data, tmp_path):
    """`run --no-recover` on a tiny model: select, prune, export (auto exporter), bench, summary."""
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        "run", tiny_models["bert"], "--data", tiny_data, "--out", out, "--no-recover", "--method", "random",
        "--heads", "6", "--batch", "1", "--seq", "16", "--min-seconds", "0.01", "--min-reps", "2", "--warmup", "1",
        "--no-traffic", "--no-timing", "--variant", "optimized",
    )
    assert code in (0, 3), stderr  # 3: the promise could not be confirmed on 30 tiny rows (not an error)
    assert (out / "summary.md").is_file()
    manifests = sorted(out.rglob("manifest.json"))
    assert len(manifests) == 2  # dense and pruned artifacts
    expected = onnx_export.resolve_exporter("auto")[0]
    assert {load_manifest(m.parent)["exporter"]["name"] for m in manifests} == {expected}
