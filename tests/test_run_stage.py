"""`run` end to end on a tiny model: layout, run.json, resume, partial reruns, --force, the demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cahp_deploy import schema
from cahp_deploy.run.stage import run

STAGES = ["select", "prune", "refit", "recover", "export-dense", "export-pruned", "bench", "confirm"]
#: tiny settings: a seeded baseline method (no t-SNE), one short grid cell, little timing
TINY = dict(
    method="random", heads=6, batch=(1,), seq=(16,), min_seconds=0.01, min_reps=2, warmup=1, traffic=False,
    timing=False, variants=("optimized",),
)
TINY_CLI = ["--method", "random", "--heads", "6", "--batch", "1", "--seq", "16", "--min-seconds", "0.01",
            "--min-reps", "2", "--warmup", "1", "--no-traffic", "--no-timing", "--variant", "optimized"]


def _status(out: Path) -> dict[str, str]:
    record = json.loads((out / "run.json").read_text())
    return {name: s["status"] for name, s in record["stages"].items()}


def _stamps(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def first_run(tiny_models, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    result = run(tiny_models["bert"], tiny_data, out, **TINY)
    return out, result


def test_layout_and_record(first_run, tiny_data):
    out, result = first_run
    for path in ["selection.json", "pruned/config.json", "pruned/pruning.json", "artifacts/dense/manifest.json",
                 "artifacts/pruned/model_optimized.onnx", "report/report.md", "report/report.json"]:
        assert (out / path).is_file(), path
    record = json.loads((out / "run.json").read_text())
    assert record["schema"] == schema.RUN
    assert list(record["stages"]) == STAGES
    for name, stage in record["stages"].items():
        assert stage["status"] == "done"
        assert stage["seconds"] >= 0 and len(stage["inputs_sha256"]) == 64 and len(stage["output_sha256"]) == 64
    assert record["stages"]["select"]["inputs"]["data"] == {"train.jsonl": _sha(tiny_data / "train.jsonl")}
    assert record["eval_split"] == "validation" and record["select_split"] == "train"
    assert result["report"] == str(out / "report" / "report.md")
    # INT8 is exported (the default), so recovery trained under its rounding, and export used that granularity
    (recovery,) = [json.loads(p.read_text()) for p in out.rglob("recovery.json")]
    assert recovery["params"]["qat"]
    pruned = json.loads((out / "artifacts/pruned/manifest.json").read_text())
    assert pruned["variants"]["int8"]["quantization_aware"] and "qat_match" in pruned["variants"]["int8"]


def test_confirm_writes_confirm_json_only_and_no_recorded_hash_is_patched(first_run):
    """The confirm stage rewrites no artifact: the manifests are the bytes export wrote, every output hash
    run.json recorded is still the hash of the output, and confirm.json names the manifests it describes."""
    from cahp_deploy.hashing import sha256_file
    from cahp_deploy.run.record import output_sha256
    from cahp_deploy.shipped import choice

    out, _ = first_run
    record = json.loads((out / "run.json").read_text())
    for name, stage in record["stages"].items():
        assert output_sha256(out / stage["output"]) == stage["output_sha256"], name
    # bench's recorded input is export's recorded output, unpatched
    assert record["stages"]["bench"]["inputs"]["pruned_sha256"] == record["stages"]["export-pruned"]["output_sha256"]
    confirm = json.loads((out / "confirm.json").read_text())
    for name in ("dense", "pruned"):
        manifest = out / "artifacts" / name / "manifest.json"
        assert not {"recommended", "recommended_why", "promise"} & set(json.loads(manifest.read_text()))
        assert confirm["artifacts"][name] == {"path": f"artifacts/{name}", "manifest_sha256": sha256_file(manifest)}
    got = choice(out / "artifacts/pruned")
    assert got["recommended"] == confirm["recommended"] and got["source"] == str((out / "confirm.json").resolve())
    assert choice(out / "artifacts/dense")["recommended"] is None


def _sha(path):
    from cahp_deploy.hashing import sha256_file

    return sha256_file(path)


def test_summary_compares_dense_and_pruned(first_run):
    _, result = first_run
    rows = {(r["artifact"], r["variant"]): r for r in result["summary"]["rows"]}
    assert {("dense", "fp32"), ("dense", "optimized"), ("pruned", "optimized")} <= set(rows)
    dense, pruned = rows[("dense", "optimized")], rows[("pruned", "optimized")]
    assert pruned["heads_kept"] == 6 and pruned["heads_total"] == 12
    assert pruned["params"] < dense["params"] and pruned["bytes"] < dense["bytes"]
    assert pruned["p50_ms"]["1x16"] > 0 and 0 <= pruned["accuracy"] <= 1
    assert result["summary"]["eval_split"] == "validation"


def test_summary_md_answers_in_words_first(first_run):
    import re

    out, result = first_run
    lines = (out / "summary.md").read_text().splitlines()
    # first what was shipped and its accuracy change with an interval, then the heads
    assert lines[4] == ("- Shipped: the pruned model's `optimized` variant (no accuracy budget: the fp32-exact "
                        "optimized graph).")
    assert re.match(r"- Accuracy vs dense on the evaluation rows: drop [+-]\d+\.\d points \(90% CI [+-]\d+\.\d \.\. [+-]\d+\.\d, 30 rows\)", lines[5]), lines[5]
    assert "- Kept 6 of 12 attention heads (50%)." in lines  # a baseline: no knee, no budget
    text = "\n".join(lines)
    assert re.search(r"dense \d+\.\d%, pruned \d+\.\d% before recovery, \d+\.\d% after recovery "
                     r"\(least-squares refit against dense on \d+ train rows, then 3 epochs on \d+ train rows\): "
                     r"drop [+-]\d+\.\d points", text), text
    assert "Heads were selected on train, recovery trained on train; accuracy is measured on validation" in text
    assert "final pruned model (Hugging Face dir): `recovered`" in text
    assert result["summary"]["recovery"]["epochs"] == 3


def test_rerun_skips_every_stage_and_touches_nothing(first_run, tiny_models, tiny_data):
    out, _ = first_run
    before = _stamps(out)
    run(tiny_models["bert"], tiny_data, out, **TINY)
    assert set(_status(out).values()) == {"skipped"}
    assert _stamps(out) == before


def test_changed_option_reruns_only_what_depends_on_it(first_run, tiny_models, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    run(tiny_models["bert"], tiny_data, out, **(TINY | {"heads": 8}))
    assert _status(out) == {"select": "done", "prune": "done", "refit": "done", "recover": "done", "export-dense": "skipped",
                            "export-pruned": "done", "bench": "done", "confirm": "done"}
    assert json.loads((out / "selection.json").read_text())["num_heads_kept"] == 8

    shutil.rmtree(out / "report")  # a missing (or edited) output is redone, nothing else
    run(tiny_models["bert"], tiny_data, out, **(TINY | {"heads": 8}))
    assert _status(out)["bench"] == "done" and _status(out)["export-pruned"] == "skipped"

    run(tiny_models["bert"], tiny_data, out, force=True, **(TINY | {"heads": 8}))
    assert set(_status(out).values()) == {"done"}


def test_cli_prints_the_summary_table(first_run, tiny_models, tiny_data):
    from conftest import cli

    out, _ = first_run
    code, stdout, err = cli("run", tiny_models["bert"], "--data", tiny_data, "--out", out, *TINY_CLI)
    assert code == 0, err
    assert "dense vs pruned" in stdout and "6/12" in stdout and "12/12" in stdout
    assert "report.md" in stdout
    # the CLI maps its options onto exactly the arguments TINY gives run(): nothing to redo
    assert set(_status(out).values()) == {"skipped"}


def test_demo_fine_tunes_then_runs_and_resumes(tiny_models, tmp_path, monkeypatch, capsys):
    """The demo's wiring, with a tiny encoder standing in for the packaged MiniLM."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cahp_deploy.demo import finetune as ft
    from cahp_deploy.demo.quickstart import demo

    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    BertModel(BertConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=32,
                         max_position_embeddings=128)).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(encoder)
    monkeypatch.setattr(ft, "base_encoder_path", lambda: encoder)
    monkeypatch.setattr(ft, "EPOCHS", 1)

    out = tmp_path / "demo"
    # the demo's own path: an accuracy budget (CAHP's ladder, the refit), on the tiny encoder
    opts = {k: v for k, v in TINY.items() if k not in ("method", "heads")}
    result = demo(out, **opts)
    err = capsys.readouterr().err
    assert "DEMONSTRATION" in err and "in-package" in err
    assert _status(out)["finetune"] == "done"
    assert json.loads((out / "model" / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    assert result["summary"]["eval_split"] == "validation" and result["summary"]["search"] is not None
    assert result["summary"]["confirm"]["confirmation_rows"]["split"] == "test"
    assert (out / "summary.md").read_text().splitlines()[4].startswith("- Shipped:")
    demo(out, **opts)
    assert set(_status(out).values()) == {"skipped"}
