"""recover: a pruned dir in, a recovered pruned dir out that load_pruned rebuilds exactly."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cahp_deploy import evaluation, schema
from cahp_deploy.commands.cli import cli, main
from cahp_deploy.data import load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.modeling import load_classifier
from cahp_deploy.pruning import prune
from cahp_deploy.recovery import RecoveryParams, distillation_loss, finetune_in_place, recover, sample_examples
from cahp_deploy.selection.result import Selection
from conftest import ARCHS, save_tiny_model


# Layer 1 keeps no head: the zero-head layer must survive save + reload.
KEPT = [[0, 2], [], [1]]
FAST = dict(epochs=5, lr=3e-3, batch_size=8, freeze_embeddings=False, progress=False)


def _prune(model_dir, out, kept=KEPT):
    sel = Selection(method="random", kept_heads=kept, num_heads_total=12, heads_per_layer=4)
    return prune(model_dir, sel, out)


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    return {a: _prune(tiny_models[a], root / a) for a in ARCHS}


@pytest.fixture(scope="module")
def recovered(pruned, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("recovered") / "bert"
    record = recover(pruned["bert"], tiny_data, out, eval_split="validation", **FAST)
    return out, record


def test_recovered_dir_is_complete_and_round_trips(recovered, pruned, tiny_data):
    out, record = recovered
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "pruning.json", "recovery.json"} <= names
    assert names & {"vocab.txt", "tokenizer.json"}  # transformers 5.x saves a fast tokenizer without vocab.txt
    config = json.loads((out / "config.json").read_text())
    assert config["cahp_kept_heads"] == KEPT  # save_pretrained keeps our config field
    assert json.loads((out / "pruning.json").read_text()) == json.loads((pruned["bert"] / "pruning.json").read_text())
    on_disk = json.loads((out / "recovery.json").read_text())
    assert on_disk["schema"] == schema.RECOVERY and on_disk["kept_heads"] == KEPT
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2, 3, 4, 5]
    assert all(e["seconds"] > 0 and e["examples"] == 60 for e in on_disk["epochs"])
    # Reloaded through load_classifier -> load_pruned: the same accuracy as measured in memory.
    model, tok = load_classifier(out)
    assert [len(k) for k in model.config.cahp_kept_heads] == [2, 0, 1]
    val = load_labelled(tiny_data, "validation")
    assert evaluation.accuracy(model, tok, val) == pytest.approx(record["accuracy_after"], abs=1e-12)


def test_recovery_learns_the_planted_task(recovered):
    _, record = recovered
    losses = [e["loss"] for e in record["epochs"]]
    assert losses[-1] < losses[0]
    assert record["accuracy_after"] >= record["accuracy_before"] + 0.3


def test_weights_change_except_frozen_embeddings(pruned, tiny_data, tmp_path):
    out = tmp_path / "r"
    recover(pruned["bert"], tiny_data, out, epochs=1, lr=1e-3, progress=False)
    before, after = load_file(pruned["bert"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(before[emb], after[emb])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_seeded_runs_are_identical(pruned, tiny_data, tmp_path):
    kw = dict(epochs=1, lr=1e-3, progress=False, seed=3)
    recover(pruned["distilbert"], tiny_data, tmp_path / "a", **kw)
    recover(pruned["distilbert"], tiny_data, tmp_path / "b", **kw)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [a for a in ARCHS if a != "bert"])
def test_every_architecture_round_trips(name, pruned, tiny_data, tmp_path):
    record = recover(pruned[name], tiny_data, tmp_path / name, eval_split="validation", epochs=1,
                     lr=1e-3, progress=False)
    model, tok = load_classifier(tmp_path / name)
    assert model.config.cahp_kept_heads == KEPT
    val = load_labelled(tiny_data, "validation")
    assert evaluation.accuracy(model, tok, val) == pytest.approx(record["accuracy_after"], abs=1e-12)


def test_distillation_runs_and_is_recorded(pruned, tiny_models, tiny_data, tmp_path):
    record = recover(pruned["bert"], tiny_data, tmp_path / "d", distill_from=tiny_models["bert"],
                     epochs=1, alpha=0.7, temperature=3.0, progress=False)
    assert record["distilled"] and record["distill_from"] == str(tiny_models["bert"])
    assert record["params"]["alpha"] == 0.7 and record["params"]["temperature"] == 3.0


def test_distillation_loss_math():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.0), ce)
    # A student equal to its teacher has zero KL: only the CE share is left.
    assert torch.allclose(distillation_loss(s, s, y, 2.0, 0.25), 0.75 * ce)
    # By hand for one row: T^2 * sum p_t (log p_t - log p_s) at T = 2.
    pt, ps = torch.softmax(t[:1] / 2, -1), torch.softmax(s[:1] / 2, -1)
    kl = (pt * (pt.log() - ps.log())).sum() * 4
    assert torch.allclose(distillation_loss(s[:1], t[:1], y[:1], 2.0, 1.0), kl, atol=1e-6)


def test_time_budget_stops_early(pruned, tiny_data):
    model, tok = load_classifier(pruned["bert"])
    data = load_labelled(tiny_data, "train")
    stats = finetune_in_place(model, tok, data, RecoveryParams(epochs=3, batch_size=4, time_budget=1e-9))
    assert stats["stopped_early"] and stats["steps"] == 1 and len(stats["epochs"]) == 1
    assert not model.training


def test_sample_examples_is_seeded_subset(tiny_data):
    data = load_labelled(tiny_data, "train")
    a, b = sample_examples(data, 10, seed=1), sample_examples(data, 10, seed=1)
    assert len(a) == 10 and a.texts == b.texts and a.texts != sample_examples(data, 10, seed=2).texts
    assert sample_examples(data, None, 0) is data
    with pytest.raises(CahpError, match="--max-examples"):
        sample_examples(data, 0, 0)


def test_user_errors_leave_nothing(pruned, tiny_data, tiny_models, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(CahpError, match="--eval-split 'train' is the training split"):
        recover(pruned["bert"], tiny_data, out, eval_split="train")
    with pytest.raises(CahpError, match="column 'sentence' not found"):
        recover(pruned["bert"], tiny_data, out, text_column="sentence")
    with pytest.raises(CahpError, match="--alpha"):
        recover(pruned["bert"], tiny_data, out, alpha=2.0)
    other = save_tiny_model("bert", tmp_path / "five", num_labels=5)
    with pytest.raises(CahpError, match="has 5 labels"):
        recover(pruned["bert"], tiny_data, out, distill_from=other, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["five"]
    out.mkdir()
    with pytest.raises(CahpError, match="already exists; pass --force"):
        recover(pruned["bert"], tiny_data, out)


def test_cli(pruned, tiny_data, tmp_path, capsys):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["recover", str(pruned["roberta"]), "--data", str(tiny_data), "--out", str(out),
                                      "--epochs", "1", "--eval-split", "validation", "--max-examples", "20"])
    assert result.exit_code == 0, result.output
    assert "1 epoch(s) on 20 examples" in result.output and "accuracy on validation:" in result.output
    assert json.loads((out / "recovery.json").read_text())["num_examples"] == 20
    with pytest.raises(SystemExit) as e:
        main(["recover", str(pruned["roberta"]), "--data", str(tiny_data), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output") and "--force" in err and err.count("\n") == 1
