"""The prune stage through the CLI: a complete pruned dir on success; one-line errors, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from cahp_deploy.commands.cli import main
from cahp_deploy.gates import head_mask
from cahp_deploy.hashing import sha256_dir
from cahp_deploy.modeling import load_classifier
from cahp_deploy.selection import Selection
from conftest import ARCHS

PRUNING_KEYS = {
    "schema", "kept_heads", "heads_per_layer_kept", "num_heads_kept", "num_heads_total", "params_before",
    "params_after", "macs_seq128", "flop_ceiling_speedup", "selection_sha256", "source_model",
    "source_model_sha256", "kept_neurons", "neurons_per_layer_kept", "num_neurons_kept", "num_neurons_total",
    "per_layer",
}
MAC_KEYS = {"attention_before", "attention_after", "ffn_before", "ffn_after", "total_before", "total_after"}


def _selection(path, kept, heads_per_layer=4, model_sha=None):
    prov = {"model_sha256": model_sha} if model_sha else {}
    Selection(method="cahp", kept_heads=kept, num_heads_total=len(kept) * heads_per_layer,
              heads_per_layer=heads_per_layer, provenance=prov).to_json(path)
    return path


@pytest.mark.parametrize("name", ARCHS)
def test_prune_writes_a_complete_model_dir(tiny_models, tmp_path, name, capsys):
    model = tiny_models[name]
    kept = [[1, 3], [], [0]]
    sel = _selection(tmp_path / "selection.json", kept, model_sha=sha256_dir(model))
    out = tmp_path / "pruned"
    main(["prune", str(model), "--selection", str(sel), "--out", str(out)])
    assert "kept 3/12 heads" in capsys.readouterr().out

    rec = json.loads((out / "pruning.json").read_text())
    assert set(rec) == PRUNING_KEYS and set(rec["macs_seq128"]) == MAC_KEYS
    assert rec["kept_heads"] == kept and rec["heads_per_layer_kept"] == [2, 0, 1]
    assert (rec["num_heads_kept"], rec["num_heads_total"]) == (3, 12)
    assert rec["params_after"] < rec["params_before"]
    assert rec["source_model_sha256"] == sha256_dir(model)
    assert rec["flop_ceiling_speedup"] == rec["macs_seq128"]["total_before"] / rec["macs_seq128"]["total_after"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"

    dense, tok = load_classifier(model)
    pruned, tok2 = load_classifier(out)  # delegates to load_pruned
    enc = tok(["a fine movie", "the plot was dull and far too long"], padding=True, return_tensors="pt")
    enc.pop("token_type_ids") if name == "distilbert" else None
    with torch.no_grad(), head_mask(dense, kept):
        want = dense(**enc).logits
    with torch.no_grad():
        got = pruned(**enc).logits
    assert (got - want).abs().max() < 1e-5
    assert tok2(["a fine movie"])["input_ids"] == tok(["a fine movie"])["input_ids"]


def test_force_overwrites(tiny_models, tmp_path):
    model = tiny_models["bert"]
    out = tmp_path / "pruned"
    main(["prune", str(model), "--selection", str(_selection(tmp_path / "a.json", [[0], [1], [2]])), "--out", str(out)])
    main(["prune", str(model), "--selection", str(_selection(tmp_path / "b.json", [[0, 1], [], [2]])), "--out", str(out), "--force"])
    assert json.loads((out / "pruning.json").read_text())["kept_heads"] == [[0, 1], [], [2]]


def _bad(kind, tmp_path):
    sel = tmp_path / "selection.json"
    if kind == "layers":
        return _selection(sel, [[0], [1]]), "has 2 layers but"
    if kind == "heads":
        return _selection(sel, [[0], [1], [5]], heads_per_layer=6), "is for 6 heads per layer but"
    if kind == "hash":
        return _selection(sel, [[0], [1], [2]], model_sha="f" * 64), "made for a model with sha256 ffffffffffff"
    if kind == "no_head":
        return _selection(sel, [[], [], []]), "keeps no head in any layer"
    if kind == "out_of_range":
        return _selection(sel, [[0], [4], []]), r"layer 1 keeps head(s) [4] out of range"
    if kind == "repeated":
        return _selection(sel, [[2, 2], [1], []]), "layer 0 lists head(s) [2] more than once"
    if kind == "missing_file":
        return tmp_path / "nope.json", "does not exist"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["layers", "heads", "hash", "no_head", "out_of_range", "repeated", "missing_file"])
def test_bad_selection_is_one_line_exit_2_nothing_written(tiny_models, tmp_path, capsys, kind):
    sel, message = _bad(kind, tmp_path)
    outs = tmp_path / "outs"
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_models["bert"]), "--selection", str(sel), "--out", str(outs / "pruned")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not outs.exists()


def test_existing_output_without_force(tiny_models, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    sel = _selection(tmp_path / "selection.json", [[0], [1], [2]])
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_models["bert"]), "--selection", str(sel), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "already exists; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "selection.json"]


def test_refuses_an_already_pruned_model(tiny_models, tmp_path, capsys):
    first = tmp_path / "first"
    main(["prune", str(tiny_models["bert"]), "--selection", str(_selection(tmp_path / "s.json", [[0], [1], [2]])),
          "--out", str(first)])
    with pytest.raises(SystemExit):
        main(["prune", str(first), "--selection", str(tmp_path / "s.json"), "--out", str(tmp_path / "second")])
    assert "already pruned" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()


def test_python_api_accepts_a_selection_object(tiny_models, tmp_path):
    from cahp_deploy.hashing import sha256_json
    from cahp_deploy.pruning import prune

    sel = Selection(method="cahp", kept_heads=[[0], [], [1, 2]], num_heads_total=12, heads_per_layer=4)
    out = prune(tiny_models["distilbert"], sel, tmp_path / "pruned")
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["selection_sha256"] == sha256_json(sel.to_dict())
    assert json.loads((out / "config.json").read_text())["cahp_kept_heads"] == [[0], [], [1, 2]]
