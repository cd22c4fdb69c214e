"""Re-decide committed ladder runs with the current statistics, from their recorded paired counts.

Every candidate's and artifact's paired drop is recorded with its counts (rows, rows only dense gets
right, rows only the candidate gets right, dense accuracy), which is all a bound needs. So the ladder
(search_budget*.json) and the shipping sequence and confirmation (confirm_budget*.json) of a finished
run can be judged again by today's rules, without a model: the paired bound of
:mod:`cahp_deploy.paired`, the search and the shipping sequence each at half the run's error rate
(:class:`cahp_deploy.run.promise.ErrorRates`), the confirmation at the full confidence.

    python bench/redecide_promise.py bench/results/promise/minilm-sst5-ladder 1 [2 0.5]

Prints a Markdown table: per budget, the rungs (old bound -> new bound), what the shipping sequence
ships now (and before), and the confirmation (old and new upper bound, confirmed or not).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cahp_deploy.paired import paired_drop
from cahp_deploy.run.budget_search import CandidateResult, search_k
from cahp_deploy.run.promise import ErrorRates, ship


def rows_of(d: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-row correctness (dense, candidate) with exactly the recorded counts."""
    n, b, c = int(d["n"]), int(d["ref_only"]), int(d["new_only"])
    ref_right = int(round(d["ref_accuracy"] * n / 100))
    both = ref_right - b
    ref = np.zeros(n, dtype=bool)
    new = np.zeros(n, dtype=bool)
    ref[:both] = new[:both] = True
    ref[both:both + b] = True  # only dense right
    new[both + b:both + b + c] = True  # only the candidate right
    return ref, new


def bound(d: dict, confidence: float) -> dict:
    return paired_drop(*rows_of(d), confidence).to_dict()


def redecide(run_dir: Path, budget: str) -> list[str]:
    search = json.loads((run_dir / f"search_budget{budget}.json").read_text())
    confirm = json.loads((run_dir / f"confirm_budget{budget}.json").read_text())
    max_drop = float(search["max_drop_points"])
    rates = ErrorRates(float(confirm["confidence"]))
    tried = {c["k"]: c for c in search["tried"]}

    def evaluate(k: int) -> CandidateResult:
        if k not in tried:
            raise LookupError(k)  # the old search stopped before this rung: nothing measured
        c = tried[k]
        return CandidateResult(k=k, accuracy_before=c["accuracy_before"], accuracy_after=c["accuracy_after"],
                               drop=bound(c["drop"], rates.search))

    rungs = [k for k in search["candidates_k"] if k in tried] + \
        [k for k in search["candidates_k"] if k not in tried][:1]
    try:
        found = search_k(rungs, evaluate, search["dense_accuracy"], max_drop)
        chosen, note = found.chosen.k, ""
    except LookupError as e:
        chosen, note = None, f"passes every rung the old run measured; rung {e} was never measured"
    steps = ", ".join(f"{k}: {tried[k]['drop']['upper']:.2f} -> {bound(tried[k]['drop'], rates.search)['upper']:.2f}"
                      for k in rungs if k in tried)
    head = f"| {run_dir.name}, budget {max_drop:g} | {steps} | k={chosen} (was {search['chosen_k']}){note}"
    if chosen != search["chosen_k"]:
        return [head + "; the shipped artifact was built from another rung: rerun | |"]

    def judged(v: dict) -> dict:
        return {**v, "decision": bound(v["decision"], rates.ship)}

    pruned = {name: judged(v) for name, v in confirm["variants"].items()}
    dense_int8 = judged(confirm["dense_int8"]) if confirm.get("dense_int8") else None
    now = ship(pruned, dense_int8, max_drop)
    before = confirm["shipped"]
    shipped = dense_int8 if now["artifact"] == "dense" else pruned.get(now["variant"])
    conf_old = (confirm["dense_int8"] if before["artifact"] == "dense" else confirm["variants"][before["variant"]])["confirmation"]
    conf_new = None if shipped is None else bound(shipped["confirmation"], rates.confidence)
    ship_steps = "; ".join(f"{t['artifact']} {t['variant']} {t['upper']:.2f} {'pass' if t['passed'] else 'MISS'}"
                           for t in now["tested"])
    held = None if conf_new is None else conf_new["upper"] <= max_drop + 1e-9
    return [head + f"; ships {now['artifact']} {now['variant']} (was {before['artifact']} {before['variant']}); "
            f"{ship_steps} | {conf_old['upper']:.2f} -> "
            f"{'—' if conf_new is None else format(conf_new['upper'], '.2f')}: "
            f"{'confirmed' if held else 'NOT confirmed'} (drop {conf_old['drop']:+.2f}) |"]


def main(argv: list[str]) -> None:
    run_dir = Path(argv[0])
    print("| run | rungs: upper bound old (Wald, 90%) -> new (search at 95%) | chosen; shipped now (before); "
          "shipping sequence at 95% | confirmation upper bound old -> new (90%) |")
    print("|---|---|---|---|")
    for budget in argv[1:]:
        for line in redecide(run_dir, budget):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
