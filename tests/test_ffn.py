"""FFN neurons: pruning equals gating, ONNX equals gating, the selection math, the select/prune CLI."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from conftest import ARCHS, build_tiny_model, cli
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import head_mask, neuron_mask
from cahp_deploy.pruning import load_pruned, prune, prune_model
from cahp_deploy.selection import neurons as nsel
from cahp_deploy.selection.result import Selection

LAYERS, HEADS, HEAD_DIM = 3, 4, 8
INTER = 2 * HEADS * HEAD_DIM  # conftest's tiny models: intermediate = 2 x hidden


def _inputs(n: int = 3, s: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[0, 6:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _pattern(rng: random.Random, empty_ok: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    heads = [sorted(rng.sample(range(HEADS), rng.randint(0 if empty_ok else 1, HEADS))) for _ in range(LAYERS)]
    if not any(heads):
        heads[rng.randrange(LAYERS)] = [rng.randrange(HEADS)]
    neurons = [sorted(rng.sample(range(INTER), rng.choice([0, 1, rng.randint(1, INTER), INTER])))
               for _ in range(LAYERS)]
    return heads, neurons


def _masked_logits(dense, heads, neurons, inputs) -> torch.Tensor:
    with torch.no_grad(), head_mask(dense, heads), neuron_mask(dense, neurons):
        return dense(**inputs).logits


@pytest.mark.parametrize("name", ARCHS)
def test_pruned_model_equals_gated_dense_for_many_patterns(name):
    dense = build_tiny_model(name)
    inputs = _inputs()
    rng = random.Random(name)
    for _ in range(30):
        heads, neurons = _pattern(rng)
        pruned = prune_model(copy.deepcopy(dense), heads, neurons)
        assert arch.neurons_per_layer(pruned) == [len(n) for n in neurons]
        with torch.no_grad():
            got = pruned(**inputs).logits
        torch.testing.assert_close(got, _masked_logits(dense, heads, neurons, inputs), atol=1e-5, rtol=1e-5)


def test_an_emptied_ffn_passes_the_residual_through():
    """Zero neurons everywhere: each FFN adds only its output bias, exactly what gating every neuron gives."""
    dense = build_tiny_model("bert")
    heads = [list(range(HEADS))] * LAYERS
    pruned = prune_model(copy.deepcopy(dense), heads, [[], [], []])
    for block in arch.layers(pruned):
        assert block.intermediate.dense.weight.abs().sum() == 0 and block.output.dense.weight.shape == (HEADS * HEAD_DIM, 1)
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, _masked_logits(dense, heads, [[], [], []], inputs))


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_prune_stage_writes_neurons_and_load_pruned_rebuilds(name, tiny_models, tmp_path):
    rng = random.Random(1)
    heads, neurons = _pattern(rng)
    sel = Selection(method="manual", kept_heads=heads, num_heads_total=LAYERS * HEADS, heads_per_layer=HEADS,
                    kept_neurons=neurons, neurons_per_layer=INTER)
    out = prune(tiny_models[name], sel, tmp_path / "p")
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["kept_neurons"] == neurons and rec["num_neurons_total"] == LAYERS * INTER
    assert rec["neurons_per_layer_kept"] == [len(n) for n in neurons]
    macs = rec["macs_seq128"]
    assert macs["ffn_after"] == sum(r["macs_seq128"]["ffn_after"] for r in rec["per_layer"])
    assert macs["ffn_after"] == sum(2 * 128 * HEADS * HEAD_DIM * max(len(n), 1) for n in neurons)
    assert rec["flop_ceiling_speedup"] == pytest.approx(macs["total_before"] / macs["total_after"])
    assert all(r["params"]["ffn_after"] <= r["params"]["ffn_before"] for r in rec["per_layer"])
    config = json.loads((out / "config.json").read_text())
    assert config["cahp_kept_neurons"] == neurons and config["cahp_dense_intermediate"] == INTER

    dense = build_tiny_model(name)
    reloaded = load_pruned(out)
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, _masked_logits(dense, heads, neurons, inputs),
                                   atol=1e-5, rtol=1e-5)


ONNX_ARCHS = ("bert", "roberta", "distilbert")
ONNX_PATTERNS = 34  # x 3 architectures = 102 random (heads, neurons) patterns


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_ARCHS)
def test_onnx_of_pruned_model_equals_gated_dense(name, tmp_path):
    """The exported graph of every pattern matches the dense PyTorch model with the same heads and
    neurons zeroed by hooks (<= 1e-4), through ONNX Runtime."""
    import onnxruntime as ort

    from cahp_deploy.export.onnx_export import attn_implementation_for, export_onnx, resolve_opset
    from conftest import tiny_config
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(name)
    dense = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation_for(config)).eval()
    inputs = _inputs(n=2, s=7)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    rng = random.Random(f"onnx-{name}")
    worst = 0.0
    for i in range(ONNX_PATTERNS):
        heads, neurons = _pattern(rng)
        pruned = prune_model(copy.deepcopy(dense), heads, neurons)
        path = tmp_path / f"m{i}.onnx"
        names = export_onnx(pruned, path, resolve_opset(pruned, None))
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in inputs.items() if k in names}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        got = session.run(None, feed)[0]
        want = _masked_logits(dense, heads, neurons, inputs).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
        path.unlink()
    assert worst <= 1e-4


# ----------------------------------------------------------------------------- selection math (pure)

def _planted_layer(k: int, per: int, dim: int = 6, seed: int = 0):
    """``k`` well-separated groups of ``per`` neurons; within each group one neuron is the most salient."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, dim))
    profiles = np.concatenate([c + rng.normal(0, 0.05, (per, dim)) for c in centres])
    salience = rng.random(k * per) * 0.5
    best = [g * per + int(rng.integers(per)) for g in range(k)]
    salience[best] = 1.0 + rng.random(k)
    return profiles, salience, sorted(best)


def test_complementary_keeps_the_most_salient_neuron_of_each_planted_group():
    profiles, salience, best = _planted_layer(k=5, per=20)
    assert nsel.complementary(profiles, salience, 5, seed=0) == best
    assert nsel.complementary(profiles, salience, 0, seed=0) == []
    assert nsel.complementary(profiles, salience, 100, seed=0) == list(range(100))


def test_layer_knee_finds_the_planted_number_of_groups_roughly():
    profiles, _, _ = _planted_layer(k=8, per=40, seed=3)
    knee = nsel.layer_knee(profiles, seed=0, degree=0)
    assert knee.ks == nsel.k_grid(320) and 4 <= knee.k <= 16
    assert len(knee.mss) == len(knee.ks)


def test_allocate_follows_salience_and_guards_layers():
    scores = np.array([[5.0, 4.0, 3.0], [0.1, 0.2, 0.0]])
    assert nsel.allocate(scores, 3) == [[0, 1], [1]]
    assert nsel.allocate(scores, 3, allow_empty_layers=True) == [[0, 1, 2], []]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600), st.floats(0.01, 1.0))
def test_resolve_neuron_budget(total_per_layer, ratio):
    total = 3 * total_per_layer
    n = nsel.resolve_neuron_budget(total, 3, keep_ratio=ratio, allow_empty_layers=True)
    assert 1 <= n <= total and n == max(1, round(ratio * total))


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_ratio": 0.0}, "--ffn-keep-ratio must be in"),
    ({"keep_ratio": 1.5}, "--ffn-keep-ratio must be in"),
    ({"neurons": 10_000}, "--ffn-neurons must be between 1 and"),
    ({"neurons": 2}, "without any; keep at least one per layer"),
    ({"neurons": 5, "keep_ratio": 0.5}, "at most one of"),
])
def test_resolve_neuron_budget_errors(kwargs, match):
    with pytest.raises(CahpError, match=match):
        nsel.resolve_neuron_budget(3 * 64, 3, **kwargs)


# ----------------------------------------------------------------------------- signals + select CLI

def test_ffn_salience_is_per_example_and_batching_invariant(tiny_models, tiny_data):
    from cahp_deploy.data import load_labelled
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.signals.ffn import collect_ffn_stats

    net, tok = load_classifier(tiny_models["bert"])
    data = load_labelled(tiny_data, "train").head(24)
    a = collect_ffn_stats(net, tok, data, fraction=1.0, salience_batch_size=24)
    b = collect_ffn_stats(net, tok, data, fraction=1.0, salience_batch_size=5)
    assert a.salience_examples == 24 and a.salience.shape == (LAYERS * INTER,)
    np.testing.assert_allclose(a.salience, b.salience, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-7)
    assert (a.salience > 0).mean() > 0.5


def test_select_cli_with_ffn_shares_the_cahp_pass(tiny_models, tiny_data, tmp_path):
    base = ["select", tiny_models["bert"], "--data", tiny_data, "--degree", "2", "--pool-size", "4"]
    code, _, err = cli(*base, "--out", tmp_path / "heads.json")
    assert code == 0, err
    code, out, err = cli(*base, "--out", tmp_path / "both.json", "--ffn-keep-ratio", "0.5")
    assert code == 0, err
    assert "FFN neurons" in out
    heads_only = json.loads((tmp_path / "heads.json").read_text())
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["kept_heads"] == heads_only["kept_heads"]  # the FFN hooks do not disturb the heads' evidence
    assert both["num_neurons_kept"] == round(0.5 * LAYERS * INTER) and both["num_neurons_total"] == LAYERS * INTER
    assert both["ffn"]["method"] == "cahp" and both["ffn"]["evidence_pass"] == "shared with the heads"
    assert all(len(k) >= 1 for k in both["kept_neurons"])
    code, out, err = cli("prune", tiny_models["bert"], "--selection", tmp_path / "both.json", "--out", tmp_path / "p")
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "pruning.json").read_text())["num_neurons_kept"] == both["num_neurons_kept"]


@pytest.mark.parametrize("ffn_method", ["gradient", "random", "cahp"])
def test_select_ffn_methods_with_a_baseline_for_heads(ffn_method, tiny_models, tiny_data, tmp_path):
    code, _, err = cli("select", tiny_models["distilbert"], "--data", tiny_data, "--method", "random", "--heads", "6",
                       "--ffn-method", ffn_method, "--ffn-neurons", "40", "--out", tmp_path / "s.json")
    assert code == 0, err
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["num_neurons_kept"] == 40 and d["ffn"]["method"] == ffn_method
    assert d["ffn"]["evidence_pass"] == ("none" if ffn_method == "random" else "own pass")


def test_cahp_ffn_without_a_budget_uses_each_layers_knee(tiny_models, tiny_data, tmp_path):
    code, _, err = cli("select", tiny_models["bert"], "--data", tiny_data, "--pool-size", "4", "--degree", "2",
                       "--ffn-method", "cahp", "--out", tmp_path / "s.json")
    assert code == 0, err
    d = json.loads((tmp_path / "s.json").read_text())
    knees = d["ffn"]["layer_knees"]
    assert d["ffn"]["k_from"] == "knee" and len(knees) == LAYERS
    assert [len(k) for k in d["kept_neurons"]] == [max(k["k"], 1) for k in knees]


@pytest.mark.parametrize("args, match", [
    (["--ffn-keep-ratio", "0"], "--ffn-keep-ratio must be in"),
    (["--ffn-keep-ratio", "1.2"], "--ffn-keep-ratio must be in"),
    (["--ffn-neurons", "100000"], "--ffn-neurons must be between"),
    (["--ffn-neurons", "2"], "--allow-empty-layers"),
    (["--ffn-method", "gradient"], "needs a budget"),
])
def test_select_ffn_bad_input_is_one_line_and_writes_nothing(args, match, tiny_models, tiny_data, tmp_path):
    code, _, err = cli("select", tiny_models["bert"], "--data", tiny_data, "--out", tmp_path / "s.json", *args)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()


def test_study_ffn_axis_runs_resumes_and_rejects_bad_ratios(tiny_models, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "study"
    args = ["study", tiny_models["bert"], "--data", tiny_data, "--out", out, "--axis", "ffn", "--ffn-ratios", "0.5",
            "--ffn-methods", "cahp,random", "--random-seeds", "0,1", "--recover-epochs", "1", "--recover-max-examples", "20"]
    code, stdout, err = cli(*args)
    assert code == 0, err
    res = json.loads((out / "ffn_study.json").read_text())
    assert [(c["method"], c["seed"]) for c in res["cells"]] == [("cahp", 42), ("random", 0), ("random", 1)]
    assert all(c["neurons"] == round(0.5 * LAYERS * INTER) and "after" in c for c in res["cells"])
    assert "| random | " in (out / "ffn_study.md").read_text()

    import cahp_deploy.recovery

    monkeypatch.setattr(cahp_deploy.recovery, "finetune_in_place", lambda *a, **k: pytest.fail("a cached cell was recomputed"))
    code, _, err = cli(*args)
    assert code == 0, err
    code, _, err = cli(*args[:-8], "--ffn-ratios", "1.5")
    assert code == 2 and "FFN keep ratios must be in (0, 1]" in err


def test_export_of_ffn_pruned_model_keeps_the_fusions_and_records_neurons(tiny_models, tmp_path):
    """ORT still fuses Attention, BiasGelu and the LayerNorms on ragged FFNs; the manifest says what was kept.

    (Measured: a layer left with exactly one neuron gets no BiasGelu, its Add + Gelu stay apart;
    parity holds either way. Two neurons fuse.)
    """
    from cahp_deploy.export import export
    from cahp_deploy.export.manifest import load_manifest

    heads = [[0, 1], [2], [0, 1, 2, 3]]
    neurons = [list(range(0, INTER, 3)), [5, 9], list(range(INTER))]
    sel = Selection(method="manual", kept_heads=heads, num_heads_total=LAYERS * HEADS, heads_per_layer=HEADS,
                    kept_neurons=neurons, neurons_per_layer=INTER)
    model_dir = prune(tiny_models["bert"], sel, tmp_path / "p")
    art = export(model_dir, tmp_path / "art", measure=False)
    m = load_manifest(art)
    assert m["kept_neurons"] == neurons and m["neurons_per_layer"] == [len(n) for n in neurons]
    assert (m["num_neurons_kept"], m["num_neurons_total"]) == (sum(map(len, neurons)), LAYERS * INTER)
    ops = m["variants"]["optimized"]["candidates"]["ort_default"]["op_counts"]
    assert ops.get("BiasGelu") == LAYERS and ops.get("Attention") == LAYERS
    assert ops.get("SkipLayerNormalization", 0) >= LAYERS
    for v in ("fp32", "optimized"):
        assert m["variants"][v]["parity"]["max_abs_diff"] <= 1e-4


def test_run_with_ffn_neurons_ships_them_and_says_so(tiny_models, tiny_data, tmp_path):
    from cahp_deploy.run.stage import run

    out = tmp_path / "run"
    result = run(tiny_models["bert"], tiny_data, out, method="random", heads=6, ffn_method="gradient",
                 ffn_keep_ratio=0.5, recover=False, batch=(1,), seq=(16,), min_seconds=0.01, min_reps=2, warmup=1,
                 traffic=False, timing=False, variants=("optimized",), quantize=None)
    manifest = json.loads((out / "artifacts" / "pruned" / "manifest.json").read_text())
    assert manifest["num_neurons_kept"] == round(0.5 * LAYERS * INTER)
    assert f"and {manifest['num_neurons_kept']} of {LAYERS * INTER} FFN neurons" in (out / "summary.md").read_text()
    rows = {(r["artifact"], r["variant"]): r for r in result["summary"]["rows"]}
    assert rows[("pruned", "optimized")]["neurons_kept"] == manifest["num_neurons_kept"]
    with pytest.raises(CahpError, match="--ffn-keep-ratio floor"):
        run(tiny_models["bert"], tiny_data, tmp_path / "run2", ffn_neurons=40, max_accuracy_drop=1.0, ladder="heads")
    with pytest.raises(CahpError, match="the progressive ladder .* removes neurons itself"):
        run(tiny_models["bert"], tiny_data, tmp_path / "run2", ffn_neurons=40, max_accuracy_drop=1.0)
    assert not (tmp_path / "run2").exists()


def test_budget_search_with_an_ffn_ratio_ships_neurons_too(tiny_models, tiny_data, tmp_path):
    from cahp_deploy.run.stage import run

    out = tmp_path / "run"
    run(tiny_models["bert"], tiny_data, out, max_accuracy_drop=100.0, ladder="heads", ffn_keep_ratio=0.5,
        ffn_method="gradient",
        recover_epochs=1, degree=2, pool_size=4, batch=(1,), seq=(16,), min_seconds=0.01, min_reps=2, warmup=1,
        traffic=False, timing=False, variants=("optimized",), quantize=None)
    search = json.loads((out / "search" / "search.json").read_text())
    # a joint ladder: every neuron at every head, falling with k to the floor at the knee (every rung passes)
    tried = search["tried"]
    assert search["ffn_keep_ratio"] == 0.5 and tried[0]["k"] == 12 and tried[0]["details"]["neurons_kept"] == LAYERS * INTER
    assert tried[-1]["k"] == search["knee"]["k"] and tried[-1]["details"]["neurons_kept"] == LAYERS * INTER // 2
    kept = [c["details"]["neurons_kept"] for c in tried]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == len(kept)
    assert {int(k): r for k, r in search["ffn_ratios"].items()}[12] == 1.0
    manifest = json.loads((out / "artifacts" / "pruned" / "manifest.json").read_text())
    from cahp_deploy.shipped import choice  # confirm.json, not the manifest, names the shipped variant

    assert manifest["num_neurons_kept"] == LAYERS * INTER // 2
    assert choice(out / "artifacts" / "pruned")["recommended"] == "optimized"
    sel = json.loads((out / "search" / f"k{search['chosen_k']:03d}" / "selection.json").read_text())
    assert sel["ffn"]["method"] == "gradient" and sel["ffn"]["budget"] == LAYERS * INTER // 2


@pytest.mark.shared
def test_reference_model_heads_and_neurons_prune_exactly(tmp_path):
    """On the real MiniLM-SST-5 classifier (../shared): CAHP heads + 50% CAHP neurons, pruned and reloaded,
    equals the dense model with the same heads and neurons gated off."""
    from conftest import shared_path

    from cahp_deploy.data import iter_batches, load_labelled
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.signals import model_inputs

    model, data = shared_path("models", "minilm-sst5"), shared_path("data", "sst5")
    code, out, err = cli("select", model, "--data", data, "--max-examples", "64", "--ffn-keep-ratio", "0.5",
                         "--out", tmp_path / "s.json")
    assert code == 0, err
    sel = json.loads((tmp_path / "s.json").read_text())
    assert sel["num_neurons_kept"] == 6 * 1536 // 2 and sel["ffn"]["evidence_pass"] == "shared with the heads"
    pruned = prune(model, tmp_path / "s.json", tmp_path / "p")
    reloaded, _ = load_classifier(pruned)
    dense, tok = load_classifier(model)
    rows = load_labelled(data, "validation").head(16)
    _, enc, _ = next(iter_batches(tok, rows, batch_size=16, max_length=128))
    with torch.no_grad():
        got = reloaded(**model_inputs(reloaded, enc)).logits
    want = _masked_logits(dense, sel["kept_heads"], sel["kept_neurons"], model_inputs(dense, enc))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
