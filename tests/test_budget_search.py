"""search_k: the smallest k within the accuracy budget, with a fake (table-driven) evaluate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahp_deploy.run.budget_search import CandidateResult, search_k
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
