"""`cahp-deploy select` end to end: every architecture, determinism, budgets, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ARCHS, cli, tiny_config

from cahp_deploy.methods import REGISTRY


def assert_failed_cleanly(code: int, err: str, out: Path, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert not out.exists() and not out.with_name(f"{out.stem}_mss.png").exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


FAST = ("--pool-size", "8")


@pytest.mark.parametrize("arch", ARCHS)
def test_select_runs_on_every_architecture(arch, tiny_models, tiny_data, tmp_path):
    out = tmp_path / "selection.json"
    code, stdout, err = cli("select", tiny_models[arch], "--data", tiny_data, "--out", out, *FAST)
    assert code == 0, err
    d = json.loads(out.read_text())
    for key in ("method", "kept_heads", "num_heads_kept", "num_heads_total", "knee", "mss_curve", "seed"):
        assert key in d
    assert d["method"] == "cahp" and d["num_heads_total"] == 12 and len(d["kept_heads"]) == 3
    assert d["num_heads_kept"] == sum(map(len, d["kept_heads"])) and all(d["kept_heads"])
    assert [int(k) for k in d["mss_curve"]] == list(range(2, 12))
    assert set(d["timings"]) >= {"signatures", "salience", "embedding", "sweep", "total", "peak_rss_mb"}
    assert d["provenance"]["model_sha256"] and d["provenance"]["num_examples"] == 60
    assert (tmp_path / "selection_mss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"k*={d['knee']}" in stdout


def _without_timings(path: Path) -> dict:
    d = json.loads(path.read_text())
    d.pop("timings")
    return d


def test_same_seed_same_json_and_force(tiny_models, tiny_data, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        assert cli("select", tiny_models["bert"], "--data", tiny_data, "--out", out, *FAST)[0] == 0
    assert _without_timings(a) == _without_timings(b)
    # an existing output needs --force; with it the file is replaced
    code, _, err = cli("select", tiny_models["bert"], "--data", tiny_data, "--out", a, *FAST)
    assert code == 2 and "--force" in err
    code, _, err = cli("select", tiny_models["bert"], "--data", tiny_data, "--out", a, *FAST,
                       "--seed", "3", "--space", "full", "--force")
    assert code == 0, err
    assert json.loads(a.read_text())["seed"] == 3


def test_baselines_at_the_budget_of_a_cahp_selection(tiny_models, tiny_data, tmp_path):
    cahp = tmp_path / "cahp.json"
    assert cli("select", tiny_models["bert"], "--data", tiny_data, "--out", cahp, *FAST)[0] == 0
    kept = json.loads(cahp.read_text())["num_heads_kept"]
    for method in ("random", "gradient"):
        out = tmp_path / f"{method}.json"
        code, _, err = cli("select", tiny_models["bert"], "--data", tiny_data, "--out", out,
                           "--method", method, "--budget-from", cahp)
        assert code == 0, err
        d = json.loads(out.read_text())
        assert d["method"] == method and d["num_heads_kept"] == kept and d["knee"] is None
        assert d["mss_curve"] == {} and not (tmp_path / f"{method}_mss.png").exists()
    out = tmp_path / "ratio.json"
    assert cli("select", tiny_models["bert"], "--data", tiny_data, "--out", out,
               "--method", "random", "--keep-ratio", "0.5")[0] == 0
    assert json.loads(out.read_text())["num_heads_kept"] == 6


@pytest.mark.parametrize("method, flags, recorded", [
    ("dsp", ["--steps", "3", "--lr", "0.3", "--batch-size", "8", "--max-length", "24", "--time-budget", "0"],
     {"steps": 3, "lr": 0.3, "batch_size": 8, "max_length": 24, "time_budget": None}),
    ("l0", ["--steps", "2", "--lambda", "0.05", "--train-weights", "--weights-lr", "1e-4"],
     {"steps": 2, "lambda": 0.05, "train_weights": True, "weights_lr": 1e-4}),
    ("attattr", ["--ig-steps", "2", "--attattr-examples", "4"], {"ig_steps": 2, "attattr_examples": 4}),
])
def test_baseline_options_reach_the_method(method, flags, recorded, tiny_models, tiny_data, tmp_path):
    out = tmp_path / f"{method}.json"
    code, _, err = cli("select", tiny_models["bert"], "--data", tiny_data, "--out", out, "--method", method,
                       "--heads", "4", *flags)
    assert code == 0, err
    d = json.loads(out.read_text())
    assert d["num_heads_kept"] == 4
    assert {k: d["params"][k] for k in recorded} == recorded


def test_method_choices_come_from_the_registry():
    code, stdout, _ = cli("select", "--help")
    assert code == 0 and all(name in stdout for name in REGISTRY)


def _fake_model(directory: Path, config) -> Path:
    directory.mkdir()
    config.save_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"")
    return directory


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_data):
    import transformers as tf

    root = tmp_path_factory.mktemp("bad")

    def data(name: str, text: str) -> Path:
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text(text)
        return root / name

    enc = tiny_config("bert")
    enc.architectures = ["BertModel"]
    gpt = tf.GPT2Config(n_layer=1, n_head=2, n_embd=8)
    gpt.architectures = ["GPT2ForSequenceClassification"]
    return {
        "one_class": data("one_class", '{"text": "a b", "label": 1}\n{"text": "c d", "label": 1}\n'),
        "out_of_range": data("oor", '{"text": "a b", "label": 0}\n{"text": "c d", "label": 7}\n'),
        "empty": data("empty", ""),
        "encoder": _fake_model(root / "encoder", enc),
        "gpt2": _fake_model(root / "gpt2", gpt),
    }


@pytest.mark.parametrize(
    ("case", "extra", "fragment"),
    [
        ("one_class", (), "at least 2"),
        ("out_of_range", (), "labels outside"),
        ("missing_column", ("--text-column", "review"), "'review' not found"),
        ("empty", (), "empty"),
        ("not_a_classifier", (), "not a sequence classifier"),
        ("unsupported", (), "unsupported architecture 'gpt2'"),
        ("pool_size", ("--pool-size", "0"), "--pool-size"),
        ("no_budget", ("--method", "gradient"), "needs a budget"),
        ("two_budgets", ("--method", "random", "--heads", "3", "--keep-ratio", "0.5"), "at most one"),
        ("bad_budget_file", ("--method", "random", "--budget-from", "nope.json"), "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, extra, fragment, bad, tiny_models, tiny_data, tmp_path):
    model = {"not_a_classifier": bad["encoder"], "unsupported": bad["gpt2"]}.get(case, tiny_models["bert"])
    data = bad.get(case, tiny_data) if case in ("one_class", "out_of_range", "empty") else tiny_data
    out = tmp_path / "sel" / "selection.json"
    code, _, err = cli("select", model, "--data", data, "--out", out, *FAST, *extra)
    assert_failed_cleanly(code, err, out, fragment)


def test_a_method_whose_module_is_missing_fails_clearly(monkeypatch, tiny_models, tiny_data, tmp_path):
    monkeypatch.setitem(REGISTRY, "ghost", ("cahp_deploy.methods.ghost_method", True))
    from cahp_deploy.methods.stage import select

    out = tmp_path / "selection.json"
    with pytest.raises(Exception, match="not available in this installation") as info:
        select(tiny_models["bert"], tiny_data, out, method="ghost", heads=3)
    assert type(info.value).__name__ == "CahpError" and not out.exists()
