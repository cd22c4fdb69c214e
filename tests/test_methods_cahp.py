"""CAHP's two-phase API and the gradient / random baselines on a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest

from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.methods import MethodContext, get_method
from cahp_deploy.methods.cahp import cahp_options, collect_evidence, k_for_budget, select, select_at
from cahp_deploy.modeling import load_classifier


@pytest.fixture(scope="module")
def bert(tiny_models, tiny_data):
    model, tok = load_classifier(tiny_models["bert"])
    return model, tok, load_labelled(tiny_data, "train")


@pytest.fixture(scope="module")
def evidence(bert):
    model, tok, data = bert
    return collect_evidence(MethodContext(model, tok, data, seed=7, options={"pool_size": 8, "precision": "fp32"}))


def ctx_for(bert, **kw):
    model, tok, data = bert
    options = {"pool_size": 8, **kw.pop("options", {})}
    return MethodContext(model, tok, data, seed=7, options=options, **kw)


def test_evidence_holds_everything_needed_to_cut(evidence):
    assert evidence.num_heads == 12 and evidence.heads_per_layer == [4, 4, 4]
    assert evidence.profiles.shape == (12, 3 * 64)  # 3 class pairs x 8*8 cells
    assert evidence.points.shape == (12, 2) and evidence.distances.shape == (12, 12)
    assert evidence.salience.shape == (12,) and evidence.salience.min() == 0 and evidence.salience.max() == 1
    assert evidence.sweep.ks == list(range(2, 12)) and len(evidence.sweep.mss) == 10
    assert 2 <= evidence.knee.k <= 11
    assert set(evidence.timings) == {"signatures", "salience", "embedding", "sweep"}


def test_select_is_select_at_the_knee(bert, evidence):
    sel = select(ctx_for(bert))
    at = select_at(evidence, evidence.knee.k)
    assert sel.kept_heads == at.kept_heads and sel.knee == evidence.knee.k
    assert sel.details["k_from"] == "knee"
    assert sel.mss_curve == evidence.sweep.curve()
    assert sel.to_dict()["knee"] == evidence.knee.k


@pytest.mark.parametrize("k", range(1, 13))
def test_every_k_keeps_one_representative_per_cluster(evidence, k):
    free = select_at(evidence, k, ctx=MethodContext(None, None, None, options={"allow_empty_layers": True}))
    assert free.num_heads_kept == k  # one distinct representative per cluster
    clusters = free.details["clusters"]
    assert len(clusters) == k
    for c in clusters:
        assert c["representative"] in c["members"]
        best = max(evidence.salience[l * 4 + h] for l, h in c["members"])
        assert evidence.salience[c["representative"][0] * 4 + c["representative"][1]] == best
    guarded = select_at(evidence, k)
    assert all(guarded.kept_heads)  # the guard: every layer keeps a head
    rescued = guarded.details["rescued_layers"]
    assert guarded.num_heads_kept == k + len(rescued)
    assert rescued == [i for i, layer in enumerate(free.kept_heads) if not layer]
    for i in rescued:  # the rescued head is the layer's most salient
        assert guarded.kept_heads[i] == [int(np.argmax(evidence.salience[i * 4:(i + 1) * 4]))]


def test_medoid_representatives(evidence):
    sel = select_at(evidence, 5, ctx=MethodContext(None, None, None,
                                                     options={"representative": "medoid", "allow_empty_layers": True}))
    assert sorted(map(tuple, (c["medoid"] for c in sel.details["clusters"]))) == sorted(
        (layer, h) for layer, heads in enumerate(sel.kept_heads) for h in heads)


def test_forced_k_and_budget(bert, evidence):
    assert select(ctx_for(bert, options={"k": 4})).details["k"] == 4
    sel = select(ctx_for(bert, budget=6))
    assert sel.num_heads_kept <= 6 and sel.details["k_from"] == "budget"
    k = k_for_budget(evidence, 6)
    assert k == sel.details["k"]
    if k < 12:  # the next k would overshoot the budget
        assert select_at(evidence, k + 1).num_heads_kept > 6
    with pytest.raises(CahpError, match="one head per layer"):
        k_for_budget(evidence, 2)
    with pytest.raises(CahpError, match="either a k"):
        select(ctx_for(bert, budget=6, options={"k": 3}))
    with pytest.raises(CahpError, match="between 1 and 12"):
        select_at(evidence, 13)


def test_full_space_without_salience(bert):
    sel = select(ctx_for(bert, options={"space": "full", "representative": "medoid", "allow_empty_layers": True}))
    assert sel.details["space"] == "full" and sel.details["embedding"] is None
    assert sel.scores is None and sel.timings["salience"] < 0.01
    assert sel.num_heads_kept == sel.details["k"]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"pool_size": 0}, "--pool-size"), ({"degree": -1}, "--degree"), ({"space": "pca"}, "--space"),
     ({"representative": "x"}, "--representative"), ({"salience_fraction": 1.5}, "--salience-fraction")],
)
def test_bad_options(options, match):
    with pytest.raises(CahpError, match=match):
        cahp_options(options)


def test_gradient_baseline_keeps_the_most_salient_heads(bert, evidence):
    sel = get_method("gradient")(ctx_for(bert, budget=5))
    assert sel.method == "gradient" and sel.num_heads_kept == 5 and all(sel.kept_heads)
    free = get_method("gradient")(ctx_for(bert, budget=5, options={"allow_empty_layers": True}))
    top5 = sorted(np.argsort(-evidence.salience, kind="stable")[:5])
    assert [layer * 4 + h for layer, heads in enumerate(free.kept_heads) for h in heads] == top5
    with pytest.raises(CahpError, match="needs a budget"):
        get_method("gradient")(ctx_for(bert))


def test_random_baseline_is_seeded(bert):
    model, tok, data = bert
    pick = lambda seed: get_method("random")(MethodContext(model, tok, data, budget=6, seed=seed)).kept_heads  # noqa: E731
    assert pick(1) == pick(1) and pick(1) != pick(2)
    assert sum(map(len, pick(1))) == 6 and all(pick(1))


def test_one_pass_evidence_equals_two_separate_passes(bert, evidence):
    """collect_evidence pools the salience rows' attention maps from the salience pass's own forward
    (one forward per row); the statistics must equal a signature pass over every row plus a separate
    salience pass (two forwards for the salience rows)."""
    from cahp_deploy.selection.separability import jm_profiles
    from cahp_deploy.signals.salience import head_salience
    from cahp_deploy.signals.signatures import collect_signatures

    model, tok, data = bert
    stats = collect_signatures(model, tok, data, pool_size=8)
    salience = head_salience(model, tok, data, fraction=0.25)
    np.testing.assert_array_equal(evidence.class_counts, stats.counts)
    np.testing.assert_allclose(evidence.profiles, jm_profiles(stats.mean, stats.var, stats.counts), atol=1e-5)
    np.testing.assert_allclose(evidence.salience, salience, atol=1e-5)


def test_bf16_evidence_is_close_to_fp32_and_recorded(bert, evidence):
    """bf16 autocast runs the model only: counts are exact, profiles and salience move by bf16 noise
    (a few per cent of their range)."""
    model, tok, data = bert
    bf16 = collect_evidence(MethodContext(model, tok, data, seed=7, options={"pool_size": 8, "precision": "bf16"}))
    assert bf16.options["precision"] == "bf16" and evidence.options["precision"] == "fp32"
    assert bf16.profiles.dtype == evidence.profiles.dtype and np.isfinite(bf16.profiles).all()
    np.testing.assert_array_equal(bf16.class_counts, evidence.class_counts)
    scale = np.abs(evidence.profiles).max()
    assert np.abs(bf16.profiles - evidence.profiles).max() < 0.05 * scale
    assert not np.array_equal(bf16.profiles, evidence.profiles)  # it did run in bf16
    assert np.corrcoef(bf16.salience, evidence.salience)[0, 1] > 0.95
    with pytest.raises(CahpError, match="--precision must be one of auto, bf16, fp32"):
        cahp_options({"precision": "fp16"})


def _repeated_data(tmp_path, rows: int, period: int):
    """``period`` distinct rows repeated: every chunk that is a multiple of ``period`` has the same
    statistics, so the per-class means stop changing after the first chunk."""
    import json

    from conftest import write_tiny_data

    base = [json.loads(line) for line in (write_tiny_data(tmp_path / "base", n_train=period)
                                          / "train.jsonl").read_text().splitlines()]
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps(base[i % period]) + "\n")
    return load_labelled(tmp_path, "train")


def test_auto_stops_once_the_selection_is_stable(bert, tmp_path):
    model, tok, _ = bert
    data = _repeated_data(tmp_path, rows=240, period=12)
    ctx = MethodContext(model, tok, data, seed=7,
                        options={"pool_size": 8, "space": "full", "auto": True, "auto_chunk": 24})
    sel = select(ctx)
    stopped = sel.details["stopped"]
    # chunk 1 sets the selection, chunks 2 and 3 leave it unchanged: stop after 3 of 10 chunks
    assert stopped["rows_used"] == 72 == sel.details["examples_used"] and stopped["stopped_early"]
    assert stopped["rows_available"] == 240 and "stable over the last 2 chunks" in stopped["why"]
    assert [c["unchanged"] for c in stopped["checks"]] == [False, True, True]
    assert [c["overlap"] for c in stopped["checks"]] == [None, 1.0, 1.0]
    assert stopped["checks"][-1]["mean_change"] < 1e-6
    # the selection written is the one the statistics of those 72 rows give
    full = select(MethodContext(model, tok, data.head(72), seed=7, options={"pool_size": 8, "space": "full"}))
    assert sel.kept_heads == full.kept_heads and sel.knee == full.knee


def test_auto_reads_to_the_end_when_never_stable(bert, tmp_path):
    model, tok, _ = bert
    data = _repeated_data(tmp_path, rows=60, period=12)
    ctx = MethodContext(model, tok, data, seed=7,
                        options={"pool_size": 8, "space": "full", "auto": True, "auto_chunk": 24, "auto_patience": 5})
    stopped = select(ctx).details["stopped"]
    assert stopped["rows_used"] == 60 and not stopped["stopped_early"] and "ran out" in stopped["why"]
    assert [c["rows"] for c in stopped["checks"]] == [24, 48, 60]


def test_overlap_of_two_checks():
    from cahp_deploy.methods.cahp import _overlap

    a = (5, frozenset({(0, 1), (0, 2), (1, 0), (2, 3)}))
    b = (6, frozenset({(0, 1), (0, 2), (1, 0), (2, 1), (2, 2)}))
    assert _overlap(None, a) is None and _overlap(a, a) == 1.0
    assert _overlap(a, b) == 3 / 5  # 3 shared heads over the larger set's 5


def test_auto_needs_cahp_and_a_count_is_checked(tiny_models, tiny_data, tmp_path):
    from conftest import cli

    code, _, err = cli("select", str(tiny_models["bert"]), "--data", str(tiny_data), "--out",
                       str(tmp_path / "s.json"), "--method", "random", "--heads", "6", "--max-examples", "auto")
    assert code == 2 and "needs --method cahp" in err
    code, _, err = cli("select", str(tiny_models["bert"]), "--data", str(tiny_data), "--out",
                       str(tmp_path / "s.json"), "--max-examples", "many")
    assert code == 2 and "neither a number of rows nor 'auto'" in err
