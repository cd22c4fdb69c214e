"""`predict`: ONNX Runtime + tokenizers give the PyTorch model's probabilities, with no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cahp_deploy.errors import CahpError
from cahp_deploy.predict import predict, read_inputs

TEXTS = ["the movie was great and lovely", "a dull , boring plot", "okay", "x " * 300]


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    """bert (fp32 + int8) and distilbert (no token_type_ids input) artifacts of the tiny models."""
    from cahp_deploy.export import export

    root = tmp_path_factory.mktemp("predict_art")
    return {
        "bert": export(tiny_models["bert"], root / "bert", optimize=False, quantize="int8"),
        "distilbert": export(tiny_models["distilbert"], root / "distilbert", optimize=False),
    }


def _torch_probs(model_dir, texts, pairs=None):
    import torch

    from cahp_deploy.modeling import load_classifier

    net, tok = load_classifier(model_dir)
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=net.config.max_position_embeddings,
              return_tensors="pt", return_token_type_ids=net.config.model_type != "distilbert")
    with torch.inference_mode():
        return torch.softmax(net(**enc).logits, -1).numpy()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_probabilities_match_pytorch(arch, artifacts, tiny_models):
    results = predict(artifacts[arch], TEXTS, variant="fp32", batch_size=3)
    probs = np.array([list(r.scores.values()) for r in results])
    np.testing.assert_allclose(probs, _torch_probs(tiny_models[arch], TEXTS), atol=1e-4)
    config = json.loads((artifacts[arch] / "config.json").read_text())
    assert [r.label for r in results] == [config["id2label"][str(int(p.argmax()))] for p in probs]
    assert all(r.label_id == int(p.argmax()) for r, p in zip(results, probs))


def test_text_pairs_match_pytorch(artifacts, tiny_models):
    texts, pairs = ["a good story", "bad actors"], ["with lovely scenes", "and a plot"]
    results = predict(artifacts["bert"], texts, pairs, variant="fp32")
    probs = np.array([list(r.scores.values()) for r in results])
    np.testing.assert_allclose(probs, _torch_probs(tiny_models["bert"], texts, pairs), atol=1e-4)


def test_int8_variant_runs_and_default_variant_is_chosen(artifacts):
    int8 = predict(artifacts["bert"], TEXTS, variant="int8")
    assert len(int8) == len(TEXTS) and all(abs(sum(r.scores.values()) - 1) < 1e-4 for r in int8)
    manifest = json.loads((artifacts["bert"] / "manifest.json").read_text())
    assert "optimized" not in manifest["variants"]  # so the default falls back to the plain export
    default = predict(artifacts["bert"], TEXTS[:1])
    assert default[0].scores == predict(artifacts["bert"], TEXTS[:1], variant="fp32")[0].scores


def test_cli_prints_label_and_scores_and_reads_jsonl(artifacts, tmp_path):
    from conftest import cli

    code, out, err = cli("predict", artifacts["bert"], "a good story", "bad", "--variant", "fp32")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("a good story")
    assert all("LABEL_" in line and "=" in line for line in lines)

    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "a good story"}\n"just a string"\n\n{"text": "bad", "text_pair": null}\n')
    code, out, err = cli("predict", artifacts["bert"], "--file", f, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["a good story", "just a string", "bad"]
    assert all(set(r) == {"text", "label", "label_id", "scores"} for r in rows)


def test_predict_path_never_imports_torch(artifacts):
    code = (
        "import sys\n"
        "from cahp_deploy.commands.cli import main\n"
        f"main(['predict', {str(artifacts['distilbert'])!r}, 'a lovely film'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="fp16"), "variant 'fp16' is not in"),
        (dict(texts=[]), "nothing to predict"),
        (dict(pairs=["one", "two"]), "text pairs"),
        (dict(provider="tpu"), "unknown provider"),
    ],
)
def test_bad_requests(kwargs, match, artifacts):
    args = dict(texts=["a text"], pairs=None) | kwargs
    with pytest.raises(CahpError, match=match):
        predict(artifacts["bert"], args.pop("texts"), args.pop("pairs"), **args)


def test_not_an_artifact(tmp_path):
    with pytest.raises(CahpError, match="not an artifact dir"):
        predict(tmp_path, ["a text"])
    with pytest.raises(CahpError, match="does not exist"):
        predict(tmp_path / "nope", ["a text"])


def test_read_inputs_rejects_bad_lines(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"sentence": "x"}\n')
    with pytest.raises(CahpError, match="no 'text' field"):
        read_inputs(f)
    f.write_text("not json\n")
    with pytest.raises(CahpError, match="is not JSON"):
        read_inputs(f)
    f.write_text('{"premise": "a", "hypothesis": "b"}\n{"premise": "c", "hypothesis": "d"}\n')
    assert read_inputs(f) == (["a", "c"], ["b", "d"])


def test_the_manifests_recommended_variant_is_the_default(artifacts, tmp_path):
    import shutil

    from cahp_deploy.predict import resolve_variant

    art = tmp_path / "art"
    shutil.copytree(artifacts["bert"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    assert resolve_variant(art, None)[0] == "fp32"
    (art / "manifest.json").write_text(json.dumps({**manifest, "recommended": "int8"}))
    assert resolve_variant(art, None)[0] == "int8"
    assert predict(art, TEXTS[:1])[0].scores == predict(art, TEXTS[:1], variant="int8")[0].scores


def test_the_shipped_choice_is_read_from_the_runs_confirm_json(artifacts, tmp_path):
    """`run` writes its choice to OUT/confirm.json only; predict reads it there and warns on a promise
    not confirmed, while the artifact's manifest stays the bytes export wrote."""
    from conftest import run_dir_with_confirm

    from cahp_deploy.predict import promise_warning, resolve_variant

    pruned = run_dir_with_confirm(artifacts["bert"], tmp_path, "int8", confirmed=False)
    before = (pruned / "manifest.json").read_bytes()
    assert resolve_variant(pruned, None)[0] == "int8"
    assert "NOT confirmed" in promise_warning(pruned) and "+1.30 points on 440 rows" in promise_warning(pruned)
    assert resolve_variant(pruned.parent / "dense", None)[0] == "fp32"  # the dense artifact is recommended nothing
    assert promise_warning(pruned.parent / "dense") is None
    assert (pruned / "manifest.json").read_bytes() == before
