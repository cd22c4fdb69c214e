"""`run --max-accuracy-drop` on a tiny planted task: the real search (CAHP evidence -> candidates ->
select_at -> prune -> recover -> measure -> search_k), checked against every candidate measured.

Planted task: a sentence holds one sentiment word of two different classes (plus filler); the label
is the class of the word that comes FIRST. Reading the order needs attention, so a 2-layer x 8-head
model (head_dim 2) trained on it loses accuracy as heads are removed, and a short recovery wins back
part of it: recovered accuracy rises with k, which gives the search something to find.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cahp_deploy.paired import paired_drop

from cahp_deploy.run import accuracy_budget
from cahp_deploy.run.budget_search import ladder

from conftest import _FILLER, _WORDS, build_tiny_model, tokenizer_dir

COLUMNS = dict(text_column=None, text_pair_column=None, label_column="label")
#: one short epoch: enough to move accuracy, a second or so per candidate
RECOVER = dict(epochs=1, lr=1e-4, batch_size=16, freeze_embeddings=False, progress=False)


def _write_order_task(directory, n_train=150, n_val=90, seed=0):
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                first, second = rng.sample(range(3), 2)
                words = rng.sample(_FILLER, rng.randint(2, 5))
                lo, hi = sorted(rng.sample(range(len(words) + 1), 2))
                words.insert(hi, rng.choice(_WORDS[second]))
                words.insert(lo, rng.choice(_WORDS[first]))
                f.write(json.dumps({"text": " ".join(words), "label": first}) + "\n")
    return directory


def train_planted(root, n_train: int = 150, n_val: int = 90, seed: int = 0):
    """(data dir, dense model dir, model, tokenizer): a tiny BERT trained on the order task, under ``root``."""
    import torch
    from transformers import AutoTokenizer

    from cahp_deploy.data import load_labelled
    from cahp_deploy.recovery import RecoveryParams, finetune_in_place

    data = _write_order_task(root / "data", n_train=n_train, n_val=n_val, seed=seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(0)
    model = build_tiny_model("bert", layers=2, heads=8, head_dim=2)
    finetune_in_place(model, tok, load_labelled(data, "train"),
                      RecoveryParams(epochs=30, lr=3e-3, batch_size=8, freeze_embeddings=False))
    dense = root / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    return data, dense, model, tok


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(root, data dir, dense model dir) of a tiny BERT trained on the order task."""
    root = tmp_path_factory.mktemp("budget")
    data, dense, _, _ = train_planted(root)
    return root, data, dense


def settings_for(data, dense, max_drop, recover=RECOVER, search_step=None, reconstruct=None):
    from cahp_deploy.data import load_labelled
    from cahp_deploy.run.record import model_sha256

    return accuracy_budget.SearchSettings(
        model=str(dense), data=str(data), model_sha256=model_sha256(dense),
        select_data=load_labelled(data, "train"), eval_data=load_labelled(data, "validation"),
        recover_split="train", columns=COLUMNS, seed=0, cahp_options={}, recover=recover,
        eval_max_examples=None, max_drop=max_drop, search_step=search_step, reconstruct=reconstruct,
    )


@pytest.fixture(scope="module")
def exhaustive(planted):
    """(search root, ks, dense accuracy, {k: recovered accuracy}, {k: upper bound of the paired drop}) for
    every candidate k.

    Measured with the search's own candidate code into the search's own directory, so the search
    below reads these numbers back from its cache instead of recomputing them.
    """
    from cahp_deploy import evaluation
    from cahp_deploy.modeling import load_classifier

    root, data, dense = planted
    settings = settings_for(data, dense, max_drop=0.0)
    search_root = root / "search"
    search_root.mkdir()
    evidence = accuracy_budget.collect(settings, search_root)
    rungs = ladder(evidence.knee.k, evidence.num_heads)  # 16 heads: a rung per head
    assert rungs == list(range(16, evidence.knee.k - 1, -1))
    ks = rungs[::-1]
    from cahp_deploy.paired import correct

    net, tok = load_classifier(dense)
    dense_correct = correct(evaluation.logits(net, tok, settings.eval_data), settings.eval_data.labels)
    results = {k: accuracy_budget.measure_candidate(settings, evidence, k, search_root, dense_correct) for k in ks}
    table = {k: r.accuracy for k, r in results.items()}
    upper = {k: r.drop["upper"] for k, r in results.items()}
    return search_root, ks, float(dense_correct.mean()), table, upper


def test_search_picks_the_smallest_k_whose_drop_bound_meets_the_budget(planted, exhaustive):
    _, data, dense = planted
    search_root, ks, dense_acc, table, upper = exhaustive
    bound = [upper[k] for k in ks]
    # Budgets whose passing candidates (upper bound of the paired drop within the budget) form a
    # suffix, so "the smallest k that meets it" is well defined whatever the search order.
    splits = [j for j in range(1, len(ks)) if min(bound[:j]) > max(bound[j:]) >= 0]
    assert splits, f"the planted task should make the drop bound fall with k: {upper}, dense {dense_acc}"
    j = splits[0]
    max_drop = max(bound[j:]) + 1e-6
    record = accuracy_budget.search(settings_for(data, dense, max_drop), search_root)

    assert record["chosen_k"] == ks[j] and record["error"] is None
    assert record["dense_accuracy"] == pytest.approx(dense_acc)
    tried = [c["k"] for c in record["tried"]]
    assert tried == ks[j - 1:][::-1] and record["stopped_at"] == ks[j - 1]  # every head down to the first miss
    for c in record["tried"]:  # each candidate tried reports both accuracies, its drop, its time and its size
        assert c["accuracy"] == pytest.approx(table[c["k"]]) and 0 <= c["accuracy_before"] <= 1
        assert c["drop"]["upper"] == pytest.approx(upper[c["k"]]) and c["drop"]["upper"] >= c["drop"]["drop"]
        assert c["seconds"] > 0 and c["details"]["heads_kept"] >= c["k"] and c["details"]["flop_ceiling_speedup"] >= 1
    model = accuracy_budget.chosen_model(search_root)
    assert json.loads((model / "config.json").read_text())["cahp_kept_heads"] is not None
    assert (model / "recovery.json").is_file()
    # only the chosen candidate keeps its model; every candidate keeps its numbers
    assert sorted(p.parent.name for p in search_root.glob("k*/model")) == [f"k{ks[j]:03d}"]
    assert len(list(search_root.glob("k*/candidate.json"))) == len(ks)
    assert (search_root / "tradeoff.png").stat().st_size > 0


def test_run_cli_with_impossible_budget_stops_in_one_line_without_artifact(planted, tmp_path):
    """A budget of 0 points: the 54 decision rows cannot show any model within it, not even the
    first rung (every head: dense itself, bound 2.4 points). `run` must say so in one line, exit
    non-zero, export nothing, and leave a run dir a rerun resumes from."""
    from conftest import cli

    _, data, dense = planted
    out = tmp_path / "run"
    code, stdout, err = cli(
        "run", dense, "--data", data, "--out", out, "--max-accuracy-drop", "0", "--recover-epochs", "2",
        "--recover-lr", "0.5", "--no-timing", "--batch", "1", "--seq", "16", "--no-traffic", "--ladder", "heads",
    )
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "cannot show a drop within --max-accuracy-drop 0" in lines[0], err
    assert "Traceback" not in err
    assert not (out / "artifacts").exists() and not (out / "report").exists()
    record = json.loads((out / "search" / "search.json").read_text())
    assert record["chosen_k"] is None and record["tried"][-1]["k"] == 16  # it did try the dense-sized one
    assert not list((out / "search").glob("k*/model"))  # no candidate model left behind
    # the dir is a run dir: a rerun (here the same budget) resumes and reuses every candidate recovered
    assert (out / "run.json").is_file()
    code, _, err = cli(
        "run", dense, "--data", data, "--out", out, "--max-accuracy-drop", "0", "--recover-epochs", "2",
        "--recover-lr", "0.5", "--no-timing", "--batch", "1", "--seq", "16", "--no-traffic", "--ladder", "heads",
    )
    assert code != 0 and err.count("done before, reused") == len(record["tried"]), err


def test_run_with_budget_exports_the_chosen_candidate_and_says_so(planted, exhaustive, tmp_path):
    from cahp_deploy.run.stage import run

    _, data, dense = planted
    _, ks, dense_acc, table, _ = exhaustive
    out = tmp_path / "run"
    result = run(dense, data, out, max_accuracy_drop=100.0, ladder="heads", search_step=8, recover_epochs=1, recover_lr=1e-4,
                 recover_options={"batch_size": 16, "freeze_embeddings": False}, seed=0, timing=False,
                 batch=(1,), seq=(16,), min_seconds=0.01, min_reps=2, warmup=1, traffic=False,
                 variants=("optimized",))
    record = json.loads((out / "run.json").read_text())
    assert list(record["stages"]) == ["search", "export-dense", "export-pruned", "bench", "confirm"]
    search = json.loads((out / "search" / "search.json").read_text())
    # any accuracy will do: every rung passes, down to the knee
    assert search["chosen_k"] == ks[0] and [c["k"] for c in search["tried"]] == ladder(ks[0], 16, 8)
    manifest = json.loads((out / "artifacts" / "pruned" / "manifest.json").read_text())
    assert sum(len(h) for h in manifest["kept_heads"]) == search["tried"][-1]["details"]["heads_kept"]
    text = (out / "summary.md").read_text()
    assert text.splitlines()[4].startswith("- Shipped: the pruned model's `optimized` variant (fastest measured artifact")
    assert "the budget of 100 points HOLDS" in text and "within 100 points of dense" in text
    confirm = json.loads((out / "confirm.json").read_text())
    from cahp_deploy.shipped import choice

    shipped = choice(out / "artifacts" / "pruned")  # confirm.json is the one record of the shipped choice
    assert "recommended" not in manifest and shipped["recommended"] == confirm["recommended"] == "optimized"
    assert (out / "pareto.png").stat().st_size > 0
    # decision and confirmation rows are disjoint parts of the 90 validation rows: 56 decide, 34 (38%) confirm
    assert (confirm["decision_rows"]["num_examples"], confirm["confirmation_rows"]["num_examples"]) == (56, 34)
    assert search["tried"][0]["drop"]["n"] == 56 and search["eval"]["num_examples"] == 56
    # export's checks (and its INT8 gate) read the selection split, never a decision or confirmation row
    assert manifest["parity_data"]["split"] == "train"
    # one error rate: the search and the shipping sequence each decide at half of it
    assert search["confidence"] == pytest.approx(0.95) and confirm["error_rates"]["alpha"] == pytest.approx(0.1)
    assert confirm["variants"]["optimized"]["decision"]["confidence"] == pytest.approx(0.95)
    assert confirm["variants"]["optimized"]["confirmation"]["confidence"] == pytest.approx(0.9)
    # one max length, chosen once, recorded where the artifact's users read it
    assert record["max_length"]["max_length"] == manifest["max_length"] == confirm["max_length"]
    assert shipped["promise"]["confirmed"] is True and shipped["promise"]["max_drop_points"] == 100.0
    assert confirm["shipped"]["path"] == "artifacts/pruned"  # relative: no machine's absolute path
    assert "before recovery" in text and "Accuracy budget search" in text and "tradeoff.png" in text
    assert result["summary"]["search"]["chosen_k"] == ks[0]
    # one budget for the whole artifact: export's INT8 gate is the budget itself (its rows can bound it)
    dense_manifest = json.loads((out / "artifacts" / "dense" / "manifest.json").read_text())
    assert dense_manifest["variants"]["int8"]["gate"]["max_drop_points"] == 100.0


def test_the_first_rung_is_dense_itself_and_is_not_recovered(planted, exhaustive):
    """k = 16 keeps every head: the pruned model is the dense model, so it is judged as it is (a drop of
    exactly 0) and never recovered, even by a recovery that would wreck it."""
    search_root, ks, dense_acc, _, upper = exhaustive
    first = json.loads((search_root / "k016" / "candidate.json").read_text())
    assert first["dense_anchor"] is True and first["judged"] == "pruned" and first["accuracy_after"] is None
    assert first["accuracy_before"] == pytest.approx(dense_acc) and not (search_root / "k016" / "recovery.json").exists()
    # no discordant row: the bound of rows identical to dense, still above zero
    same = np.ones(90, dtype=bool)
    assert upper[16] == pytest.approx(paired_drop(same, same, 0.9).upper) and upper[16] > 0
    others = [json.loads(p.read_text()) for p in search_root.glob("k*/candidate.json") if p.parent.name != "k016"]
    assert others and all(not c["dense_anchor"] if "dense_anchor" in c else c["judged"] == "recovered" for c in others)


def test_a_rung_is_refit_against_dense_and_its_record_says_how_far_it_moved(planted, tmp_path):
    """With the refit on (run's default under a budget) and no fine-tune, a pruned rung is the refit model;
    its record has the MACs removed, agreement with dense before and after, and the refit's own record."""
    from cahp_deploy import evaluation
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.paired import correct

    _, data, dense = planted
    settings = settings_for(data, dense, max_drop=100.0, recover=None, reconstruct={"max_examples": 40})
    root = tmp_path / "search"
    root.mkdir()
    evidence = accuracy_budget.collect(settings, root)
    net, tok = load_classifier(dense)
    pred = evaluation.logits(net, tok, settings.eval_data).argmax(axis=1)
    k = evidence.knee.k
    result = accuracy_budget.measure_candidate(settings, evidence, k, root, correct(pred, settings.eval_data.labels), pred)
    record = json.loads((root / f"k{k:03d}" / "candidate.json").read_text())
    assert record["recovery"] == "least-squares refit" and result.judged == "recovered"
    assert 0 < record["macs_removed"] < 1 and result.details["macs_removed"] == record["macs_removed"]
    assert 0 <= record["agreement_before"] <= 1 and 0 <= record["agreement_after"] <= 1
    refit = json.loads((root / f"k{k:03d}" / "refit.json").read_text())
    assert refit["calibration"]["num_examples"] == 40 and refit["calibration"]["split"] == "train"
    assert (root / f"k{k:03d}" / "model" / "refit.json").is_file()  # the judged model is the refit one
    # the dense anchor is never refit: it is dense itself
    first = accuracy_budget.measure_candidate(settings, evidence, 16, root, correct(pred, settings.eval_data.labels), pred)
    assert first.judged == "pruned" and first.details["dense_anchor"] is True


def test_under_a_budget_an_int8_graph_that_fails_its_gate_is_kept_and_judged(planted, exhaustive, tmp_path, monkeypatch):
    """Every INT8 graph misses its own gate (planted): the run does not stop; each artifact keeps its INT8
    graph marked ``gate_failed``, run.json and the summary say so, bench times it, and the shipping
    sequence judges it against dense like every other graph."""
    import cahp_deploy.export.stage as export_stage
    from cahp_deploy.run.stage import run

    monkeypatch.setattr(export_stage, "_int8_gate_failure", lambda result, where, tuned: "INT8 gate failed: planted")
    _, data, dense = planted
    out = tmp_path / "run"
    run(dense, data, out, max_accuracy_drop=100.0, ladder="heads", search_step=8, recover=False, seed=0, timing=False,
        batch=(1,), seq=(16,), min_seconds=0.01, min_reps=2, warmup=1, traffic=False)
    record = json.loads((out / "run.json").read_text())
    assert set(record["int8_gate_failed"]) == {"export-dense", "export-pruned"}
    assert "planted" in record["int8_gate_failed"]["export-pruned"]
    for art in ("dense", "pruned"):
        manifest = json.loads((out / "artifacts" / art / "manifest.json").read_text())
        assert manifest["variants"]["int8"]["gate_failed"] == "INT8 gate failed: planted"
        assert (out / "artifacts" / art / "model_int8.onnx").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    timed = {(c["artifact"], c["variant"]) for c in report["cells"]}
    assert ("dense", "int8") in timed and ("pruned", "int8") in timed
    confirm = json.loads((out / "confirm.json").read_text())  # both INT8 graphs scored against dense, as candidates
    assert confirm["variants"]["int8"]["decision"]["n"] == confirm["dense_int8"]["decision"]["n"] > 0
    assert "INT8 graph failed its own accuracy gate" in (out / "summary.md").read_text()
    # INT8 figures say how the rows were batched: a dynamic-INT8 graph's labels depend on it
    assert "INT8 graphs were scored in length-bucketed batches of 32" in (out / "summary.md").read_text()


def test_without_a_budget_a_failed_int8_gate_still_stops_export(planted, tmp_path, monkeypatch):
    import cahp_deploy.export.stage as export_stage
    from cahp_deploy.errors import Int8GateError

    monkeypatch.setattr(export_stage, "_int8_gate_failure", lambda result, where, tuned: "INT8 gate failed: planted")
    _, data, dense = planted
    with pytest.raises(Int8GateError, match="planted; nothing was written"):
        export_stage.export(dense, tmp_path / "art", quantize="int8", data=data, split="validation", measure=False)
    assert not (tmp_path / "art").exists()
