"""Distillation towards dense after pruning: it moves a pruned model towards dense on rows it never
trained on, it is undone when it does not help, and `run --distill-data` reads text only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cahp_deploy.data import LabelledData, load_texts, without_rows_of
from cahp_deploy.errors import CahpError
from cahp_deploy.recovery.distill import DistillParams, agreement, distill_if_it_helps, split_judge


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(dense, pruned copy, tokenizer, train rows, judge rows) on the order task of test_run_accuracy_budget."""
    from test_run_accuracy_budget import train_planted

    from cahp_deploy.data import load_labelled
    from cahp_deploy.pruning.rewrite import prune_model

    data, _, dense, tok = train_planted(tmp_path_factory.mktemp("distill"), n_train=300, n_val=200, seed=1)
    import copy

    pruned = prune_model(copy.deepcopy(dense), [[0, 1, 2], [3]], [list(range(0, 32, 3)), list(range(6))])
    return dense, pruned, tok, load_labelled(data, "train"), load_labelled(data, "validation")


def test_distillation_raises_agreement_with_dense_on_rows_it_never_trained_on(planted):
    import copy

    dense, pruned, tok, train, judge = planted
    model = copy.deepcopy(pruned)
    rec = distill_if_it_helps(model, dense, tok, train, judge, max_length=32,
                              params=DistillParams(epochs=6, lr=3e-3, batch_size=16, freeze_embeddings=False))
    assert rec["agreement_after"] > rec["agreement_before"] and rec["kept"]
    with torch.no_grad():  # the kept model is the trained one: its agreement is what the record says
        enc = tok(judge.texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        mine = (model(**enc).logits.argmax(-1) == dense(**enc).logits.argmax(-1)).float().mean().item()
    assert mine == pytest.approx(rec["agreement_after"])
    ref = np.zeros(len(judge), dtype=np.int64)
    assert agreement(model, tok, judge, ref, 32) == pytest.approx(
        float((model(**enc).logits.argmax(-1).numpy() == 0).mean()))
    losses = rec["training"]["epochs"]
    assert losses[-1]["kl"] < losses[0]["kl"] and losses[-1]["hidden"] < losses[0]["hidden"]


def test_training_that_does_not_help_is_undone_exactly(planted):
    import copy

    dense, pruned, tok, train, judge = planted
    model = copy.deepcopy(pruned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a learning rate that wrecks the model: agreement falls, so the weights must come back bit for bit
    rec = distill_if_it_helps(model, dense, tok, train.subset(range(32)), judge, max_length=32,
                              params=DistillParams(epochs=1, lr=5.0, batch_size=8, warmup_ratio=0.0,
                                                   freeze_embeddings=False))
    assert not rec["kept"] and rec["agreement_after"] <= rec["agreement_before"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_split_judge_holds_out_disjoint_rows_and_small_text_is_an_error():
    rows = LabelledData(texts=[f"t{i}" for i in range(50)], labels=np.zeros(50, dtype=np.int64))
    train, judge = split_judge(rows, seed=0)
    assert len(judge) == 10 and len(train) == 40 and not set(train.texts) & set(judge.texts)
    with pytest.raises(CahpError, match="at least 5"):
        split_judge(rows.subset(range(4)), seed=0)


def test_text_only_rows_load_without_a_label_column_and_evaluation_rows_are_dropped(tmp_path):
    d = tmp_path / "extra"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"premise": p, "hypothesis": h}) + "\n"
                                           for p, h in [("a", "b"), ("c", "d"), ("a", "x")]))
    rows = load_texts(d, "train")
    assert rows.texts == ["a", "c", "a"] and rows.pairs == ["b", "d", "x"]
    seen = LabelledData(texts=["a"], pairs=["b"], labels=np.zeros(1, dtype=np.int64))
    kept, dropped = without_rows_of(rows, seen)
    assert dropped == 1 and kept.pairs == ["d", "x"]
    with pytest.raises(CahpError, match="column 'text' not found"):
        load_texts(d, "train", text_column="text")


def test_a_search_rung_records_its_distillation_and_judges_the_kept_model(planted, tmp_path):
    """Under a budget with --distill-data, each pruned rung is refit, then distilled; the record says
    whether the training was kept and the judged model is the distilled one exactly when it was."""
    from test_run_accuracy_budget import _write_order_task, settings_for

    from cahp_deploy.run import accuracy_budget

    dense, _, tok, train, judge = planted
    dense_dir = tmp_path / "dense"
    dense.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    data = _write_order_task(tmp_path / "data", n_train=150, n_val=90, seed=1)
    s = settings_for(data, dense_dir, max_drop=100.0, recover=None, reconstruct={"max_examples": 40})
    extra = load_texts(_write_order_task(tmp_path / "extra", n_train=200, n_val=5, seed=7), "train")
    s.ladder, s.mac_step, s.mac_floor = "macs", 0.3, 0.6
    s.distill_rows, s.distill_judge = split_judge(extra, seed=0)
    s.distill_params = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "freeze_embeddings": False}
    record = accuracy_budget.search(s, tmp_path / "search")
    pruned = [c for c in record["tried"] if not c["details"].get("dense_anchor")]
    assert pruned
    for c in pruned:
        dist = c["details"]["distill"]
        assert set(dist) >= {"kept", "agreement_before", "agreement_after"} and dist["judge_rows"] == 40
        assert dist["kept"] == (dist["agreement_after"] > dist["agreement_before"])
        assert ("distillation towards dense" in c["details"]["recovery"]) == dist["kept"]
    chosen = tmp_path / "search" / record["chosen_dir"]
    kept = record["tried"][-1]["details"]["distill"]["kept"] if pruned[-1]["k"] == record["chosen_k"] else None
    if kept is not None:
        assert (chosen / "model" / "distill.json").is_file() == kept


def test_text_likeness_warns_only_when_the_lengths_differ():
    from cahp_deploy.recovery.distill import UNLIKE_KS, text_likeness

    rng = np.random.default_rng(0)
    task = rng.integers(15, 35, size=500)
    alike = text_likeness(rng.integers(15, 35, size=400), task)
    assert alike["ks_statistic"] < UNLIKE_KS and alike["warning"] is None
    short = text_likeness(rng.integers(3, 12, size=400), task)  # phrases against sentences
    assert short["ks_statistic"] > UNLIKE_KS
    assert short["warning"].startswith("--distill-data looks unlike the task's rows (median ")
    assert short["median_tokens"]["distill_data"] < short["median_tokens"]["task"]


def test_the_run_plan_records_how_alike_the_distillation_text_is(tmp_path):
    from conftest import tokenizer_dir, write_tiny_data

    from transformers import AutoTokenizer

    from cahp_deploy.data import load_labelled
    from cahp_deploy.run.plan import _distill_rows

    task = load_labelled(write_tiny_data(tmp_path / "task", n_train=120), "train")
    same = write_tiny_data(tmp_path / "same", n_train=120, seed=3)
    short = tmp_path / "short"
    short.mkdir()
    (short / "train.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in ["good", "bad", "fine"] * 40))
    columns = {"text_column": None, "text_pair_column": None}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    got = {name: _distill_rows(path, "train", None, columns, [], 0, task, tok)["record"]["likeness"]
           for name, path in (("same", same), ("short", short))}
    assert got["same"]["warning"] is None
    assert got["short"]["warning"] and got["short"]["median_tokens"]["distill_data"] == 3.0  # [CLS] word [SEP]
