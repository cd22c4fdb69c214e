"""The promise: decision vs confirmation rows, the measured choice of the shipped variant, the words."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cahp_deploy.data import LabelledData
from cahp_deploy.errors import CahpError
from cahp_deploy.run import promise
from cahp_deploy.run.summary import promise_lines


def _data(n: int, split: str = "validation") -> LabelledData:
    return LabelledData(texts=[f"row {i}" for i in range(n)], labels=np.arange(n) % 3, split=split)


def test_split_eval_holds_out_disjoint_rows_or_uses_the_confirm_split():
    data = _data(100)
    decide, confirm, how = promise.split_eval(data, None, 0.4, seed=3)
    assert (len(decide), len(confirm)) == (60, 40) and not set(decide.texts) & set(confirm.texts)
    assert "held-out 40%" in how and promise.rows_fingerprint(decide) != promise.rows_fingerprint(confirm)
    assert promise.split_eval(data, None, 0.4, seed=3)[1].texts == confirm.texts  # seeded
    test = _data(50, "test")
    decide, confirm, how = promise.split_eval(data, test, 0.4)
    assert decide is data and confirm is test and how == "split 'test'"
    with pytest.raises(CahpError, match="leaves 4 to confirm on"):
        promise.split_eval(_data(10), None, 0.4)


def test_one_error_rate_is_split_between_the_two_sequences_and_the_held_out_share_balances_the_bounds():
    rates = promise.ErrorRates(0.9)
    assert rates.alpha == pytest.approx(0.1) and rates.search == pytest.approx(0.95) and rates.ship == pytest.approx(0.95)
    assert rates.to_dict() == {"alpha": 0.1, "search_alpha": 0.05, "ship_alpha": 0.05, "confirmation_confidence": 0.9}
    # z(0.90)^2 / (z(0.90)^2 + z(0.95)^2): the decision and confirmation bounds equally wide
    assert promise.default_confirm_fraction(0.9) == 0.38 == promise.DEFAULT_CONFIRM_FRACTION
    assert promise.default_confirm_fraction(0.8) < 0.38 < promise.default_confirm_fraction(0.95)


def test_the_whole_runs_false_pass_rate_is_at_most_alpha_and_was_twice_that_with_two_sequences():
    """The complete decision logic (ladder, then shipping), every candidate exactly at the budget."""
    from cahp_deploy.run.promise_simulation import false_pass_rate

    trials, alpha = 20000, 0.1
    se = (alpha * (1 - alpha) / trials) ** 0.5
    now = false_pass_rate(trials, seed=1)
    before = false_pass_rate(trials, two_sequences=True, seed=1)
    assert now <= alpha + 3 * se, now
    assert before > alpha + 3 * se, before  # the second sequence at the full level comes back: this fails


def test_power_says_what_the_rows_can_show_and_when_the_budget_is_out_of_reach():
    few = promise.power(661, 440, 1.0, 0.9)
    assert few["in_reach"] == {"3%": False, "6%": False}
    assert [r["disagreement"] for r in few["reach"]] == [0.03, 0.06]
    assert all(r["decision"] > 1.0 or r["confirmation"] > 1.0 for r in few["reach"])
    assert "OUT OF REACH" in promise.power_words(few) and "--confirm-split" in promise.power_words(few)
    many = promise.power(5000, 9832, 1.0, 0.9)
    assert many["in_reach"] == {"3%": True, "6%": True} and "OUT OF REACH" not in promise.power_words(many)
    # more disagreement, a wider bound; more rows, a narrower one
    assert promise.reach(1000, 0.06, 0.95) > promise.reach(1000, 0.03, 0.95) > promise.reach(4000, 0.03, 0.95) > 0


def test_an_unconfirmed_promise_recommends_nothing_and_is_loud(tmp_path, capsys):
    pruned = {"optimized": _variant(0.8, 300.0)}
    shipped = pruned["optimized"] | {"confirmation": {**pruned["optimized"]["confirmation"], "upper": 1.3}}
    rec, why, confirmed = promise.settle(promise.ship(pruned, None, 1.0), shipped, 1.0)
    assert (rec, confirmed) == (None, False) and why.startswith("NOT confirmed on rows no decision saw")
    rec, _, confirmed = promise.settle(promise.ship(pruned, None, 1.0), pruned["optimized"], 1.0)
    assert (rec, confirmed) == ("optimized", True)
    assert promise.settle(promise.ship(pruned, None, None), pruned["optimized"], None)[2] is None  # no budget
    # an artifact written before confirm.json was the one record carries it in its manifest: predict warns
    from cahp_deploy.predict import promise_warning

    (tmp_path / "manifest.json").write_text(json.dumps({"promise": {
        "confirmed": False, "max_drop_points": 1.0, "confirmation": {"upper": 1.3, "rows": 440}}}))
    assert "NOT confirmed" in promise_warning(tmp_path) and "+1.30 points on 440 rows" in promise_warning(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"promise": {"confirmed": True}}))
    assert promise_warning(tmp_path) is None
    # and run exits 3 once everything is written
    from cahp_deploy.commands.run import exit_if_not_confirmed

    with pytest.raises(SystemExit) as e:
        exit_if_not_confirmed({"out": "OUT", "summary": {"confirm": {"confirmed": False, "max_drop_points": 1.0}}})
    assert e.value.code == promise.EXIT_NOT_CONFIRMED == 3
    assert "NOT confirmed" in capsys.readouterr().err
    exit_if_not_confirmed({"out": "OUT", "summary": {"confirm": {"confirmed": True}}})  # no exit


def test_promise_of_the_record_is_what_the_manifest_carries():
    record = _confirm(conf_upper=1.7, int8_faster=False)
    record.update(confirmed=False, max_length=77, shipped={"artifact": "pruned", "variant": "optimized"})
    got = promise.promise_of(record)
    assert got["confirmed"] is False and got["max_length"] == 77 and got["max_drop_points"] == 1.0
    assert got["confirmation"]["upper"] == 1.7 and got["confirmation"]["rows"] == 500


def test_bits_round_trip():
    mask = np.array([True, False, False, True])
    assert promise.bits(mask) == "1001" and promise.from_bits("1001").tolist() == mask.tolist()


def _variant(upper: float, p50: float | None, drop: float = 0.0) -> dict:
    d = {"drop": drop, "upper": upper, "low": drop - 1, "high": drop + 1, "n": 500, "confidence": 0.9}
    return {"decision": d, "confirmation": d, "p50_ms": p50}


def test_ship_tests_in_order_of_latency_from_the_fp32_exact_graph_and_stops_at_the_first_miss():
    pruned = {"optimized": _variant(0.8, 300.0), "int8": _variant(1.4, 200.0), "fp32": _variant(0.8, 320.0)}
    got = promise.ship(pruned, None, 1.0)
    assert (got["artifact"], got["variant"], got["recommended"]) == ("pruned", "optimized", "optimized")
    assert [(t["variant"], t["passed"]) for t in got["tested"]] == [("optimized", True), ("int8", False)]  # fp32: slower
    assert promise.ship(pruned, None, 1.5)["variant"] == "int8"
    nothing = promise.ship(pruned, None, 0.5)
    assert nothing["artifact"] is None and nothing["recommended"] is None and "misses the budget of 0.5 points" in nothing["why"]
    free = promise.ship(pruned, None, None)
    assert free["variant"] == "optimized" and free["tested"] == []  # no budget: the fp32-exact graph
    assert promise.ship({"int8": _variant(0.1, None)}, None, 1.0)["artifact"] is None  # untimed: never shipped
    assert promise.ship({"fp32": _variant(0.1, 320.0)}, None, 1.0)["variant"] == "fp32"  # no optimized: the slowest


def test_ship_is_the_fastest_artifact_within_the_budget_dense_int8_included():
    pruned = {"optimized": _variant(0.8, 300.0), "int8": _variant(0.9, 200.0)}
    slower, faster, missing = _variant(0.3, 250.0), _variant(0.3, 150.0), _variant(1.2, 100.0)
    got = promise.ship(pruned, slower, 1.0)  # optimized 300 -> dense int8 250 -> pruned int8 200: all pass
    assert (got["artifact"], got["variant"], got["recommended"]) == ("pruned", "int8", "int8")
    assert [t["artifact"] for t in got["tested"]] == ["pruned", "dense", "pruned"]
    got = promise.ship(pruned, faster, 1.0)
    assert (got["artifact"], got["variant"], got["recommended"]) == ("dense", "int8", "int8")
    assert "dense int8 150.0 ms passes" in got["why"]
    got = promise.ship(pruned, missing, 1.0)  # dense int8 is the fastest, and misses: the pruned int8 before it
    assert (got["artifact"], got["variant"]) == ("pruned", "int8") and got["tested"][-1]["passed"] is False
    got = promise.ship({"optimized": _variant(0.8, 300.0), "int8": _variant(0.9, 120.0)}, _variant(1.2, 200.0), 1.0)
    assert (got["artifact"], got["variant"]) == ("pruned", "optimized")  # dense int8 misses first: no further look
    assert promise.ship(pruned, faster, None)["artifact"] == "pruned"  # no budget: nothing to judge by
    slow_dense = promise.ship(pruned, _variant(0.3, 400.0), 1.0)
    assert all(t["artifact"] == "pruned" for t in slow_dense["tested"])  # slower than the pruned graph: not tested


def _confirm(conf_upper: float, int8_faster: bool) -> dict:
    v = _variant(0.5, 100.0)
    v["confirmation"] = {**v["confirmation"], "drop": 0.9, "upper": conf_upper}
    v.update(speedup_vs_dense_fp32=2.4, speedup_vs_dense_int8=0.8 if int8_faster else 1.3)
    return {"recommended": "optimized", "why": "fastest measured of optimized", "max_drop_points": 1.0,
            "shape": "32x128", "variants": {"optimized": v}, "dense_int8": _variant(0.3, 80.0),
            "confirmation_rows": {"how": "split 'test'", "num_examples": 500},
            "decision_rows": {"num_examples": 500}, "dense_int8_faster": int8_faster}


def test_the_words_say_plainly_when_the_confirmation_misses_or_dense_int8_wins():
    lines = promise_lines(_confirm(conf_upper=0.95, int8_faster=False))
    assert lines[0].startswith("Shipped: the pruned model's `optimized` variant")
    # one sign convention: a drop is dense minus candidate (positive is worse), its bound the drop's upper one
    assert "drop +0.9 points (90% CI -1.0 .. +1.0, 500 rows)" in lines[1]
    assert "the budget of 1 point HOLDS (upper bound of the drop +0.95 points)" in lines[1]
    assert "-0.9" not in lines[1] and "-0.95" not in lines[1]
    assert "2.40x vs dense fp32, 1.30x vs dense INT8" in lines[2] and len(lines) == 3
    lines = promise_lines(_confirm(conf_upper=1.7, int8_faster=True))
    assert "is NOT confirmed (upper bound of the drop +1.70 points)" in lines[1]
    assert lines[-1].startswith("Plainly: dense INT8 is faster than the shipped pruned artifact")
    # as confirm writes it when the unseen rows do not back the promise: nothing recommended, the shipped named
    unconfirmed = {**_confirm(conf_upper=2.36, int8_faster=False), "recommended": None, "confirmed": False,
                   "why": "NOT confirmed on rows no decision saw (fastest ...)",
                   "shipped": {"artifact": "pruned", "variant": "optimized", "path": "artifacts/pruned"}}
    lines = promise_lines(unconfirmed)
    assert lines[0].startswith("Shipped: the pruned model's `optimized` variant (NOT confirmed on rows no decision saw")
    assert "is NOT confirmed (upper bound of the drop +2.36 points)" in lines[1]
    shipped_int8 = _confirm(conf_upper=0.95, int8_faster=False)
    shipped_int8["variants"]["optimized"]["int8_mac_share"] = 0.93
    assert "93% of its weight-MATMUL MACs in INT8".lower() in promise_lines(shipped_int8)[0].lower()
    nothing = promise_lines({"recommended": None, "why": "no pruned variant passes", "max_drop_points": 1.0,
                             "confirmation_rows": {"how": "x"}})
    assert nothing == ["Nothing pruned is shipped as recommended: no pruned variant passes. Ship the dense model "
                       "(or dense INT8) instead."]
    dense = _confirm(conf_upper=0.95, int8_faster=True)
    dense["dense_int8"].update(speedup_vs_dense_fp32=3.0, int8_mac_share=1.0)
    dense["shipped"] = {"artifact": "dense", "variant": "int8", "why": "dense INT8 keeps the budget", "path": "OUT/artifacts/dense"}
    lines = promise_lines(dense)
    assert lines[0].startswith("Shipped: the dense model's INT8 variant, not a pruned one (dense INT8 keeps the budget, "
                               "100% of its weight-MatMul MACs in INT8; `OUT/artifacts/dense`)")
    assert "3.00x vs dense fp32" in lines[2]
    assert lines[3] == ("Plainly: at this budget quantizing the dense model beats pruning it; the pruned model's best "
                        "variant within the budget, `optimized`, runs 2.40x vs dense fp32.")


@pytest.mark.parametrize("args, match", [
    (["--confirm-split", "validation"], "--confirm-split 'validation' must differ"),
    (["--confirm-split", "train"], "--confirm-split 'train' must differ"),
    (["--select-split", "validation", "--eval-split", "test", "--confirm-split", "train"],
     "--confirm-split 'train' is the split export's INT8 tuning reads"),
    (["--max-length", "4096"], "--max-length 4096 must be between 2 and the model's"),
    (["--confidence", "1.2"], "--confidence must be in (0.5, 1)"),
    (["--max-accuracy-drop", "1", "--confirm-fraction", "0"], "--confirm-fraction must be in (0, 1)"),
    (["--confirm-split", "nope"], "nope"),
    (["--max-accuracy-drop", "1", "--ladder", "heads", "--ffn-keep-ratio", "1.5"], "--ffn-keep-ratio must be in (0, 1]"),
    # export's INT8 gate options, refused before select and recovery run (the tiny split has 30 rows)
    (["--int8-max-accuracy-drop", "1", "--int8-min-agreement", "0.9"], "two different INT8 gates"),
    (["--int8-max-accuracy-drop", "0.5"], "30 labelled rows cannot bound an INT8 accuracy drop of 0.5 points"),
])
def test_run_rejects_bad_promise_options_in_one_line(args, match, tiny_models, tiny_data, tmp_path):
    from conftest import cli

    code, _, err = cli("run", tiny_models["bert"], "--data", tiny_data, "--out", tmp_path / "run", *args)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_the_headline_says_plainly_when_the_search_kept_every_head():
    from cahp_deploy.run.summary import headline

    row = {"heads_kept": 72, "heads_total": 72, "accuracy": 0.47, "speedup_same_variant": {}, "bytes": None}
    summary = {"rows": [dict(row, baseline=True, variant="optimized"), dict(row, baseline=False, variant="optimized")],
               "search": {"chosen_k": 72, "stopped_at": 66, "max_drop_points": 1.0,
                          "tried": [{"k": 72, "details": {"dense_anchor": True}}, {"k": 66, "details": {}}]}}
    lines = headline(summary)
    assert any(line.startswith("Plainly: no pruned candidate kept the budget on the decision rows (the search "
                               "stopped at k=66)") for line in lines)
    summary["search"]["chosen_k"] = 66
    assert not any(line.startswith("Plainly") for line in headline(summary))


def test_the_headline_carries_the_distillation_texts_warning():
    from cahp_deploy.run.summary import headline

    row = {"heads_kept": 60, "heads_total": 72, "accuracy": 0.47, "speedup_same_variant": {}, "bytes": None}
    summary = {"rows": [dict(row, baseline=True, variant="optimized"), dict(row, baseline=False, variant="optimized")],
               "distill_warning": "--distill-data looks unlike the task's rows (median 10 tokens vs 24; KS 0.47 > 0.3)"}
    assert "**Warning:** --distill-data looks unlike the task's rows (median 10 tokens vs 24; KS 0.47 > 0.3)." \
        in headline(summary)
    summary["distill_warning"] = None
    assert not any("Warning" in line for line in headline(summary))
