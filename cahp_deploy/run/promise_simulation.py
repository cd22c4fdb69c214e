"""The whole run's decision logic, simulated: how often does something ship above the budget?

Pure numpy, no model: every candidate and every artifact is a set of paired rows against dense drawn
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

from cahp_deploy.paired import paired_drop
from cahp_deploy.run.budget_search import CandidateResult, search_k
from cahp_deploy.run.promise import DENSE, PRUNED, ErrorRates, ship


@dataclass(frozen=True)
class Scenario:
    """Paired rows as in the real runs (SST-5 decision rows by default)."""

    rows: int = 1101
    dense_accuracy: float = 0.47
    disagreement: float = 0.08  # share of rows a candidate and dense disagree on correctness
    max_drop: float = 1.0  # points; every candidate's true drop equals it (the worst case)
    rungs: tuple[int, ...] = (72, 66, 60, 54, 48)
    confidence: float = 0.9


def _draw(rng: np.random.Generator, dense: np.ndarray, s: Scenario) -> np.ndarray:
    """A candidate's per-row correctness whose true drop vs ``dense`` is ``s.max_drop`` points."""
    q, delta = s.disagreement, s.max_drop / 100.0
    # P(only dense right) - P(only candidate right) = delta, their sum = q
    p_lose, p_gain = (q + delta) / 2, (q - delta) / 2
    u = rng.random(dense.shape)
    new = dense.copy()
    new[dense & (u < p_lose / s.dense_accuracy)] = False
    new[~dense & (u < p_gain / (1 - s.dense_accuracy))] = True
    return new


def one_run(rng: np.random.Generator, s: Scenario, two_sequences: bool = False) -> str | None:
    """What one simulated run ships: ``"dense fp32"`` (no loss), a false pass's name, or None."""
    rates = ErrorRates(s.confidence)
    search_level, ship_level = (s.confidence, s.confidence) if two_sequences else (rates.search, rates.ship)
    dense = rng.random(s.rows) < s.dense_accuracy
    models = {k: dense if k == s.rungs[0] else _draw(rng, dense, s) for k in s.rungs}

    def evaluate(k: int) -> CandidateResult:
        return CandidateResult(k=k, accuracy_before=float(models[k].mean()),
                               drop=paired_drop(dense, models[k], search_level).to_dict())

    found = search_k(list(s.rungs), evaluate, float(dense.mean()), s.max_drop)
    chosen = models[found.chosen.k]
    # the chosen rung's fp32-exact graph is the chosen model; its INT8 graph and dense INT8 are new draws
    # (the dense anchor's INT8 graph loses like dense INT8: at the boundary)
    artifacts = {(PRUNED, "optimized"): (chosen, 300.0), (DENSE, "int8"): (_draw(rng, dense, s), 250.0),
                 (PRUNED, "int8"): (_draw(rng, dense, s), 200.0)}

    def judged(rows: np.ndarray, p50: float) -> dict:
        d = paired_drop(dense, rows, ship_level).to_dict()
        return {"decision": d, "p50_ms": p50}

    pruned = {v: judged(*artifacts[(a, v)]) for a, v in artifacts if a == PRUNED}
    shipped = ship(pruned, judged(*artifacts[(DENSE, "int8")]), s.max_drop)
    if shipped["artifact"] is None:
        return None
    if shipped["artifact"] == PRUNED and shipped["variant"] == "optimized" and found.chosen.k == s.rungs[0]:
        return "dense fp32"  # the dense anchor's exact graph: no loss at all
    return f"{shipped['artifact']} {shipped['variant']} (k={found.chosen.k})"


def false_pass_rate(trials: int, s: Scenario = Scenario(), two_sequences: bool = False, seed: int = 0) -> float:
    """Share of ``trials`` simulated runs that ship an artifact whose true drop is the budget itself."""
    rng = np.random.default_rng(seed)
    outcomes = [one_run(rng, s, two_sequences) for _ in range(int(trials))]
    return sum(o is not None and o != "dense fp32" for o in outcomes) / len(outcomes)


__all__ = ["Scenario", "false_pass_rate", "one_run"]
