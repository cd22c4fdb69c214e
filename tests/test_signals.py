"""Signature statistics and salience against slow, obviously-correct references on a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, tokenizer_dir, write_tiny_data

from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import HeadGates
from cahp_deploy.signals import model_inputs
from cahp_deploy.signals.salience import head_salience, salience_examples
from cahp_deploy.signals.signatures import (
    SignatureCollector,
    WelfordAccumulator,
    attention_maps_only,
    collect_signatures,
    forward_until_attention,
    pooled_signatures,
)

POOL = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    model = build_tiny_model("bert", seed=3)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    data = load_labelled(write_tiny_data(tmp_path_factory.mktemp("sig_data"), n_train=23, n_val=3), "train")
    return model, tok, data


def _one_by_one(model, tok, data, pool):
    """Slow reference: each example alone (no padding at all), each head resized on its own."""
    rows = []
    with torch.no_grad():
        for text in data.texts:
            enc = tok([text], return_tensors="pt", truncation=True, max_length=128)
            att = model(**model_inputs(model, dict(enc)), output_attentions=True).attentions
            heads = []
            for a in att:
                for h in range(a.shape[1]):
                    m = a[0, h][None, None]
                    heads.append(F.interpolate(m, size=(pool, pool), mode="bilinear", align_corners=False).flatten())
            rows.append(torch.stack(heads).numpy())
    return np.stack(rows)  # (n, N, D)


def _padded_batch(model, tok, texts, side):
    tok.padding_side = side
    try:
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    finally:
        tok.padding_side = "right"
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        att = model(**model_inputs(model, dict(enc)), output_attentions=True).attentions
    return att, enc["attention_mask"]


def test_vectorized_pooling_equals_per_example_reference(setup):
    model, tok, data = setup
    att, mask = _padded_batch(model, tok, data.texts, "right")
    got = pooled_signatures(att, mask, POOL).numpy()
    np.testing.assert_allclose(got, _one_by_one(model, tok, data, POOL), atol=2e-6)


def test_left_padding_selects_the_real_tokens(setup):
    # BERT's absolute positions make left-padded outputs differ from unpadded ones, so the reference
    # here slices each example's real rows and columns out of the same padded attentions.
    model, tok, data = setup
    att, mask = _padded_batch(model, tok, data.texts, "left")
    assert not mask[:, 0].all()
    got = pooled_signatures(att, mask, POOL).numpy()
    for b in range(len(data)):
        real = mask[b].bool()
        maps = torch.cat([a[b][:, real][:, :, real] for a in att])[:, None]
        ref = F.interpolate(maps, size=(POOL, POOL), mode="bilinear", align_corners=False).flatten(1)
        np.testing.assert_allclose(got[b], ref.numpy(), atol=1e-6)


def test_collected_statistics_equal_reference_mean_and_variance(setup):
    model, tok, data = setup
    ref = _one_by_one(model, tok, data, POOL)
    stats = collect_signatures(model, tok, data, pool_size=POOL, batch_size=5)
    assert list(stats.classes) == [0, 1, 2]
    for c in range(3):
        x = ref[data.labels == c]
        assert stats.counts[c] == len(x)
        np.testing.assert_allclose(stats.mean[:, c], x.mean(axis=0), atol=2e-6)
        np.testing.assert_allclose(stats.var[:, c], x.var(axis=0, ddof=1), atol=1e-6)
    assert stats.mean.shape == (12, 3, POOL * POOL)


def test_welford_merge_matches_numpy_for_uneven_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 4)).astype(np.float32)
    cls = rng.integers(0, 2, size=40)
    acc = WelfordAccumulator(2, 3, 4)
    for a, b in [(0, 1), (1, 8), (8, 25), (25, 40)]:
        acc.update(torch.from_numpy(x[a:b]), torch.from_numpy(cls[a:b]))
    for c in range(2):
        xc = x[cls == c].astype(np.float64)
        assert acc.count[c] == len(xc)
        # batch statistics in float32, the merge in float64
        np.testing.assert_allclose(acc.mean[c].numpy(), xc.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(acc.m2[c].numpy(), ((xc - xc.mean(0)) ** 2).sum(0), rtol=1e-5)


def test_pool_size_must_be_positive(setup):
    model, tok, data = setup
    with pytest.raises(CahpError, match="--pool-size"):
        collect_signatures(model, tok, data, pool_size=0)


def _salience_reference(model, tok, data):
    """Slow reference: per example, d CE / d gate with 1-D gates, absolute, averaged."""
    total = torch.zeros(12, dtype=torch.float64)
    for text, label in zip(data.texts, data.labels):
        gates = [torch.ones(4, requires_grad=True) for _ in range(3)]
        with HeadGates(model, gates):
            enc = tok([text], return_tensors="pt")
            logits = model(**model_inputs(model, dict(enc))).logits
            loss = F.cross_entropy(logits, torch.tensor([int(label)]))
            grads = torch.autograd.grad(loss, gates)
        total += torch.cat(grads).abs().double()
    return (total / len(data)).numpy()


def test_salience_is_per_example_and_batch_independent(setup):
    model, tok, data = setup
    ref = _salience_reference(model, tok, data)
    for bs in (1, 4, 32):
        raw = head_salience(model, tok, data, fraction=1.0, batch_size=bs, normalise=False)
        np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-9)
    norm = head_salience(model, tok, data, fraction=1.0)
    assert norm.min() == 0.0 and norm.max() == 1.0
    np.testing.assert_allclose(norm, (ref - ref.min()) / (ref.max() - ref.min()), rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_salience_fraction_takes_the_leading_examples(setup):
    model, tok, data = setup
    assert salience_examples(23, 0.25) == 5 and salience_examples(3, 0.1) == 1
    a = head_salience(model, tok, data, fraction=0.25, normalise=False)
    b = head_salience(model, tok, data.head(5), fraction=1.0, normalise=False)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(CahpError, match="--salience-fraction"):
        salience_examples(10, 0.0)


def test_salience_pass_feeds_the_same_signatures(setup):
    model, tok, data = setup
    classes = np.unique(data.labels)
    col = SignatureCollector([4, 4, 4], classes, POOL)
    head_salience(model, tok, data.head(9), fraction=1.0, attention_sink=col.add)
    both = collect_signatures(model, tok, data.subset(range(9, len(data))), collector=col)
    plain = collect_signatures(model, tok, data, pool_size=POOL)
    np.testing.assert_array_equal(both.counts, plain.counts)
    np.testing.assert_allclose(both.mean, plain.mean, atol=2e-6)
    np.testing.assert_allclose(both.var, plain.var, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "electra"])
def test_stopping_after_the_last_attention_gives_the_same_maps(setup, arch):
    _, tok, data = setup
    model = build_tiny_model(arch, seed=5)
    enc = model_inputs(model, dict(tok(data.texts[:7], return_tensors="pt", padding=True)))
    head = model.classifier if hasattr(model, "classifier") else None
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            full = model(**enc, output_attentions=True).attentions
            assert calls  # the full pass reaches the classifier
            calls.clear()
            with attention_maps_only(model) as maps:
                early = forward_until_attention(model, enc, maps)
    finally:
        handle.remove()
    assert not calls  # ...the early-stopping one does not
    assert len(early) == len(full)
    for a, b in zip(early, full):
        assert torch.equal(a, b)


def test_signature_pass_statistics_do_not_depend_on_stopping_early(setup):
    model, tok, data = setup
    early = collect_signatures(model, tok, data, pool_size=POOL, batch_size=5)
    classes = np.unique(data.labels)
    col = SignatureCollector([4, 4, 4], classes, POOL)
    with torch.inference_mode():  # the full forward, as before the early stop existed
        from cahp_deploy.data import iter_batches

        for _, enc, labels in iter_batches(tok, data, batch_size=5):
            out = model(**model_inputs(model, enc), output_attentions=True)
            col.add(out.attentions, enc["attention_mask"], labels)
    full = col.result()
    np.testing.assert_array_equal(early.counts, full.counts)
    np.testing.assert_array_equal(early.mean, full.mean)
    np.testing.assert_array_equal(early.m2, full.m2)
