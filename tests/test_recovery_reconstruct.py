"""reconstruct: layer-wise ridge refits of a pruned model's output projections against dense."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cahp_deploy import arch, evaluation
from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.modeling import load_classifier
from cahp_deploy.pruning import prune_model
from cahp_deploy.recovery.reconstruct import (
    TARGETS,
    NormalEquations,
    choose_ridge,
    reconstruct,
    ridge_lambda,
    ridge_solve,
)
from conftest import ARCHS, build_tiny_model, tokenizer_dir

# 3 layers x 4 heads, FFN 64 wide. Layer 1 keeps no head; layer 1's FFN keeps no neuron (one inert
# unit), layer 0's half of them; layer 2's FFN is full.
KEPT = [[0, 2], [], [1]]
NEURONS = [list(range(0, 64, 2)), [], list(range(64))]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="module")
def rows(tiny_data):
    return load_labelled(tiny_data, "train"), load_labelled(tiny_data, "validation")


def _pruned(dense, kept=KEPT, neurons=NEURONS):
    return prune_model(copy.deepcopy(dense), kept, neurons)


# ---------------------------------------------------------------------------------------- pure math

def _normal(x: torch.Tensor, y: torch.Tensor) -> NormalEquations:
    n = NormalEquations.zeros(x.shape[1], y.shape[1])
    n.add(x[:7], y[:7])  # two batches: the statistics add up
    n.add(x[7:], y[7:])
    return n


def test_normal_equations_give_the_error_of_any_weights():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g), torch.randn(20, 2, generator=g)
    wa = torch.randn(4, 2, generator=g, dtype=torch.float64)
    n = _normal(x, y)
    xa = torch.cat([x, torch.ones(20, 1)], 1).double()
    direct = float(((y.double() - xa @ wa) ** 2).sum())
    assert n.count == 20 and n.error(wa) == pytest.approx(direct, rel=1e-12)
    assert n.spread() == pytest.approx(float(((y.double() - y.double().mean(0)) ** 2).sum()), rel=1e-12)
    assert n.relative_error(torch.cat([torch.zeros(3, 2), y.double().mean(0)[None]])) == pytest.approx(1.0)


def test_ridge_zero_is_ordinary_least_squares_and_the_bias_is_free():
    # y = 2 x1 - x2 + 5 exactly: the fit recovers it, bias included, whatever the starting weights.
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [2.0, 3.0], [-1.0, 4.0]])
    y = (2 * x[:, :1] - x[:, 1:] + 5)
    wa = ridge_solve(_normal(x, y), torch.full((3, 1), 7.0, dtype=torch.float64), 0.0)
    assert wa.flatten().tolist() == pytest.approx([2.0, -1.0, 5.0], abs=1e-10)


def test_ridge_pulls_toward_the_current_weights():
    # One input, x = (1, -1), y = (1, -1) (mean 0), current weight 0: XᵀX = 2, XᵀY = 2, trace/dim = 2.
    # (2 + λ) w = 2 + λ·0 with λ = r·2: r = 1 gives w = 0.5 by hand; r -> inf gives back w0.
    x, y = torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [-1.0]])
    n = _normal(x, y)
    assert ridge_lambda(n, 1.0) == pytest.approx(2.0)
    w0 = torch.zeros(2, 1, dtype=torch.float64)
    assert ridge_solve(n, w0, 1.0).flatten().tolist() == pytest.approx([0.5, 0.0])
    w0[0, 0] = 3.0
    assert ridge_solve(n, w0, 1e9)[0, 0].item() == pytest.approx(3.0, abs=1e-6)


def test_choose_ridge_keeps_the_current_weights_when_nothing_beats_them():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g)
    w = torch.randn(3, 2, generator=g)
    y = x @ w  # exact: the current weights are already the answer
    wa0 = torch.cat([w.double(), torch.zeros(1, 2, dtype=torch.float64)])
    choice = choose_ridge(_normal(x[:30], y[:30]), _normal(x[30:], y[30:]), wa0)
    assert choice.r is None and choice.held_out_before == pytest.approx(0.0, abs=1e-12)
    noisy = y + 0.1 * torch.randn(40, 2, generator=g)
    wrong = wa0 + 1.0
    choice = choose_ridge(_normal(x[:30], noisy[:30]), _normal(x[30:], noisy[30:]), wrong)
    assert choice.r is not None and choice.held_out_by_r[choice.r] < choice.held_out_before


# ----------------------------------------------------------------------------------- on tiny models

def _plant_duplicates(dense) -> None:
    """Make heads 1 and 3 copies of heads 0 and 2 (Q, K, V) and FFN neurons 32.. copies of 0..31 in
    every layer: their outputs are then exactly linear in the kept ones', so a refit can be exact."""
    spec = arch.spec_for(dense)
    d = arch.head_dim(dense.config)
    with torch.no_grad():
        for block in arch.layers(dense):
            for path in (spec.query, spec.key, spec.value):
                lin = arch.get_path(block, path)
                for src, dst in ((0, 1), (2, 3)):
                    lin.weight[dst * d:(dst + 1) * d] = lin.weight[src * d:(src + 1) * d]
                    lin.bias[dst * d:(dst + 1) * d] = lin.bias[src * d:(src + 1) * d]
            ffn_in = arch.get_path(block, spec.ffn_in)
            ffn_in.weight[32:] = ffn_in.weight[:32]
            ffn_in.bias[32:] = ffn_in.bias[:32]


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_planted_duplicates_are_reconstructed_exactly(name, tok, rows):
    dense = build_tiny_model(name, seed=3)
    _plant_duplicates(dense)
    pruned = _pruned(dense, kept=[[0, 2]] * 3, neurons=[list(range(32))] * 3)
    train, val = rows
    before = evaluation.logits(pruned, tok, val)
    record = reconstruct(pruned, dense, tok, train, ridge=1e-10)
    ref = evaluation.logits(dense, tok, val)
    for site in record["sites"]:
        assert site["refit"] == "weight+bias"
        assert site["relative_error_before"] > 1e-3
        assert site["relative_error_after"] < 1e-7, site
    # exact in every layer, so the whole model is dense again on rows it never saw
    assert np.abs(evaluation.logits(pruned, tok, val) - ref).max() < 1e-5 < np.abs(before - ref).max()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ARCHS)
def test_refit_never_increases_a_sites_calibration_error(name, target, tok, rows):
    dense = build_tiny_model(name, seed=1)
    pruned = _pruned(dense)
    record = reconstruct(pruned, dense, tok, rows[0], target=target)
    assert [(s["layer"], s["site"]) for s in record["sites"]] == [
        (0, "attention"), (0, "ffn"), (1, "attention"), (1, "ffn"), (2, "attention"), (2, "ffn")]
    for site in record["sites"]:
        assert site["relative_error_after"] <= site["relative_error_before"] * (1 + 1e-9) + 1e-12, site
    refit = [s for s in record["sites"] if s["refit"] in ("weight+bias", "bias")]
    assert refit and all(s["relative_error_after"] < s["relative_error_before"] for s in refit)


def test_a_fixed_ridge_also_never_increases_the_error(tok, rows):
    dense = build_tiny_model("roberta", seed=2)
    for r in (0.0, 1e-3, 10.0):
        record = reconstruct(_pruned(dense), dense, tok, rows[0], ridge=r)
        assert all(s["relative_error_after"] <= s["relative_error_before"] * (1 + 1e-9) + 1e-12
                   for s in record["sites"])
        assert {s["ridge"] for s in record["sites"] if s["refit"] == "weight+bias"} == {r}


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_held_out_logits_move_toward_dense_on_average(name, tok, rows):
    train, val = rows
    gains = []
    for seed in range(3):
        dense = build_tiny_model(name, seed=10 + seed)
        with torch.no_grad():  # random-init classifiers output ~0.01 logits; scale them to matter
            dense.classifier.weight.mul_(100)
        pruned = _pruned(dense, neurons=None)
        ref = evaluation.logits(dense, tok, val)
        mse_before = float(((evaluation.logits(pruned, tok, val) - ref) ** 2).mean())
        reconstruct(pruned, dense, tok, train)
        mse_after = float(((evaluation.logits(pruned, tok, val) - ref) ** 2).mean())
        gains.append(mse_before - mse_after)
    assert np.mean(gains) > 0, gains


@pytest.mark.parametrize("name", ARCHS)
def test_zero_head_layers_and_pruned_ffns_keep_their_shapes(name, tok, rows):
    dense = build_tiny_model(name, seed=4)
    pruned = _pruned(dense)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    old = {k: v.clone() for k, v in pruned.state_dict().items()}
    record = reconstruct(pruned, dense, tok, rows[0], ridge=1e-3)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
    zero_head = record["sites"][2]
    assert (zero_head["kept"], zero_head["refit"], zero_head["ridge"]) == (0, "bias", None)
    assert zero_head["relative_error_after"] == pytest.approx(1.0)  # the best constant, by definition
    empty_ffn = arch.ffn_output_projection(pruned, 1)
    assert torch.count_nonzero(empty_ffn.weight) == 0  # the inert unit stays inert, only its bias moves
    assert not torch.equal(empty_ffn.bias, old[_name_of(pruned, empty_ffn) + ".bias"])
    # neither Q/K/V nor the embeddings nor the classifier change
    changed = {k for k in old if not torch.equal(old[k], pruned.state_dict()[k])}
    spec = arch.spec_for(pruned)
    allowed = {_name_of(pruned, arch.get_path(b, p)) for b in arch.layers(pruned)
               for p in (spec.output, spec.ffn_out) if _has_path(b, p)}
    allowed |= {_name_of(pruned, arch.get_path(arch.layers(pruned)[1], spec.attention_block))}
    assert changed and all(k.rpartition(".")[0] in allowed for k in changed), changed - allowed


def _has_path(block, path) -> bool:
    try:
        arch.get_path(block, path)
        return True
    except AttributeError:
        return False


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_leading_untouched_layers_are_skipped(tok, rows):
    dense = build_tiny_model("bert", seed=5)
    pruned = _pruned(dense, kept=[[0, 1, 2, 3], [0, 1, 2, 3], [2]], neurons=None)
    record = reconstruct(pruned, dense, tok, rows[0], ffn="pruned")
    refit = [(s["layer"], s["site"]) for s in record["sites"] if not s["refit"].startswith("skipped")]
    assert refit == [(2, "attention")]


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_refit_model_saves_and_reloads_with_the_same_logits(name, tok, rows, tmp_path):
    dense = build_tiny_model(name, seed=6)
    pruned = _pruned(dense)
    reconstruct(pruned, dense, tok, rows[0], target="residual")
    pruned.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_classifier(tmp_path)
    assert again.config.cahp_kept_heads == KEPT
    np.testing.assert_allclose(evaluation.logits(again, tok2, rows[1]), evaluation.logits(pruned, tok, rows[1]),
                               atol=1e-6, rtol=0)


def test_refit_model_exports_to_onnx_with_parity(tok, rows, tmp_path):
    from cahp_deploy.export import export, load_manifest

    dense = build_tiny_model("bert", seed=6)
    pruned = _pruned(dense)
    reconstruct(pruned, dense, tok, rows[0])
    pruned.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    art = export(tmp_path / "model", tmp_path / "art", optimize=False, measure=False)  # raises on a parity miss
    assert load_manifest(art)["kept_heads"] == KEPT


def test_replaying_the_lower_blocks_changes_nothing(tok, rows, monkeypatch):
    """The recorded-stream shortcut gives the refit that full forward passes give."""
    import contextlib

    from cahp_deploy.recovery import reconstruct as module

    dense = build_tiny_model("distilbert", seed=9)
    fast, slow = _pruned(dense), _pruned(dense)
    reconstruct(fast, dense, tok, rows[0], target="pruned_input")
    monkeypatch.setattr(module, "_replaying", lambda *a: contextlib.nullcontext())
    reconstruct(slow, dense, tok, rows[0], target="pruned_input")
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_modes_are_restored(tok, rows):
    dense = build_tiny_model("bert", seed=7)
    pruned = _pruned(dense).train()
    reconstruct(pruned, dense, tok, rows[0].head(10))
    assert pruned.training and not dense.training


# -------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(target="teacher"), "target must be one of dense, pruned_input, residual"),
    (dict(ffn=True), "ffn must be one of all, pruned, none"),
    (dict(ridge="big"), "ridge must be 'auto' or a number"),
    (dict(ridge=-1.0), "ridge must be 'auto' or a finite number >= 0"),
    (dict(batch_size=0), "batch size must be at least 1"),
    (dict(max_length=1), "max length must be at least 2"),
])
def test_bad_options_are_one_line_errors(kwargs, match, tok, rows):
    dense = build_tiny_model("bert", seed=8)
    with pytest.raises(CahpError, match=match):
        reconstruct(_pruned(dense), dense, tok, rows[0], **kwargs)


def test_mismatched_models_are_refused(tok, rows):
    dense = build_tiny_model("bert", seed=8)
    pruned = _pruned(dense)
    with pytest.raises(CahpError, match="not a model pruned by cahp-deploy"):
        reconstruct(copy.deepcopy(dense), dense, tok, rows[0])
    with pytest.raises(CahpError, match="the dense model's config has cahp_kept_heads"):
        reconstruct(pruned, _pruned(dense), tok, rows[0])
    with pytest.raises(CahpError, match="is a bert, the dense one a distilbert"):
        reconstruct(pruned, build_tiny_model("distilbert"), tok, rows[0])
    with pytest.raises(CahpError, match="2 layers, the dense one 3"):
        reconstruct(_pruned(build_tiny_model("bert", layers=2), [[0], [1]], None), dense, tok, rows[0])
    with pytest.raises(CahpError, match="at least 2 with ridge='auto'"):
        reconstruct(pruned, dense, tok, rows[0].head(1))
