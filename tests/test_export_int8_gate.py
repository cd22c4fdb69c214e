"""The INT8 gate's rule, pure: accuracy (paired drop bound) vs agreement, targets, retuning, row floors."""

from __future__ import annotations

import numpy as np
import pytest

from cahp_deploy.errors import CahpError
from cahp_deploy.export.int8.gate import Int8Gate, score
from cahp_deploy.export.stage import resolve_int8_gate as int8_gate


def _flip(logits: np.ndarray, rows: np.ndarray, to: np.ndarray) -> np.ndarray:
    out = logits.copy()
    out[rows] = 0.0
    out[rows, to] = 1.0
    return out


def test_flips_between_wrong_answers_cost_agreement_not_accuracy():
    """10 % of rows change prediction, always from one wrong class to another: agreement 90 % fails
    the agreement gate, the accuracy drop is exactly 0 and passes the accuracy gate."""
    n, rng = 2000, np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    ref_pred = np.where(rng.random(n) < 0.6, labels, (labels + 1) % 3)
    reference = np.eye(3)[ref_pred]
    wrong = np.flatnonzero(ref_pred != labels)[:200]
    new = _flip(reference, wrong, (labels[wrong] + 2) % 3)  # the other wrong class
    acc = Int8Gate.accuracy(0.5).judge(new, reference, labels)
    agr = Int8Gate.agreement(0.99).judge(new, reference, labels)
    assert acc["agreement"] == agr["agreement"] == pytest.approx(0.9)
    assert acc["drop"] == 0.0 and acc["paired_drop"]["ref_only"] == 0 and acc["passed"]
    assert not agr["passed"]


def test_accuracy_gate_uses_the_upper_bound_not_the_point_estimate():
    n, rng = 1000, np.random.default_rng(1)
    labels = rng.integers(0, 2, n)
    reference = np.eye(2)[labels]  # fp32 always right
    lost = rng.choice(n, 4, replace=False)  # INT8 loses 4 rows: drop 0.4 points, bound above 0.5
    new = _flip(reference, lost, 1 - labels[lost])
    res = Int8Gate.accuracy(0.5).judge(new, reference, labels)
    assert res["drop"] == pytest.approx(0.4) and res["drop_upper"] > 0.5 and not res["passed"]
    assert Int8Gate.accuracy(1.0).judge(new, reference, labels)["passed"]


def test_targets_and_retune_margins():
    acc, agr = Int8Gate.accuracy(0.5), Int8Gate.agreement(0.99)
    assert acc.target(2048) == 0.5 and acc.target(2048, 0.2) == pytest.approx(0.3)
    assert agr.target(512) == pytest.approx(0.99 + 2 * (0.99 * 0.01 / 512) ** 0.5)
    assert agr.target(512, 0.0) == 0.99 and agr.target(4) == 1.0
    with pytest.raises(ValueError, match="error_ceiling"):  # the accuracy gate retunes to an error ceiling instead
        acc.retune_margin(0.5, {"drop": 0.1}, {"drop_upper": 0.8})
    agr95 = Int8Gate.agreement(0.95)
    m = agr95.retune_margin(0.96, {"agreement": 0.97}, {"agreement": 0.955})
    assert agr95.target(1, m) == pytest.approx(0.96 + 0.015, abs=1e-6)
    # tuning rows: the bound a zero drop would get on the gate rows with the tuning rows' discordance
    tuned = {"drop": 0.9, "discordant": 40, "n": 2000}  # 2 % discordant; the (training-row) drop is not used
    from cahp_deploy.paired import drop_upper

    assert acc.predicted_upper(tuned) == pytest.approx(drop_upper(2000, 20, 20, 0.9), abs=1e-6)  # as many rows as tuned
    small, big = Int8Gate.accuracy(0.5, gate_rows=500), Int8Gate.accuracy(0.5, gate_rows=8000)
    assert small.predicted_upper(tuned) == pytest.approx(drop_upper(500, 5, 5, 0.9), abs=1e-6)  # 1.10
    assert big.predicted_upper(tuned) == pytest.approx(drop_upper(8000, 80, 80, 0.9), abs=1e-6)  # 0.22
    # no discordant tuning row: one discordant row on the gate's rows at least, as paired_drop would not claim less
    assert big.predicted_upper({"discordant": 0, "n": 2000}) == pytest.approx(drop_upper(8000, 0.5, 0.5, 0.9), abs=1e-6)
    assert big.met(tuned, 0.5) and not small.met(tuned, 0.5)


def test_looks_share_the_error_rate():
    """Bonferroni over the looks at the gate rows: the shares add up to the whole error rate, the
    first look (every candidate INT8) gets half of it; the agreement gate has none to spend."""
    from cahp_deploy.export.int8.gate import LOOK_SHARES, LOOKS

    gate = Int8Gate.accuracy(0.5, confidence=0.9)
    assert sum(LOOK_SHARES) == pytest.approx(1.0) and len(LOOKS) == len(LOOK_SHARES)
    assert [gate.look(k).confidence for k in range(3)] == pytest.approx([0.95, 0.975, 0.975])
    assert sum(1 - gate.look(k).confidence for k in range(3)) == pytest.approx(1 - gate.confidence)
    assert gate.look(0).max_drop == 0.5 and gate.look(0).gate_rows == gate.gate_rows
    assert [x["confidence"] for x in gate.to_dict()["looks"]] == pytest.approx([0.95, 0.975, 0.975])
    agr = Int8Gate.agreement(0.99)
    assert agr.look(0) is agr
    # a later look judges the same drop at a higher confidence: a wider bound
    n, labels = 1000, np.random.default_rng(3).integers(0, 2, 1000)
    truth = np.eye(2)[labels]
    lost, won = np.arange(0, 20), np.arange(20, 36)  # INT8 gets 20 rows wrong that fp32 gets right, wins 16
    reference, new = _flip(truth, won, 1 - labels[won]), _flip(truth, lost, 1 - labels[lost])
    first, later = gate.look(0).judge(new, reference, labels), gate.look(1).judge(new, reference, labels)
    assert first["drop"] == later["drop"] == pytest.approx(0.4) and first["discordant"] == 36
    assert first["drop_upper"] < later["drop_upper"]


def test_rows_needed_and_the_fallback():
    # every look must be able to pass: a graph identical to fp32 bounds within the budget at the strictest
    # look's confidence, 1 - 0.1 / 4 = 0.975
    from cahp_deploy.paired import drop_upper

    for gate, strictest in ((Int8Gate.accuracy(0.5), 0.975), (Int8Gate.accuracy(1.0, confidence=0.95), 0.9875)):
        n = gate.rows_needed()
        assert drop_upper(n, 0, 0, strictest) <= gate.max_drop < drop_upper(n - 1, 0, 0, strictest)
    assert Int8Gate.accuracy(0.5).rows_needed() == 1130 and Int8Gate.accuracy(1.0, confidence=0.95).rows_needed() == 683
    assert Int8Gate.agreement(0.99).rows_needed() == 1
    gate, note = int8_gate(None, None, rows=2000)
    assert gate.kind == "accuracy" and gate.max_drop == 0.5 and note is None
    gate, note = int8_gate(None, None, rows=100)  # too few: the default falls back, and says why
    assert gate.kind == "agreement" and gate.min_agreement == 0.99 and "needs >= 1130" in note
    with pytest.raises(CahpError, match="100 labelled rows cannot bound"):
        int8_gate(0.5, None, rows=100)
    assert int8_gate(None, None, rows=None)[0].min_agreement == 0.90  # random tokens
    assert int8_gate(None, 0.995, rows=None)[0].min_agreement == 0.90
    assert int8_gate(None, 0.95, rows=50)[0].min_agreement == 0.95


def test_score_without_labels_has_no_accuracy():
    ref = np.eye(3)[[0, 1, 2, 0]]
    assert set(score(ref, ref)) == {"agreement", "logit_mse"}
    assert score(ref, ref, np.array([0, 1, 2, 1]))["drop"] == 0.0
    with pytest.raises(CahpError, match="needs labelled rows"):
        Int8Gate.accuracy(0.5).judge(ref, ref, None)
