"""The progressive ladder: nested removal orders (pure), and rungs ~a MAC step apart whose kept sets nest,
built and searched on the tiny planted task of test_run_accuracy_budget."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from cahp_deploy.selection.removal_order import (aligned_kept, layer_of_units, mac_targets, nested_order,
                                                  next_units, per_layer)


def test_nested_order_removes_the_least_persistent_units_first_and_breaks_ties_by_score():
    cuts = [[0, 1, 2], [0, 1], [0, 3]]  # persistence: 0:3, 1:2, 2:1, 3:1, 4:0
    order = nested_order(cuts, 5, scores=[0, 0, 0.9, 0.1, 0])
    assert order == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError):
        nested_order([[5]], 5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 11), max_size=12), max_size=6), st.integers(0, 12))
def test_next_units_take_the_order_in_turn_and_keep_each_layer_its_minimum(cuts, count):
    layer_of = layer_of_units([4, 4, 4])
    order = nested_order(cuts, 12)
    removed: set[int] = set()
    taken = next_units(order, removed, count, layer_of, min_per_layer=1)
    assert len(taken) == min(count, 9) and taken == [u for u in order if u in taken]  # order kept
    left = per_layer(set(range(12)) - set(taken), [4, 4, 4])
    assert all(len(layer) >= 1 for layer in left)
    more = next_units(order, set(taken), 3, layer_of, min_per_layer=1)
    assert not set(more) & set(taken)  # a removed unit is never offered again


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(150))), st.lists(st.integers(0, 60), min_size=4, max_size=4),
       st.sampled_from([1, 4, 16]))
def test_aligned_widths_are_multiples_and_stay_nested_as_the_order_is_taken(order, steps, multiple):
    units = [64, 48, 38]  # 38: not a multiple of 16
    layer_of = layer_of_units(units)
    removed: set[int] = set()
    kept = aligned_kept(order, removed, units, multiple)
    assert [len(k) for k in kept] == units  # nothing removed: every unit, whatever the multiple
    for count in steps:
        removed |= set(next_units(order, removed, count, layer_of, min_per_layer=1))
        now = aligned_kept(order, removed, units, multiple)
        assert all(set(b) <= set(a) for a, b in zip(kept, now))  # nested: nothing returns
        raw = per_layer(set(range(150)) - removed, units)
        for n, k, r in zip(units, now, raw):
            assert len(k) == len(r) if multiple == 1 or len(r) == n else (len(k) % multiple == 0 or len(k) == n)
            assert abs(len(k) - len(r)) <= max(multiple // 2, multiple - len(r)) and len(k) >= 1
        kept = now
    assert aligned_kept(order, removed, units, 1) == per_layer(set(range(150)) - removed, units)


def test_aligned_widths_keep_the_layers_most_important_units_and_refuse_an_unordered_removal():
    order = [7, 6, 5, 4, 3, 2, 1, 0] + list(range(8, 16))  # layer 0 sheds its high ids first, layer 1 its low
    # layer 0 keeps 5 -> 4 (its last 4 in the order); layer 1 keeps 7 -> 8 (rounded to the nearest multiple)
    assert aligned_kept(order, {7, 6, 5, 8}, [8, 8], 4) == [[0, 1, 2, 3], list(range(8))]
    assert aligned_kept(order, {7, 6, 5, 8}, [8, 8], 1) == [[0, 1, 2, 3, 4], list(range(1, 8))]
    with pytest.raises(ValueError, match="not the first"):
        aligned_kept(order, {0}, [8, 8], 4)  # unit 0 is layer 0's last in the order


def test_mac_targets_step_down_to_the_floor():
    assert mac_targets(0.05, 0.5) == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    assert mac_targets(0.2, 0.5) == [1.0, 0.8, 0.6]
    with pytest.raises(ValueError):
        mac_targets(0.0, 0.5)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A whole search with the progressive ladder (refit, no fine-tune) on the planted model."""
    from test_run_accuracy_budget import settings_for, train_planted

    from cahp_deploy.run import accuracy_budget

    root = tmp_path_factory.mktemp("progressive")
    data, dense, _, _ = train_planted(root)
    s = settings_for(data, dense, max_drop=100.0, recover=None, reconstruct={"max_examples": 40})
    s.ladder, s.mac_step, s.mac_floor = "macs", 0.2, 0.4
    record = accuracy_budget.search(s, root / "search")
    return root / "search", record, s


def test_progressive_rungs_are_nested_a_step_of_macs_apart_and_recorded(searched):
    root, record, _ = searched
    schedule = json.loads((root / "schedule.json").read_text())["rungs"]
    assert [r["k"] for r in schedule] == [100, 80, 60, 40] == record["candidates_k"]
    for above, below in zip(schedule, schedule[1:]):
        for kind in ("kept_heads", "kept_neurons"):
            assert all(set(b) <= set(a) for a, b in zip(above[kind], below[kind]))  # nested: nothing returns
        # about a step apart: each layer's FFN width is rounded to a multiple of 16 (or kept whole)
        assert below["macs_kept"] <= below["target"] + 0.05 and below["move"] in ("heads", "neurons", "both")
        assert all(len(n) % 16 == 0 or len(n) == len(d) for n, d in zip(below["kept_neurons"], schedule[0]["kept_neurons"]))
        assert below["macs_kept"] < above["macs_kept"]
    # a budget of 100 points: every rung passes, the last is chosen, its dir is mNNN, the others' models are gone
    assert record["ladder"] == "macs" and record["chosen_k"] == 40 and record["chosen_dir"] == "m040"
    from cahp_deploy.run.summary import _ladder_words

    assert record["neuron_multiple"] == 16 and "FFN width a multiple of 16" in _ladder_words(record)
    assert (root / "m040" / "model" / "config.json").is_file() and not (root / "m080" / "model").exists()
    tried = {c["k"]: c for c in record["tried"]}
    assert tried[100]["details"]["dense_anchor"] is True
    assert tried[80]["details"]["recovery"] == "least-squares refit"
    assert tried[40]["details"]["macs_removed"] == pytest.approx(1 - schedule[-1]["macs_kept"], abs=1e-3)
    sel = json.loads((root / "m040" / "selection.json").read_text())
    assert sel["kept_heads"] == schedule[-1]["kept_heads"] and sel["kept_neurons"] == schedule[-1]["kept_neurons"]


def test_a_second_search_reuses_the_schedule_and_every_candidate(searched):
    """Rerun into the same dir: the schedule and every candidate are read back, not rebuilt."""
    from cahp_deploy.run import accuracy_budget

    root, record, s = searched
    stamps = {p: p.stat().st_mtime_ns for p in [root / "schedule.json", *root.glob("m*/candidate.json")]}
    said: list[str] = []
    s.say = said.append
    again = accuracy_budget.search(s, root)
    assert len(stamps) == 5 and all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.parent.name != "m040")
    assert again["chosen_k"] == record["chosen_k"] and [c["drop"] for c in again["tried"]] == \
        [c["drop"] for c in record["tried"]]
    assert sum("done before, reused" in line for line in said) == 4 and not any("building the progressive" in x for x in said)
