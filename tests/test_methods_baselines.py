"""The literature baselines (attattr, l0, dsp, pass): budget, determinism, a planted task, the maths.

The planted task: a tiny BERT whose heads other than two chosen ones have all-zero output-projection
columns (so they cannot influence anything), trained so that the label needs *both* chosen heads
(with either alone the loss is pushed toward the uniform distribution). Every method must rank
those two heads first.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cahp_deploy import arch
from cahp_deploy.data import iter_batches, load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import head_mask
from cahp_deploy.methods import MethodContext, get_method
from cahp_deploy.methods.dsp import gumbel_soft_top_k, temperature
from cahp_deploy.methods.gate_training import HardConcrete, generator
from cahp_deploy.modeling import load_classifier
from cahp_deploy.signals import model_inputs
from cahp_deploy.signals.attention_attribution import attention_attribution

from conftest import build_tiny_model, tokenizer_dir, write_tiny_data

METHODS = ("attattr", "l0", "dsp", "pass")
TRAINABLE = ("l0", "dsp", "pass")
# Small enough for tiny models: a second or so per run.
FAST = {"steps": 12, "search_steps": 6, "lambda_trials": 2, "attattr_examples": 8, "ig_steps": 4,
        "batch_size": 16, "max_length": 32}
PLANTED = ((1, 2), (2, 0))


def run(method, model, tokenizer, data, budget, seed=0, **options):
    ctx = MethodContext(model=model, tokenizer=tokenizer, data=data, budget=budget, seed=seed,
                        options={**FAST, **options})
    return get_method(method)(ctx)


def as_set(kept) -> set[tuple[int, int]]:
    return {(layer, h) for layer, heads in enumerate(kept) for h in heads}


@pytest.fixture(scope="module")
def tiny(tiny_models, tiny_data):
    """{arch: (model, tokenizer)} for bert and distilbert, and the tiny train split."""
    loaded = {a: load_classifier(tiny_models[a]) for a in ("bert", "distilbert")}
    return loaded, load_labelled(tiny_data, "train")


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """(model, tokenizer, data): a tiny BERT in which only heads PLANTED carry any signal."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = build_tiny_model("bert", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    data = load_labelled(write_tiny_data(tmp_path_factory.mktemp("planted"), n_train=90), "train")
    (_, enc, labels), = iter_batches(tokenizer, data, batch_size=len(data), max_length=32)
    enc, labels = model_inputs(model, enc), torch.as_tensor(labels)
    n_layers, n_heads = arch.dense_head_grid(model.config)

    def keep_only(heads):
        return [[h for h in range(n_heads) if (layer, h) in heads] for layer in range(n_layers)]

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        with head_mask(model, keep_only(PLANTED)):
            loss = F.cross_entropy(model(**enc).logits, labels)
        for head in PLANTED:  # one planted head alone must know nothing: cross-entropy to uniform
            with head_mask(model, keep_only([head])):
                loss = loss - F.log_softmax(model(**enc).logits, dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    d = arch.head_dim(model.config)
    with torch.no_grad():
        for layer in range(n_layers):
            weight = arch.output_projection(model, layer).weight
            for h in range(n_heads):
                if (layer, h) not in PLANTED:
                    weight[:, h * d:(h + 1) * d] = 0.0

    def accuracy(heads):
        with torch.no_grad(), head_mask(model, keep_only(heads)):
            return float((model(**enc).logits.argmax(-1) == labels).float().mean())

    # the construction worked: both heads are needed, and together they solve the task
    assert accuracy(PLANTED) == 1.0
    assert max(accuracy(PLANTED[:1]), accuracy(PLANTED[1:])) <= 0.6
    return model, tokenizer, data


# ---------------------------------------------------------------------------------------------
# contract: exact budget, deterministic for a seed, model left untouched
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["bert", "distilbert"])
@pytest.mark.parametrize("method", METHODS)
def test_exact_budget_and_deterministic(tiny, method, arch_name):
    (loaded, data) = tiny
    model, tokenizer = loaded[arch_name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = 3 if arch_name == "bert" else 7
    a = run(method, model, tokenizer, data, budget, seed=3)
    b = run(method, model, tokenizer, data, budget, seed=3)
    assert a.num_heads_kept == budget and a.method == method
    assert all(len(k) >= 1 for k in a.kept_heads)  # each layer keeps a head by default
    assert a.kept_heads == b.kept_heads and a.scores == b.scores
    assert np.asarray(a.scores).shape == (3, 4)
    # the caller's model is unchanged: same weights, gradients still enabled, no hooks left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", TRAINABLE)
def test_seed_changes_trainable_runs(tiny, method):
    (loaded, data) = tiny
    model, tokenizer = loaded["bert"]
    a = run(method, model, tokenizer, data, 5, seed=1)
    b = run(method, model, tokenizer, data, 5, seed=2)
    assert a.scores != b.scores


def test_train_weights_trains_a_copy(tiny):
    (loaded, data) = tiny
    model, tokenizer = loaded["bert"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = run("dsp", model, tokenizer, data, 5, seed=0)
    joint = run("dsp", model, tokenizer, data, 5, seed=0, train_weights=True, weights_lr=1e-2)
    assert joint.params["train_weights"] is True and joint.scores != frozen.scores
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# the planted task
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_planted_heads_ranked_first(planted, method):
    model, tokenizer, data = planted
    sel = run(method, model, tokenizer, data, 2, seed=0, steps=100, search_steps=40,
              attattr_examples=90, allow_empty_layers=True)
    scores = np.asarray(sel.scores)
    top2 = {divmod(int(i), scores.shape[1]) for i in np.argsort(-scores, axis=None, kind="stable")[:2]}
    assert top2 == set(PLANTED)
    assert as_set(sel.kept_heads) == set(PLANTED)


def test_l0_without_budget_lambda_decides(planted):
    model, tokenizer, data = planted
    sel = run("l0", model, tokenizer, data, None, steps=60, allow_empty_layers=True)
    assert as_set(sel.kept_heads) == set(PLANTED) and sel.details["surviving_heads"] == 2
    # no penalty: nothing pushes a gate shut, every head survives
    assert run("l0", model, tokenizer, data, None, steps=20, allow_empty_layers=True,
               **{"lambda": 0.0}).num_heads_kept == 12
    # empty layers are rescued with their best head unless allowed
    rescued = run("l0", model, tokenizer, data, None, steps=60)
    assert rescued.num_heads_kept == 3 and rescued.details["rescued_layers"] == 1
    with pytest.raises(CahpError, match="--lambda 1000.0 closed every head"):
        run("l0", model, tokenizer, data, None, steps=40, **{"lambda": 1000.0})


def test_l0_lambda_search_records_trials(planted):
    model, tokenizer, data = planted
    sel = run("l0", model, tokenizer, data, 4, steps=60, search_steps=20, lambda_trials=4, allow_empty_layers=True)
    lambdas = [t["lambda"] for t in sel.details["trials"]]
    assert sel.num_heads_kept == 4 and 1 <= len(lambdas) <= 4
    # only 2 heads matter, so 4 survivors need a weaker penalty than the first guess, trained from
    # scratch: an over-pruned state is never the start of a trial (closed gates cannot reopen)
    assert len(lambdas) == 1 or lambdas[1] < lambdas[0]
    assert all(not t["warm_start"] for t in sel.details["trials"] if t["lambda"] < lambdas[0])
    assert set(PLANTED) <= as_set(sel.kept_heads)


# ---------------------------------------------------------------------------------------------
# the maths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["bert", "distilbert"])
def test_attribution_mass_is_complete(tiny, arch_name):
    """IG completeness: a layer's heads' masses sum to F(A) - F(layer's maps zeroed)."""
    (loaded, data) = tiny
    model, tokenizer = loaded[arch_name]
    (_, enc, _), = iter_batches(tokenizer, data.head(2), batch_size=2, max_length=32)
    enc = model_inputs(model, enc)
    scores, used, stopped = attention_attribution(model, [enc], steps=200, reduce="mass")
    assert used == 2 and not stopped
    with torch.no_grad():
        logits = model(**enc).logits
        target = logits.argmax(-1, keepdim=True)
        full = logits.gather(1, target).mean()
        for layer in range(scores.shape[0]):
            off = [[] if i == layer else [0, 1, 2, 3] for i in range(scores.shape[0])]
            with head_mask(model, off):  # zero maps == zero context == gated-off heads
                zeroed = model(**enc).logits.gather(1, target).mean()
            assert scores[layer].sum() == pytest.approx(float(full - zeroed), rel=0.02, abs=1e-4)


def test_hard_concrete_probabilities_match_samples():
    gates = HardConcrete((1, 3), generator(0))
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[-2.0, 0.0, 2.0]]))
        draws = torch.stack([gates.sample() for _ in range(4000)])
        p0, p1 = gates.p_closed(), gates.p_one()
    assert torch.allclose((draws == 0).float().mean(0), p0, atol=0.03)
    assert torch.allclose((draws == 1).float().mean(0), p1, atol=0.03)
    assert torch.all(p0 + p1 <= 1) and torch.allclose(gates.p_open(), 1 - p0)


def test_gumbel_soft_top_k():
    w = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0], dtype=torch.float64)
    soft = gumbel_soft_top_k(w, 2, 1.0, generator(0))
    # K softmaxes: sums to K; an entry may exceed 1 at high temperature (the relaxation allows it)
    assert float(soft.sum()) == pytest.approx(2.0) and torch.all(soft >= 0)
    assert int(torch.argmax(soft)) == 0
    # near zero temperature it is a hard 2-hot mask: the top 2 of w + the same Gumbel noise
    hard = gumbel_soft_top_k(w, 2, 1e-8, generator(5))
    u = torch.rand(w.shape, generator=generator(5), dtype=torch.float64)
    expected = torch.zeros_like(w)
    expected[torch.topk(w - torch.log(-torch.log(u)), 2).indices] = 1.0
    assert torch.allclose(hard, expected)
    assert temperature(0.0, 1000, 1e-8) == pytest.approx(1000)
    assert temperature(0.5, 1000, 1e-8) == pytest.approx(1000 * 1e-11 ** 0.5)
    assert temperature(1.0, 1000, 1e-8) == pytest.approx(1e-8)


# ---------------------------------------------------------------------------------------------
# time budget and user errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_time_budget_is_respected(tiny, method):
    (loaded, data) = tiny
    model, tokenizer = loaded["bert"]
    t = time.perf_counter()
    sel = run(method, model, tokenizer, data, 4, steps=10**6, search_steps=10**6, attattr_examples=10**6,
              attattr_batch_size=1, ig_steps=500, time_budget=0.5)
    assert time.perf_counter() - t < 30.0  # the uncut run would take hours
    assert sel.details["stopped_by_time_budget"] is True and sel.num_heads_kept == 4
    if method in ("dsp", "pass"):  # the schedule was compressed into the budget, not cut off mid-way
        training = sel.details["training"]
        assert 0 < training["steps_fitted"] == training["steps_done"] < 10**6


@pytest.mark.parametrize(
    ("method", "options", "budget", "match"),
    [
        ("dsp", {}, None, "--method dsp needs a budget"),
        ("pass", {}, None, "--method pass needs a budget"),
        ("attattr", {}, None, "--method attattr needs a budget"),
        ("dsp", {"steps": 0}, 4, "--steps must be >= 1, got 0"),
        ("pass", {"lr": "fast"}, 4, "--lr must be a float, got 'fast'"),
        ("attattr", {"attattr_reduce": "mean"}, 4, "--attattr-reduce must be one of mass, max, got 'mean'"),
        ("dsp", {"dsp_init_temperature": 0.1, "dsp_final_temperature": 1.0}, 4, "must not exceed"),
        ("l0", {"train_weights": "maybe"}, 4, "--train-weights must be a bool"),
    ],
)
def test_user_errors(tiny, method, options, budget, match):
    (loaded, data) = tiny
    model, tokenizer = loaded["bert"]
    with pytest.raises(CahpError, match=match):
        run(method, model, tokenizer, data, budget, **options)


def test_pruned_model_is_refused(tiny):
    (loaded, data) = tiny
    model, tokenizer = loaded["bert"]
    model.config.cahp_kept_heads = [[0, 1], [0], [0, 1, 2, 3]]
    try:
        with pytest.raises(CahpError, match="dense model"):
            run("dsp", model, tokenizer, data, 2)
    finally:
        del model.config.cahp_kept_heads

