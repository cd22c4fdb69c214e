"""Re-decide committed ladder runs with the current statistics, from their recorded paired counts.

Every candidate's and artifact's paired drop is recorded with its counts (rows, rows only dense gets
right, rows only the candidate gets right, dense accuracy), which is all a bound needs. So the ladder
(search_budget*.json) and the shipping sequence and confirmation (confirm_budget*.json) of a finished
run can be judged again by today's rules, without a model: the paired bound of
:mod:`cahp_deploy.paired`, the search and the shipping sequence each at half the run's error rate
(:class:`cahp_deploy.run.promise.ErrorRates`), the confirmation at the full confidence.

    python experiments/redecide_promise.py [experiments/results/promise] [--write]

Prints a Markdown table: per committed run, the rungs (old bound -> new bound), what the shipping
sequence ships now (and before), and the confirmation of what ships now; ``--write`` re-renders each
committed summary from its JSON in today's words, with that row beneath.
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


def redecide(search: dict, confirm: dict, name: str, ladder: bool = True) -> str:
    """One Markdown row: the ladder (when it was a fixed-sequence ladder), the shipping sequence and the
    confirmation, judged by today's rules from the recorded counts."""
    max_drop = float(confirm["max_drop_points"])
    rates = ErrorRates(float(confirm["confidence"]))
    tried = {c["k"]: c for c in search["tried"]}
    chosen, note, steps = search["chosen_k"], "", "(not a fixed-sequence ladder: not re-decided)"
    if ladder:
        def evaluate(k: int) -> CandidateResult:
            if k not in tried:
                raise LookupError(k)  # the old search stopped before this rung: nothing measured
            c = tried[k]
            return CandidateResult(k=k, accuracy_before=c["accuracy_before"], accuracy_after=c["accuracy_after"],
                                   drop=bound(c["drop"], rates.search))

        rungs = [k for k in search["candidates_k"] if k in tried] + \
            [k for k in search["candidates_k"] if k not in tried][:1]
        try:
            chosen = search_k(rungs, evaluate, search["dense_accuracy"], max_drop).chosen.k
        except LookupError as e:
            chosen, note = None, f"; passes every rung the old run measured, rung {e} was never measured"
        steps = ", ".join(f"{k}: {tried[k]['drop']['upper']:.2f} -> {bound(tried[k]['drop'], rates.search)['upper']:.2f}"
                          for k in rungs if k in tried)
    head = f"| {name}, budget {max_drop:g} | {steps} | k={chosen} (was {search['chosen_k']}){note}"
    if chosen != search["chosen_k"]:
        return head + "; the artifacts were built from another rung: rerun | |"

    def judged(v: dict) -> dict:
        return {**v, "decision": bound(v["decision"], rates.ship)}

    pruned = {v: judged(r) for v, r in confirm["variants"].items()}
    dense_int8 = judged(confirm["dense_int8"]) if confirm.get("dense_int8") else None
    now = ship(pruned, dense_int8, max_drop)
    before = confirm.get("shipped") or {"artifact": "pruned", "variant": confirm.get("recommended")}
    shipped = dense_int8 if now["artifact"] == "dense" else pruned.get(now["variant"])
    conf_new = None if shipped is None else bound(shipped["confirmation"], rates.confidence)
    ship_steps = "; ".join(f"{t['artifact']} {t['variant']} {t['upper']:.2f} {'pass' if t['passed'] else 'MISS'}"
                           for t in now["tested"])
    verdict = "—" if conf_new is None else (
        f"drop {conf_new['drop']:+.2f}, upper {conf_new['upper']:.2f}: "
        f"{'confirmed' if conf_new['upper'] <= max_drop + 1e-9 else 'NOT confirmed'}")
    return (head + f"; ships {now['artifact']} {now['variant']} (was {before['artifact']} {before['variant']}): "
            f"{ship_steps} | {verdict} |")


TABLE_HEAD = ("| run | rungs: upper bound old (Wald, 90%) -> new (search at 95%) | chosen; shipped now (before); "
              "shipping sequence at 95% | what ships now, on the confirmation rows (90%) |\n|---|---|---|---|")


def render(search: dict, confirm: dict, row: str) -> str:
    """A committed summary, re-rendered in today's words from its JSON, with today's decision beneath."""
    from cahp_deploy.run.summary import _candidates_table, promise_lines

    lines = ["# cahp-deploy run (re-rendered)", "",
             "Re-rendered by `experiments/redecide_promise.py` from the committed confirm and search JSON beside it, in "
             "today's words: a drop is dense minus the candidate, in points (positive is worse), and every bound "
             "is the drop's upper one. The decisions below are the ones made at the time (Wald bounds at 90%, "
             "the ladder and the shipping sequence each at the full level); the last section re-decides them "
             "by today's rules.", ""]
    lines += [f"- {line}" for line in promise_lines(confirm)] + [""]
    if search.get("tried") and all("details" in c for c in search["tried"]):
        lines += ["## Accuracy budget search (as decided then)", "", *_candidates_table(search), ""]
    lines += ["## Re-decided by today's rules", "", TABLE_HEAD, row, ""]
    return "\n".join(lines)


#: (directory, search file, confirm file, summary file, a fixed-sequence ladder) of every committed run
COMMITTED = [
    *[("minilm-sst5-ladder", f"search_budget{b}.json", f"confirm_budget{b}.json", f"summary_budget{b}.md", True)
      for b in ("1", "2", "0.5")],
    *[("minilm-mnli-ladder", f"search_{b}.json", f"confirm_{b}.json", f"summary_{b}.md", True)
      for b in ("budget1", "budget2", "budget0.5", "joint_ffn0.5_budget1")],
    ("minilm-sst5-qat", "search_budget2.json", "confirm.json", "summary.md", False),
    ("minilm-mnli-qat", "search_budget2.json", "confirm.json", "summary.md", False),
    ("minilm-sst5-budget2", "search.json", "confirm.json", "summary.md", False),
]


def main(argv: list[str]) -> None:
    """``redecide_promise.py [RESULTS_DIR] [--write]``: print the table; with --write, re-render the summaries."""
    root = Path(next((a for a in argv if not a.startswith("--")), "experiments/results/promise"))
    print(TABLE_HEAD)
    for d, s_file, c_file, md, ladder in COMMITTED:
        search = json.loads((root / d / s_file).read_text())
        confirm = json.loads((root / d / c_file).read_text())
        row = redecide(search, confirm, f"{d}/{c_file}", ladder)
        print(row)
        if "--write" in argv:
            (root / d / md).write_text(render(search, confirm, row))


if __name__ == "__main__":
    main(sys.argv[1:])
