"""The whole run's decision logic, simulated: how often does something ship above the budget?

Pure numpy, no model: every candidate and every artifact is a draw of paired counts against dense
with a chosen true drop, and the very functions `run` decides with judge them, in the same order:
:func:`cahp_deploy.run.budget_search.search_k` down the ladder (the first rung is dense itself), then
:func:`cahp_deploy.run.promise.ship` over the measured artifacts (the chosen rung's fp32-exact graph, dense
INT8 and the pruned INT8 graph, ordered by a fixed latency). At the worst case, every candidate's true
drop *equal* to the budget, any shipped artifact but the exact dense model is a false pass; its rate
must be at most ``alpha = 1 - confidence``. ``two_sequences=True`` judges both sequences at the full
confidence, the logic before the error rate was split: its rate is about ``2 alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cahp_deploy.paired import drop_upper
from cahp_deploy.run.budget_search import CandidateResult, search_k
from cahp_deploy.run.promise import PRUNED, ErrorRates, ship


@dataclass(frozen=True)
class Scenario:
    """Paired rows as in the real runs (SST-5 decision rows by default)."""

    rows: int = 1101
    dense_accuracy: float = 0.47
    disagreement: float = 0.08  # share of rows a candidate and dense disagree on correctness
    max_drop: float = 1.0  # points; every candidate's true drop equals it (the worst case)
    rungs: tuple[int, ...] = (72, 66, 60, 54, 48)
    confidence: float = 0.9


def _counts(rng: np.random.Generator, s: Scenario, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows only dense gets right, rows only the candidate gets right) of ``size`` candidates whose true
    drop vs dense is ``s.max_drop`` points, each on ``s.rows`` paired rows (all a bound reads)."""
    q, delta = s.disagreement, s.max_drop / 100.0
    # P(only dense right) - P(only candidate right) = delta, their sum = q
    draws = rng.multinomial(s.rows, [(q + delta) / 2, (q - delta) / 2, 1 - q], size=size)
    return draws[:, 0], draws[:, 1]


def _drop(n: int, b: int, c: int, upper: float, confidence: float) -> dict:
    return {"n": n, "ref_only": int(b), "new_only": int(c), "drop": 100.0 * (b - c) / n, "upper": float(upper),
            "confidence": confidence}


def simulate(trials: int, s: Scenario = Scenario(), two_sequences: bool = False, seed: int = 0) -> list[str | None]:
    """What each of ``trials`` simulated runs ships: ``"dense fp32"`` (no loss), a false pass's name, or None.

    The bounds are computed for every trial at once (:func:`cahp_deploy.paired.drop_upper` is
    vectorized); the decisions are the very :func:`search_k` and :func:`ship`, run per trial.
    """
    rates = ErrorRates(s.confidence)
    search_level, ship_level = (s.confidence, s.confidence) if two_sequences else (rates.search, rates.ship)
    rng = np.random.default_rng(seed)
    # the dense anchor (rung 0) is dense itself: no discordant row; every other rung, and the two INT8
    # graphs (the pruned one, dense INT8), sit exactly at the budget
    names = [*s.rungs[1:], "pruned int8", "dense int8"]
    counts = {name: _counts(rng, s, trials) for name in names}
    counts[s.rungs[0]] = (np.zeros(trials, dtype=int), np.zeros(trials, dtype=int))
    search_upper = {k: drop_upper(s.rows, *counts[k], search_level) for k in s.rungs}
    ship_upper = {name: drop_upper(s.rows, *counts[name], ship_level) for name in counts}
    outcomes = []
    for t in range(trials):
        def evaluate(k: int) -> CandidateResult:
            b, c = counts[k][0][t], counts[k][1][t]
            return CandidateResult(k=k, accuracy_before=0.0, drop=_drop(s.rows, b, c, search_upper[k][t], search_level))

        chosen = search_k(list(s.rungs), evaluate, s.dense_accuracy, s.max_drop).chosen.k

        def judged(name, p50: float) -> dict:
            b, c = counts[name][0][t], counts[name][1][t]
            return {"decision": _drop(s.rows, b, c, ship_upper[name][t], ship_level), "p50_ms": p50}

        # the chosen rung's fp32-exact graph is the chosen model itself; fixed latencies order the rest
        pruned = {"optimized": judged(chosen, 300.0), "int8": judged("pruned int8", 200.0)}
        shipped = ship(pruned, judged("dense int8", 250.0), s.max_drop)
        if shipped["artifact"] is None:
            outcomes.append(None)
        elif shipped["artifact"] == PRUNED and shipped["variant"] == "optimized" and chosen == s.rungs[0]:
            outcomes.append("dense fp32")  # the dense anchor's exact graph: no loss at all
        else:
            outcomes.append(f"{shipped['artifact']} {shipped['variant']} (k={chosen})")
    return outcomes


def false_pass_rate(trials: int, s: Scenario = Scenario(), two_sequences: bool = False, seed: int = 0) -> float:
    """Share of ``trials`` simulated runs that ship an artifact whose true drop is the budget itself."""
    outcomes = simulate(int(trials), s, two_sequences, seed)
    return sum(o is not None and o != "dense fp32" for o in outcomes) / len(outcomes)


__all__ = ["Scenario", "false_pass_rate", "simulate"]
