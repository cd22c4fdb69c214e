"""The study: cells, resumable cache, knee sensitivity, outputs; on a tiny model with tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cahp_deploy import evaluation, schema
from cahp_deploy.study import stage as study_mod
from cahp_deploy.commands.cli import cli
from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.methods import REGISTRY, MethodContext
from cahp_deploy.modeling import load_classifier
from cahp_deploy.study.stage import StudyConfig, parse_budgets, parse_method_option, study
from cahp_deploy.study.sensitivity import jaccard, knee_sensitivity, with_degree

SMALL = dict(budgets=(0.5,), methods=("cahp", "gradient", "random"), random_seeds=(0, 1), recover_epochs=1,
             degrees=(2, 6), sensitivity_seeds=(0, 1))


@pytest.fixture(scope="module")
def done(tiny_models, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    result = study(tiny_models["bert"], tiny_data, out, StudyConfig(**SMALL), show_progress=False)
    return out, result


def test_outputs_and_schema(done):
    out, result = done
    for name in ("study.json", "study.md", "accuracy_vs_heads.png", "kept_heads_heatmap.png", "mss_curve.png"):
        assert (out / name).exists(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "study.json").read_text())
    schema.check_schema(on_disk, schema.STUDY, "study.json")
    assert on_disk["num_heads_total"] == 12 and on_disk["splits"] == {"select": "train", "eval": "validation", "test": None}
    # 4 selections (cahp, gradient, random x2) x 2 budgets (50% and CAHP's knee)
    assert len(on_disk["cells"]) == 8
    assert [b["label"] for b in on_disk["budgets"]] == ["50%", "knee"]
    assert on_disk["budgets"][0]["heads"] == 6 and on_disk["budgets"][1]["heads"] == on_disk["knee"]["heads_kept"]


def test_cells_are_consistent(done, tiny_models, tiny_data):
    _, result = done
    model, tok = load_classifier(tiny_models["bert"])
    val = load_labelled(tiny_data, "validation")
    for cell in result["cells"]:
        assert cell["error"] is None
        assert sum(len(k) for k in cell["kept_heads"]) == cell["heads_kept"] <= cell["heads_budget"]
        assert all(len(k) >= 1 for k in cell["kept_heads"])  # the one-head-per-layer guard
        assert 0 <= cell["accuracy_before"]["eval"] <= 1 and 0 <= cell["accuracy_after"]["eval"] <= 1
        assert len(cell["recovery"]["epochs"]) == 1
    # "before" is the gated accuracy of exactly the kept heads
    cell = result["cells"][0]
    assert cell["accuracy_before"]["eval"] == evaluation.masked_accuracy(model, tok, val, cell["kept_heads"])
    assert result["dense"]["eval"] == evaluation.accuracy(model, tok, val)
    # summary: random is averaged over its two seeds
    rnd = result["summary"]["before"]["eval"]["random"]["50%"]
    accs = [c["accuracy_before"]["eval"] for c in result["cells"] if c["method"] == "random" and c["budget"] == "50%"]
    assert rnd["n"] == 2 and rnd["mean"] == pytest.approx(np.mean(accs)) and rnd["std"] == pytest.approx(np.std(accs))


def test_markdown_tables(done):
    out, result = done
    md = (out / "study.md").read_text()
    assert "## Accuracy before recovery (`validation`)" in md and "## Accuracy after recovery" in md
    assert "| method | 50% (6 heads) | knee (" in md
    assert "| random | " in md and " ± " in md
    assert "## Knee sensitivity" in md and "### t-SNE space" in md and "### full space" in md
    assert "| degree 2 |" in md and "| seed 1 |" in md


def test_sensitivity_rows(done):
    _, result = done
    sens = result["sensitivity"]
    assert sens["default"] == {"space": "tsne", "degree": 6, "seed": 42}
    for space in ("tsne", "full"):
        block = sens[space]
        assert [r["degree"] for r in block["degree"]] == [2, 6]
        assert [r["seed"] for r in block["seed"]] == [0, 1]
        assert block["default"]["jaccard_vs_default"] == 1.0
        # degree 6 at the default seed is the reference itself
        assert block["degree"][1]["kept_heads"] == block["default"]["kept_heads"]
        assert all(0.0 <= r["jaccard_vs_default"] <= 1.0 for r in block["degree"] + block["seed"])
    assert sens["tsne"]["default"]["k_star"] == result["knee"]["k"]


def test_resume_reuses_cells_and_redoes_changed_ones(done, tiny_models, tiny_data, monkeypatch):
    out, result = done
    with pytest.raises(CahpError, match="already holds a study; pass --force"):
        study(tiny_models["bert"], tiny_data, out, StudyConfig(**SMALL), show_progress=False)

    def boom(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(study_mod, "_recover_and_measure", boom)
    monkeypatch.setattr(study_mod, "_run_method", boom)
    monkeypatch.setattr("cahp_deploy.methods.cahp.collect_evidence", boom)
    again = study(tiny_models["bert"], tiny_data, out, StudyConfig(**SMALL), force=True, show_progress=False)
    assert again["cells"] == result["cells"] and again["sensitivity"] == result["sensitivity"]
    # another recovery setting changes every cell's key: recomputed (and here, refused by boom)
    with pytest.raises(AssertionError, match="recomputed"):
        study(tiny_models["bert"], tiny_data, out, StudyConfig(**{**SMALL, "recover_epochs": 2}), force=True,
              show_progress=False)


def test_ranking_methods_recut_equals_the_method(tiny_models, tiny_data):
    """The study re-cuts gradient/random at every budget from one run's scores: same as running them."""
    from cahp_deploy.methods.gradient import select as gradient
    from cahp_deploy.methods.random_heads import select as random_heads
    from cahp_deploy.selection.topk import keep_top_k

    model, tok = load_classifier(tiny_models["bert"])
    data = load_labelled(tiny_data, "train")
    for run in (gradient, random_heads):
        first = run(MethodContext(model=model, tokenizer=tok, data=data, budget=4, seed=1))
        for k in (3, 7, 11):
            direct = run(MethodContext(model=model, tokenizer=tok, data=data, budget=k, seed=1)).kept_heads
            assert keep_top_k(np.asarray(first.scores), k, min_per_layer=1) == direct


def test_missing_method_is_skipped_with_a_note(tiny_models, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "pass", ("cahp_deploy.methods.not_written_yet", True))
    cfg = StudyConfig(budgets=(0.5,), methods=("random", "pass"), random_seeds=(0,), recover=False)
    result = study(tiny_models["bert"], tiny_data, tmp_path / "s", cfg, show_progress=False)
    assert result["methods"] == {"run": ["random"], "skipped": {"pass": "cahp_deploy.methods.not_written_yet is not installed"}}
    assert {c["method"] for c in result["cells"]} == {"random"} and result["knee"] is None
    assert all(c["accuracy_after"] is None for c in result["cells"])
    assert "Skipped: pass" in (tmp_path / "s" / "study.md").read_text()


def test_jaccard_by_hand():
    assert jaccard([[0, 1], [2]], [[1], [2, 3]]) == pytest.approx(2 / 4)  # {(0,1),(1,2)} of 4 pairs
    assert jaccard([[0]], [[0]]) == 1.0 and jaccard([[]], [[]]) == 1.0 and jaccard([[0]], [[1]]) == 0.0


def test_with_degree_refits_the_same_sweep(tiny_models, tiny_data):
    from cahp_deploy.methods.cahp import collect_evidence
    from cahp_deploy.selection.knee import find_knee

    model, tok = load_classifier(tiny_models["bert"])
    ev = collect_evidence(MethodContext(model=model, tokenizer=tok, data=load_labelled(tiny_data, "train"), seed=0))
    for d in (2, 4):
        assert with_degree(ev, d).knee == find_knee(ev.sweep.ks, ev.sweep.mss, d)
    sens = knee_sensitivity(ev, [6], [0], spaces=("tsne",))
    assert sens["tsne"]["seed"][0]["kept_heads"] == sens["tsne"]["default"]["kept_heads"]  # seed 0 = ev's seed
    assert sens["jaccard_between_space_defaults"] is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eval_split="train"), "also the selection split"),
        (dict(budgets=(0.0, 0.5)), r"fractions of all heads in \(0, 1\]"),
        (dict(methods=("cahp", "magic")), "unknown method"),
        (dict(test_split="validation"), "--test-split"),
        (dict(recover_max_examples=0), "--recover-max-examples"),
        (dict(random_seeds=()), "--random-seeds"),
    ],
)
def test_config_errors(kw, match, tiny_models, tiny_data, tmp_path):
    with pytest.raises(CahpError, match=match):
        study(tiny_models["bert"], tiny_data, tmp_path / "s", StudyConfig(**kw))
    assert not (tmp_path / "s").exists()


def test_parsers():
    from cahp_deploy.commands import study as study_command

    assert study_command.DEFAULT_METHODS == study_mod.DEFAULT_METHODS  # the CLI's copy stays in step
    assert parse_budgets("0.5, 0.1,0.5") == (0.1, 0.5)
    assert parse_method_option(["l0.steps=100", "cahp.space=full", "l0.train-weights=true"]) == {
        "l0": {"steps": 100, "train_weights": True}, "cahp": {"space": "full"}}
    with pytest.raises(CahpError, match="METHOD.KEY=VALUE"):
        parse_method_option(["steps=100"])
    with pytest.raises(CahpError, match="--budgets"):
        parse_budgets("a,b")


def test_not_a_study_dir_is_refused(tiny_models, tiny_data, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CahpError, match="is not a study"):
        study(tiny_models["bert"], tiny_data, tmp_path / "other", StudyConfig(methods=("random",)))


def test_cli_with_a_test_split(tiny_models, tiny_data, tmp_path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    shutil.copy(data_dir / "validation.jsonl", data_dir / "test.jsonl")
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, [
        "study", str(tiny_models["distilbert"]), "--data", str(data_dir), "--out", str(out), "--methods", "random",
        "--budgets", "0.25,0.5", "--random-seeds", "3", "--no-recover", "--test-split", "test",
        "--note", "REDUCED: a test run",
    ])
    assert result.exit_code == 0, result.output
    assert "study written to" in result.output
    data = json.loads((out / "study.json").read_text())
    assert data["config"]["random_seeds"] == [3] and len(data["cells"]) == 2
    # test.jsonl is a copy of validation.jsonl: the final table must show the same numbers
    assert data["dense"]["test"] == data["dense"]["eval"]
    assert all(c["accuracy_before"]["test"] == c["accuracy_before"]["eval"] for c in data["cells"])
    md = (out / "study.md").read_text()
    assert "> **REDUCED: a test run**" in md and "## Final table (`test`): before recovery" in md


def test_new_cahp_evidence_redoes_cahp_cells_only(done, tiny_models, tiny_data, monkeypatch, tmp_path):
    """The evidence pickle is a local cache: when it is recomputed and comes out different (e.g. after a
    change in how salience is computed), CAHP's cells and the sensitivity scan must not be reused."""
    import dataclasses
    import shutil

    from cahp_deploy.study import sensitivity as study_sensitivity
    from cahp_deploy.methods import cahp as cahp_mod

    out, _ = done
    copy_dir = tmp_path / "s"
    shutil.copytree(out, copy_dir)
    (copy_dir / "cells" / "cahp_evidence.pkl").unlink()
    real = cahp_mod.collect_evidence

    def shifted(ctx):
        ev = real(ctx)
        return dataclasses.replace(ev, salience=ev.salience[::-1].copy())

    monkeypatch.setattr(cahp_mod, "collect_evidence", shifted)
    monkeypatch.setattr(study_mod, "_recover_and_measure", lambda *a, **k: ({"eval": -1.0}, {"epochs": []}))
    scans = []
    real_scan = study_sensitivity.knee_sensitivity
    monkeypatch.setattr(study_sensitivity, "knee_sensitivity", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    again = study(tiny_models["bert"], tiny_data, copy_dir, StudyConfig(**SMALL), force=True, show_progress=False)
    redone = {c["method"]: c["accuracy_after"] == {"eval": -1.0} for c in again["cells"] if c["budget"] == "50%"}
    assert redone == {"cahp": True, "gradient": False, "random": False}
    assert scans == [1]
