"""search_k: the smallest k within the accuracy budget, with a fake (table-driven) evaluate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy.budget_search import CandidateResult, search_k
from cahp_deploy.errors import CahpError


def table_evaluate(acc_by_k: dict[int, float], before_by_k: dict[int, float] | None = None):
    """A fake evaluate that looks the accuracy up and records every call."""
    calls: list[int] = []

    def evaluate(k: int) -> CandidateResult:
        calls.append(k)
        before = (before_by_k or {}).get(k, acc_by_k[k] - 0.1)
        return CandidateResult(k=k, accuracy_before=before, accuracy_after=acc_by_k[k], seconds=1.5)

    return evaluate, calls


def test_knee_meets_budget_tries_nothing_else():
    ks = [13, 20, 30, 72]
    evaluate, calls = table_evaluate({13: 0.47, 20: 0.47, 30: 0.48, 72: 0.48})
    result = search_k(ks, evaluate, dense_accuracy=0.475, max_drop=1.0)
    assert result.chosen.k == 13 and calls == [13]
    assert result.threshold == pytest.approx(0.465)


def test_hand_worked_gallop_then_bisect():
    # ks index: 0..9; the first passing index is 5 (k=60).
    # gallop tries idx 0 (fail), 1 (fail), 3 (fail), 7 (pass); bisect (3,7) -> 5 pass, (3,5) -> 4 fail.
    ks = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    acc = {k: (0.60 if k >= 60 else 0.40) for k in ks}
    evaluate, calls = table_evaluate(acc)
    result = search_k(ks, evaluate, dense_accuracy=0.61, max_drop=2.0)
    assert calls == [10, 20, 40, 80, 60, 50]
    assert result.chosen.k == 60
    assert [c.k for c in result.tried] == calls
    d = result.to_dict()
    assert d["chosen_k"] == 60 and len(d["tried"]) == 6 and d["tried"][0]["accuracy_before"] == pytest.approx(0.3)


def test_judged_on_accuracy_before_when_recovery_skipped():
    evaluate_calls = []

    def evaluate(k):
        evaluate_calls.append(k)
        return CandidateResult(k=k, accuracy_before={5: 0.5, 9: 0.9}[k])

    result = search_k([5, 9], evaluate, dense_accuracy=0.9, max_drop=0.0)
    assert result.chosen.k == 9 and result.chosen.accuracy == 0.9


def test_impossible_budget_raises_one_clear_line():
    ks = [8, 16, 32, 72]
    evaluate, calls = table_evaluate({8: 0.30, 16: 0.35, 32: 0.40, 72: 0.44})
    with pytest.raises(CahpError, match=r"even k=72 reaches 44\.00% against the dense 47\.00%") as e:
        search_k(ks, evaluate, dense_accuracy=0.47, max_drop=1.0)
    assert "\n" not in str(e.value)
    assert calls[-1] == 72


@pytest.mark.parametrize(
    "ks, dense, drop, match",
    [
        ([], 0.5, 1.0, "no candidate"),
        ([3, 3, 5], 0.5, 1.0, "strictly increasing"),
        ([5, 3], 0.5, 1.0, "strictly increasing"),
        ([0, 3], 0.5, 1.0, ">= 1"),
        ([3, 5], 47.0, 1.0, "fraction"),
        ([3, 5], 0.5, -1.0, r"in \[0, 100\]"),
    ],
)
def test_bad_inputs(ks, dense, drop, match):
    evaluate, calls = table_evaluate({k: 0.5 for k in ks})
    with pytest.raises(CahpError, match=match):
        search_k(ks, evaluate, dense, drop)
    assert calls == []


def test_evaluate_answering_for_another_k_is_a_bug():
    with pytest.raises(ValueError, match="returned a result for k=4"):
        search_k([3, 5], lambda k: CandidateResult(k=4, accuracy_before=1.0), 0.5, 1.0)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    first_pass=st.integers(0, 40),
)
def test_monotone_finds_smallest_in_few_evaluations(n, first_pass):
    ks = [3 * i + 2 for i in range(n)]
    acc = {k: (0.8 if i >= first_pass else 0.2) for i, k in enumerate(ks)}
    evaluate, calls = table_evaluate(acc)
    if first_pass >= n:
        with pytest.raises(CahpError):
            search_k(ks, evaluate, 0.8, 1.0)
        return
    result = search_k(ks, evaluate, 0.8, 1.0)
    assert result.chosen.k == ks[first_pass]
    assert len(calls) == len(set(calls))  # never evaluates a k twice
    assert len(calls) <= 2 * math.ceil(math.log2(first_pass + 1)) + 2


@settings(max_examples=150, deadline=None)
@given(accs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), drop=st.floats(0.0, 50.0))
def test_non_monotone_result_is_a_measured_local_minimum(accs, drop):
    """Without monotonicity: the chosen k was measured to pass, and the next smaller candidate was
    measured to fail (or the chosen one is the first candidate)."""
    ks = list(range(1, len(accs) + 1))
    evaluate, calls = table_evaluate(dict(zip(ks, accs)))
    threshold = 0.7 - drop / 100
    try:
        result = search_k(ks, evaluate, 0.7, drop)
    except CahpError:
        assert accs[-1] < threshold and calls[-1] == ks[-1]
        return
    i = ks.index(result.chosen.k)
    assert accs[i] >= threshold - 1e-9
    assert i == 0 or (ks[i - 1] in calls and accs[i - 1] < threshold)
    assert all(accs[ks.index(k)] < threshold for k in calls if k < result.chosen.k)


# ----------------------------------------------------------------------------------------------
# The guard end to end on a tiny model: CAHP's sweep (select_at) -> prune -> recover -> search_k
# ----------------------------------------------------------------------------------------------
#
# Planted task: a sentence holds one sentiment word of two different classes (plus filler); the label
# is the class of the word that comes FIRST. Reading the order needs attention, so a 2-layer x 8-head
# model (head_dim 2) trained on it loses accuracy steadily as heads are removed, and a short recovery
# wins back part of it: recovered accuracy rises with k, which gives the search something to find.

import json as _json
import random as _random
import shutil as _shutil

from conftest import _FILLER, _WORDS, build_tiny_model, tokenizer_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine two spin-waiting
    threads per process make training ~30x slower; restore the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_order_task(directory, n_train=150, n_val=90, seed=0):
    rng = _random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                first, second = rng.sample(range(3), 2)
                words = rng.sample(_FILLER, rng.randint(2, 5))
                lo, hi = sorted(rng.sample(range(len(words) + 1), 2))
                words.insert(hi, rng.choice(_WORDS[second]))
                words.insert(lo, rng.choice(_WORDS[first]))
                f.write(_json.dumps({"text": " ".join(words), "label": first}) + "\n")
    return directory


@pytest.fixture(scope="module")
def guard_setup(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    from cahp_deploy import evaluation
    from cahp_deploy.data import load_labelled
    from cahp_deploy.methods import MethodContext
    from cahp_deploy.methods.cahp import collect_evidence
    from cahp_deploy.recovery import RecoveryParams, finetune_in_place

    root = tmp_path_factory.mktemp("guard")
    data = _write_order_task(root / "data")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    train, val = load_labelled(data, "train"), load_labelled(data, "validation")
    torch.manual_seed(0)
    model = build_tiny_model("bert", layers=2, heads=8, head_dim=2)
    finetune_in_place(model, tok, train, RecoveryParams(epochs=30, lr=3e-3, batch_size=8, freeze_embeddings=False))
    dense_dir = root / "dense"
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    dense_acc = evaluation.accuracy(model, tok, val)
    evidence = collect_evidence(MethodContext(model=model, tokenizer=tok, data=train, seed=0))
    return root, data, dense_dir, dense_acc, evidence


def _guard(root, data, dense_dir, evidence, dense_acc, max_drop, candidates, out):
    """What `run --max-accuracy-drop` does: candidates on disk, the artifact only for the chosen one."""
    import time

    from cahp_deploy.methods.cahp import select_at
    from cahp_deploy.pruning import prune
    from cahp_deploy.recovery import recover

    work = root / f"work-{out.name}"

    def evaluate(k):
        t = time.perf_counter()
        pruned = prune(dense_dir, select_at(evidence, k), work / f"pruned-{k}", force=True)
        rec = recover(pruned, data, work / f"recovered-{k}", eval_split="validation", epochs=1, lr=1e-4,
                      batch_size=16, freeze_embeddings=False, progress=False, force=True)
        return CandidateResult(k, rec["accuracy_before"], rec["accuracy_after"], time.perf_counter() - t,
                               {"dir": str(work / f"recovered-{k}")})

    try:
        result = search_k(candidates, evaluate, dense_acc, max_drop)
        _shutil.copytree(result.chosen.details["dir"], out)
        return result
    finally:
        _shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def exhaustive(guard_setup):
    """Recovered accuracy of every candidate k >= the knee (the reference the search must agree with)."""
    root, data, dense_dir, dense_acc, evidence = guard_setup
    ks = [k for k in evidence.sweep.ks if k >= evidence.knee.k]
    table = {}
    for k in ks:  # same code path as the guard, so the numbers are the ones the search sees
        res = _guard(root, data, dense_dir, evidence, dense_acc, 100.0, [k], root / f"exh-{k}")
        table[k] = res.chosen.accuracy
        _shutil.rmtree(root / f"exh-{k}")
    return ks, table


def test_guard_picks_smallest_k_meeting_the_budget(guard_setup, exhaustive):
    root, data, dense_dir, dense_acc, evidence = guard_setup
    ks, table = exhaustive
    acc = [table[k] for k in ks]
    # Budgets whose passing candidates form a suffix (every k before fails, every k after passes),
    # so "the smallest k that meets it" is well defined whatever the search order.
    splits = [j for j in range(1, len(ks)) if max(acc[:j]) < min(acc[j:]) <= dense_acc]
    assert splits, f"the planted task should make recovered accuracy rise with k: {table}, dense {dense_acc}"
    j = splits[0]
    max_drop = 100 * (dense_acc - min(acc[j:]))
    out = root / "artifact"
    result = _guard(root, data, dense_dir, evidence, dense_acc, max_drop, ks, out)
    assert result.chosen.k == ks[j] and result.chosen.accuracy == pytest.approx(acc[j])
    assert out.is_dir() and (out / "recovery.json").exists()
    assert _json.loads((out / "config.json").read_text())["cahp_kept_heads"] is not None
    tried = [c.k for c in result.tried]
    assert tried[0] == evidence.knee.k and len(tried) < len(ks)
    for c in result.tried:  # each tried candidate reports before/after accuracy and its time
        assert c.accuracy_after == pytest.approx(table[c.k]) and c.seconds > 0 and 0 <= c.accuracy_before <= 1


def test_guard_impossible_budget_stops_without_artifact(guard_setup, exhaustive):
    root, data, dense_dir, dense_acc, evidence = guard_setup
    ks, table = exhaustive
    # The candidates up to the first that matches the dense model, and a budget none of them meets.
    first_ok = next((i for i, k in enumerate(ks) if table[k] >= dense_acc), len(ks))
    small = ks[:first_ok]
    assert small, f"the knee should lose accuracy on the planted task: {table}, dense {dense_acc}"
    max_drop = max(0.0, 100 * (dense_acc - max(table[k] for k in small)) - 0.5)
    out = root / "impossible"
    with pytest.raises(CahpError, match=rf"even k={small[-1]} reaches") as e:
        _guard(root, data, dense_dir, evidence, dense_acc, max_drop, small, out)
    assert "\n" not in str(e.value)
    assert not out.exists() and not (root / "work-impossible").exists()
