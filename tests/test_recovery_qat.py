"""Quantization-aware recovery: the simulated rounding is ONNX Runtime's, and the exported INT8 graph
computes what the QAT model computed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cahp_deploy.export import export, load_manifest, parity, variant_path
from cahp_deploy.export.int8 import quantize as quant
from cahp_deploy.export.int8 import tuning as int8_tuning
from cahp_deploy.modeling import load_classifier
from cahp_deploy.pruning import prune
from cahp_deploy.recovery import recover
from cahp_deploy.recovery.qat import fake_quant_activation, fake_quant_weight, simulated_int8
from cahp_deploy.selection.result import Selection


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return int8_tuning.session(model).run(None, feeds)[0]


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-3, 3), scale=st.floats(0.01, 50), seed=st.integers(0, 2**16))
def test_activation_fake_quant_is_dynamic_quantize_linear(shift, scale, seed):
    x = (np.random.default_rng(seed).normal(shift, 1.0, (4, 7, 16)) * scale).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
    )
    want = _ort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})
    got = fake_quant_activation(torch.from_numpy(x)).numpy()
    step = (max(x.max(), 0) - min(x.min(), 0)) / 255
    assert np.abs(got - want).max() <= 1e-4 * step + 1e-7  # same levels: at most float rounding apart


@pytest.mark.parametrize("per_channel", [True, False])
def test_linear_under_simulation_equals_ort_dynamic_int8(per_channel, tmp_path):
    """A Linear with an outlier input channel, simulated in torch vs quantize_dynamic in ONNX Runtime."""
    rng = np.random.default_rng(0)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.mul_(torch.from_numpy(rng.uniform(0.1, 3, (24, 1)).astype(np.float32)))  # rows of unequal range
    x = rng.normal(0, 1, (3, 5, 32)).astype(np.float32)
    x[..., 0] *= 20
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 24])],
        initializer=[numpy_helper.from_array(w.T.copy(), "w"), numpy_helper.from_array(b, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    quant.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", per_channel=per_channel)
    want = _ort(onnx.load(str(tmp_path / "q.onnx")), {"x": x})
    plain = lin(torch.from_numpy(x)).detach().numpy()
    with simulated_int8(lin, per_channel=per_channel):
        got = lin(torch.from_numpy(x)).detach().numpy()
    err_sim, err_fp32 = np.abs(got - want).max(), np.abs(plain - want).max()
    assert err_sim <= 1e-4 and err_fp32 > 100 * err_sim  # the simulation is the INT8 graph, not fp32


def test_straight_through_gradients_and_restored_forward():
    x = torch.randn(6, 8, requires_grad=True)
    fake_quant_activation(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    w = torch.randn(4, 8, requires_grad=True)
    fake_quant_weight(w).pow(2).sum().backward()
    assert torch.allclose(w.grad, 2 * fake_quant_weight(w.detach()))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = model(x).detach()
    with simulated_int8(model) as names:
        assert names == ["0", "2"] and not torch.equal(model(x).detach(), before)
    assert torch.equal(model(x).detach(), before) and "forward" not in vars(model[0])
    assert fake_quant_weight(torch.zeros(0, 8)).shape == (0, 8)  # a projection pruned to nothing


def test_recover_qat_then_export_matches_the_simulated_model(tiny_models, tiny_data, tmp_path):
    """recover --qat records it and measures the simulated INT8 accuracy; export picks the granularity
    the model trained for, and its INT8 graph (every MatMul quantized) is the simulated model."""
    sel = Selection(method="random", kept_heads=[[0, 2], [1, 3], [1]], num_heads_total=12, heads_per_layer=4)
    pruned = prune(tiny_models["bert"], sel, tmp_path / "pruned")
    record = recover(pruned, tiny_data, tmp_path / "rec", eval_split="validation", epochs=3, lr=3e-3, batch_size=8,
                     freeze_embeddings=False, progress=False, qat=True)
    assert record["params"]["qat"] is True and record["params"]["qat_per_channel"] is True
    assert 0.0 <= record["accuracy_after_int8"] <= 1.0
    assert json.loads((tmp_path / "rec" / "recovery.json").read_text())["params"]["qat"] is True

    art = export(tmp_path / "rec", tmp_path / "art", quantize="int8", data=tiny_data, measure=False,
                 int8_min_agreement=0.0)  # accept any mix: this test compares the graph, not the gate
    v = load_manifest(art)["variants"]["int8"]
    assert v["quantization_aware"] is True and v["per_channel"] is True
    assert v["tuning"]["per_channel_chosen_by"].startswith("quantization-aware recovery")
    assert v["excluded_nodes"] == []  # a gate of 0 keeps everything INT8
    assert v["gate"]["result"]["reference"] == "pytorch fp32"  # the gate is always vs the model's own fp32 graph
    match = v["qat_match"]  # export's own check: the graph is the simulated model, not the fp32 one
    assert match["vs_simulated_int8"]["mean_abs_diff"] < 0.25 * match["vs_fp32"]["mean_abs_diff"]

    from cahp_deploy.data import load_labelled
    from transformers import AutoConfig

    model, tokenizer = load_classifier(tmp_path / "rec", attn_implementation="eager")
    feeds, _ = parity.data_feeds(tokenizer, load_labelled(tiny_data, "validation"), load_manifest(art)["input_names"],
                                 AutoConfig.from_pretrained(art))
    got = parity.ort_logits(int8_tuning.session(variant_path(art, "int8")), feeds)
    with simulated_int8(model, per_channel=True):
        want = parity.torch_logits(model, feeds)
    fp32 = parity.torch_logits(model, feeds)
    assert np.abs(got - want).max() < 0.25 * np.abs(fp32 - want).max() + 1e-3  # much closer to the simulation
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
