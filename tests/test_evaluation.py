"""evaluation: bucketed batching must not reorder predictions; gated accuracy equals pruned accuracy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cahp_deploy import arch, evaluation
from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import head_mask
from cahp_deploy.modeling import load_classifier
from cahp_deploy.pruning import prune_model
from cahp_deploy.signals import model_inputs


@pytest.fixture(scope="module")
def val(tiny_data):
    return load_labelled(tiny_data, "validation")


@pytest.fixture(scope="module")
def strong(tiny_models):
    """{arch: (model, tokenizer)} with weights large enough that every head moves the logits."""
    out = {}
    for name in ("bert", "distilbert"):
        model, tok = load_classifier(tiny_models[name])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out[name] = (model.eval(), tok)
    return out


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_logits_are_in_data_order(name, strong, val):
    model, tok = strong[name]
    got = evaluation.logits(model, tok, val, batch_size=7)
    with torch.no_grad():
        for i in (0, 5, 17, len(val) - 1):  # one example at a time: no padding, no reordering
            enc = tok([val.texts[i]], return_tensors="pt")
            ref = model(**model_inputs(model, dict(enc))).logits[0].numpy()
            np.testing.assert_allclose(got[i], ref, atol=1e-5)
    pred = evaluation.predictions(model, tok, val, batch_size=7)
    np.testing.assert_array_equal(pred, got.argmax(1))
    assert evaluation.accuracy(model, tok, val, batch_size=7) == pytest.approx(float((pred == val.labels).mean()))


def test_masked_accuracy_equals_physically_pruned(strong, val):
    model, tok = strong["bert"]
    keep = [[1], [], [0, 3]]
    pruned = prune_model(copy.deepcopy(model), keep)
    with head_mask(model, keep):
        gated_logits = evaluation.logits(model, tok, val)
    np.testing.assert_allclose(gated_logits, evaluation.logits(pruned, tok, val), atol=1e-5)
    assert evaluation.masked_accuracy(model, tok, val, keep) == evaluation.accuracy(pruned, tok, val)
    # all heads kept: the plain accuracy; the gates are removed afterwards
    full = [list(range(4))] * 3
    assert evaluation.masked_accuracy(model, tok, val, full) == evaluation.accuracy(model, tok, val)
    assert not any(arch.output_projection(model, i)._forward_pre_hooks for i in range(3))


def test_training_mode_is_restored(strong, val):
    model, tok = strong["bert"]
    model.train()
    try:
        a = evaluation.logits(model, tok, val)
        b = evaluation.logits(model, tok, val)
        np.testing.assert_array_equal(a, b)  # dropout was off during evaluation
        assert model.training
    finally:
        model.eval()


def test_user_errors(strong, val):
    model, tok = strong["bert"]
    with pytest.raises(CahpError, match="lists 2 layers; the model has 3"):
        evaluation.masked_accuracy(model, tok, val, [[0], [1]])
    with pytest.raises(CahpError, match=r"kept head\(s\) \[4\] of layer 2 out of range 0..3"):
        evaluation.masked_accuracy(model, tok, val, [[0], [1], [4]])
    with pytest.raises(CahpError, match="batch size"):
        evaluation.accuracy(model, tok, val, batch_size=0)
    with pytest.raises(CahpError, match="empty split"):
        evaluation.accuracy(model, tok, val.subset([]))
