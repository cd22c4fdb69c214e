"""The rewriter: pruned logits equal the gated dense model's, for ragged and zero-head layouts.

Tiny models get re-drawn weights (std 0.3) so that one head moves the logits by ~0.1: with the
default 0.02 init a head is worth ~5e-5, too close to the 1e-5 tolerance for the test to have teeth.
"""

from __future__ import annotations

import copy
import json
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import head_mask
from cahp_deploy.modeling import count_parameters
from cahp_deploy.pruning import load_pruned, prune_model
from cahp_deploy.pruning import costs
from conftest import ARCHS, build_tiny_model, tiny_config

LAYERS, HEADS = 3, 4
ATOL = 1e-5


def _strong_tiny_model(name: str):
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(name, layers=LAYERS, heads=HEADS)
    config.vocab_size = 2048  # token ids below are < 2000; a small table keeps deep copies cheap
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {a: _strong_tiny_model(a) for a in ARCHS}


@pytest.fixture(scope="module")
def batch():
    """2 x 9 tokens, the second row padded (pad id 0) after 6 tokens."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 2000, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, 6:], mask[1, 6:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _gated_logits(model, keep, batch):
    with head_mask(model, keep):
        return model(**batch).logits


@torch.no_grad()
def _logits(model, batch):
    return model(**batch).logits


layouts = st.lists(st.sets(st.integers(0, HEADS - 1)), min_size=LAYERS, max_size=LAYERS).map(
    lambda layers: [sorted(s) for s in layers]
).filter(lambda kept: sum(map(len, kept)) > 0)

_EDGE_CASES = [
    [[2], [], []],  # one head in total
    [[], [], [0]],
    [[0, 1, 2, 3], [], [0, 1, 2, 3]],  # a zero-head layer between dense ones
    [[3], [0, 2], [1, 2, 3]],  # ragged, every layer >= 1
]


def _with_edge_cases(test):
    for kept in _EDGE_CASES:
        test = example(kept=kept)(test)
    return test


@pytest.mark.parametrize("name", ARCHS)
def test_pruned_equals_gated_dense(models, batch, name):
    dense = models[name]
    seen = {"zero_layer": 0, "one_head": 0}

    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.filter_too_much])
    @given(kept=layouts)
    @_with_edge_cases
    def check(kept):
        pruned = prune_model(copy.deepcopy(dense), kept)
        assert arch.heads_per_layer(pruned) == [len(k) for k in kept]
        diff = (_logits(pruned, batch) - _gated_logits(dense, kept, batch)).abs().max().item()
        assert diff <= ATOL, f"{kept}: max |diff| {diff}"
        seen["zero_layer"] += any(len(k) == 0 for k in kept)
        seen["one_head"] += sum(map(len, kept)) == 1

    check()
    assert seen["zero_layer"] >= 10 and seen["one_head"] >= 1, seen


def test_removing_heads_changes_logits(models, batch):
    """The parity above is not vacuous: gating heads off moves these models' logits a lot."""
    for name, dense in models.items():
        moved = (_gated_logits(dense, [[0], [], [1, 2]], batch) - _logits(dense, batch)).abs().max().item()
        assert moved > 1e-2, name


@pytest.mark.parametrize("name", ARCHS)
def test_save_load_pruned_round_trip(models, batch, name):
    dense = models[name]

    @settings(max_examples=12, deadline=None, database=None, derandomize=True)
    @given(kept=layouts)
    @example(kept=[[1], [], [0, 3]])
    def check(kept):
        pruned = prune_model(copy.deepcopy(dense), kept)
        with tempfile.TemporaryDirectory() as d:
            pruned.save_pretrained(d)
            config = json.loads(open(f"{d}/config.json").read())
            reloaded = load_pruned(d)
        assert config["cahp_kept_heads"] == kept and config["cahp_dense_heads"] == HEADS
        assert not reloaded.training and next(reloaded.parameters()).dtype == torch.float32
        assert torch.equal(_logits(reloaded, batch), _logits(pruned, batch))
        assert reloaded.config.cahp_kept_heads == kept

    check()


@pytest.mark.skipif(not arch.transformers_row().hf_pruned_heads,
                    reason="transformers 5.x has no pruned_heads: load_pruned is the only loader")
@pytest.mark.parametrize("name", ARCHS)
def test_plain_from_pretrained_reloads_when_every_layer_keeps_a_head(models, batch, name, tmp_path):
    from transformers import AutoModelForSequenceClassification

    kept = [[3], [0, 2], [1, 2, 3]]
    pruned = prune_model(copy.deepcopy(models[name]), kept)
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pruned_heads"] == {"0": [0, 1, 2], "1": [1, 3], "2": [0]}
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(_logits(plain, batch), _logits(pruned, batch))


def test_zero_head_layer_writes_no_pruned_heads(models, tmp_path):
    pruned = prune_model(copy.deepcopy(models["bert"]), [[0], [], [1]])
    pruned.save_pretrained(tmp_path)
    assert not json.loads((tmp_path / "config.json").read_text()).get("pruned_heads")


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_zero_head_layer_returns_empty_attentions(models, batch, name):
    pruned = prune_model(copy.deepcopy(models[name]), [[1, 2], [], [0]])
    with torch.no_grad():
        att = pruned(**batch, output_attentions=True).attentions
    # 4.x returns the zero-head module's empty maps; 5.x skips the layer (arch.attentions_per_layer)
    assert len(att) in (2, 3)
    att = arch.attentions_per_layer(pruned, att, batch["attention_mask"])
    assert [tuple(a.shape) for a in att] == [(2, 2, 9, 9), (2, 0, 9, 9), (2, 1, 9, 9)]


def test_pruned_model_is_trainable(models, batch):
    """Recovery fine-tunes the pruned model: dropout runs and gradients reach zero-head layers."""
    pruned = prune_model(copy.deepcopy(models["bert"]), [[0], [], [2, 3]]).train()
    pruned(**batch, labels=torch.tensor([0, 1])).loss.backward()
    empty = arch.get_path(arch.layers(pruned)[1], arch.spec_for(pruned).attention_block)
    assert empty.bias.grad is not None and empty.bias.grad.abs().sum() > 0


def test_parameter_count_matches_the_accounting(models):
    for name, dense in models.items():
        kept = [[0, 3], [], [1]]
        before = count_parameters(dense)
        after = count_parameters(prune_model(copy.deepcopy(dense), kept))
        assert before - after == costs.params_removed(dense.config, kept), name


def test_macs_by_hand():
    # one layer, h=2 heads of d=8, H=32, I=64, S=128:
    # attention 4*128*32*16 + 2*2*128*128*8 = 262144 + 524288; ffn 2*128*32*64 = 524288
    assert costs.layer_macs(2, 8, 32, 64, 128) == (786432, 524288)
    config = build_tiny_model("bert", layers=3, heads=4).config
    c = costs.pruning_costs(config, [[0, 1], [], [0, 1, 2, 3]], 10, 5)
    m = c["macs_seq128"]
    full = costs.layer_macs(4, 8, 32, 64)[0]
    assert m["attention_before"] == 3 * full
    assert m["attention_after"] == 786432 + 0 + full
    assert m["ffn_before"] == m["ffn_after"] == 3 * 524288
    assert c["flop_ceiling_speedup"] == pytest.approx(m["total_before"] / m["total_after"])
    assert c["flop_ceiling_speedup"] > 1


@pytest.mark.parametrize(
    "kept, message",
    [
        ([[0], [1]], "has 2 layers but the model has 3"),
        ([[0], [4], []], r"head\(s\) \[4\] out of range"),
        ([[0, 0], [1], []], r"head\(s\) \[0\] more than once"),
        ([[], [], []], "keeps no head in any layer"),
        ([[0.5], [], []], "integer head indices"),
    ],
)
def test_prune_model_rejects_bad_layouts(models, kept, message):
    with pytest.raises(CahpError, match=message):
        prune_model(copy.deepcopy(models["bert"]), kept)


def test_prune_model_refuses_a_pruned_model(models):
    pruned = prune_model(copy.deepcopy(models["bert"]), [[0], [1], [2]])
    with pytest.raises(CahpError, match="already pruned"):
        prune_model(pruned, [[0], [0], [0]])


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_pruned_model_exports_to_onnx_with_dynamic_shapes(models, name, tmp_path):
    """Plain tensor ops only: the traced graph holds for other batch sizes and lengths."""
    ort = pytest.importorskip("onnxruntime")
    pruned = prune_model(copy.deepcopy(models[name]), [[0, 2], [], [3]])
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    axes = {0: "batch", 1: "sequence"}
    path = tmp_path / "model.onnx"
    torch.onnx.export(pruned, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": axes, "attention_mask": axes},
                      opset_version=17, dynamo=False)
    ids2 = torch.randint(1000, 2000, (3, 13))
    mask2 = torch.ones_like(ids2)
    mask2[2, 5:] = 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()})[0]
    want = _logits(pruned, {"input_ids": ids2, "attention_mask": mask2}).numpy()
    assert abs(got - want).max() < 1e-4
