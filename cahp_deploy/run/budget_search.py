"""The accuracy budget: the fewest heads whose model stays within P points of dense, tested so the promise holds.

Pure given a callback: :func:`search_k` never touches a model. The caller (``run``) supplies
``evaluate(k)``, which selects k heads, prunes, recovers and measures, and returns a
:class:`CandidateResult`. Each call costs a recovery fine-tune, so the search tries as few k as it can.

Strategy: **fixed-sequence testing down a ladder** fixed before any accuracy is seen::

    ladder = N, N - s, N - 2s, ..., the knee        (s = the step, about N / 12 heads)
    test each rung in order at the stated confidence; stop at the first rung that misses;
    the last rung that passed is chosen

Why this order, and why stop at the first miss:

* **Many looks at one set of decision rows.** Judging a dozen candidates on the same ~1,000 rows and
  keeping the first that passes picks noise in its favour (measured: a budget-2 run passed k=57 at an
  upper bound of 1.45 on SST-5 validation and lost 1.40 points on test, interval 0.29 .. 2.51). Testing a
  sequence fixed in advance, and stopping at the first miss, keeps the chance that *any* rung passes
  falsely at the level of one test, with no Bonferroni penalty (Westfall & Krishen 2001; the
  "fixed-sequence" step of Learn-then-Test, Angelopoulos et al. 2021). Bisection or galloping from the knee
  would choose which rung to look at from the looks already taken, which is exactly what the
  guarantee forbids.
* **Recovered accuracy is not monotone in k.** A search from the knee upwards that gives up when the
  largest candidate misses (what this module did before) never finds the passing k=58 of a model
  whose every-head candidate misses. Starting at every head, where the model is closest to dense, the
  rungs that matter (near-dense ones, for tight budgets) are tried first.
* The price: a rung below the first miss is never tried, even when it would pass; ``stopped_at``
  says where the descent stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cahp_deploy.errors import CahpError

#: accuracies within this of the threshold count as meeting it (float noise from averaging)
_EPS = 1e-9
#: the default ladder has about this many rungs from every head down to none
DEFAULT_RUNGS = 12
RULE = "fixed-sequence: rungs tested from every head downwards, stopping at the first miss"


@dataclass
class CandidateResult:
    """What one candidate k gave.

    Attributes
    ----------
    k : heads kept.
    accuracy_before : accuracy on the evaluation split with the heads removed, before recovery, in [0, 1].
    accuracy_after : the same after recovery, or None when recovery was skipped.
    seconds : wall time of this candidate (selection + pruning + recovery + evaluation).
    details : anything else the caller wants recorded (paths, per-phase times, kept heads...).
    drop : the paired accuracy drop against dense on the same rows
        (:meth:`cahp_deploy.paired.PairedDrop.to_dict`), or None. When given, the candidate is judged
        on its ``upper`` confidence bound, not on the point estimate.
    """

    k: int
    accuracy_before: float
    accuracy_after: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    drop: dict[str, Any] | None = None

    @property
    def judged(self) -> str:
        """Which version the budget judges: ``"recovered"``, or ``"pruned"`` when there was no recovery
        (``--no-recover``, or the first rung, which is dense itself)."""
        return "pruned" if self.accuracy_after is None else "recovered"

    @property
    def accuracy(self) -> float:
        """The accuracy the budget is judged on: after recovery when there was one."""
        return self.accuracy_before if self.accuracy_after is None else self.accuracy_after

    def passes(self, max_drop: float, threshold: float) -> bool:
        """Upper bound of the paired drop within ``max_drop`` points; the point estimate when no drop was given."""
        if self.drop is not None:
            return self.drop["upper"] <= max_drop + _EPS
        return self.accuracy >= threshold - _EPS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "judged": self.judged}


@dataclass
class SearchResult:
    """The chosen candidate, every candidate tried (in order) and the rung the descent stopped at."""

    chosen: CandidateResult
    tried: list[CandidateResult]
    dense_accuracy: float
    max_drop: float
    threshold: float
    stopped_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen_k": self.chosen.k,
            "chosen": self.chosen.to_dict(),
            "tried": [c.to_dict() for c in self.tried],
            "dense_accuracy": self.dense_accuracy,
            "max_drop_points": self.max_drop,
            "threshold": self.threshold,
            "stopped_at": self.stopped_at,
            "rule": RULE,
        }


def default_step(num_heads: int) -> int:
    """Heads between rungs: about ``num_heads / DEFAULT_RUNGS`` (6 for 72 heads), at least 1."""
    return max(1, round(int(num_heads) / DEFAULT_RUNGS))


def ladder(knee: int, num_heads: int, step: int | None = None) -> list[int]:
    """The rungs, every head first: N, N - step, ... while above the knee, then the knee itself.

    Fixed by the model's size and CAHP's knee alone (no accuracy), so it can be tested in sequence.
    """
    n, knee = int(num_heads), max(1, min(int(knee), int(num_heads)))
    step = default_step(n) if step is None else int(step)
    if step < 1:
        raise CahpError(f"--search-step must be at least 1 head, got {step}")
    rungs = list(range(n, knee, -step))
    return rungs + [knee]


def ffn_ratio(k: int, knee: int, num_heads: int, floor: float) -> float:
    """The share of FFN neurons rung ``k`` keeps in a joint search: 1 at every head, ``floor`` at the
    knee, linear in k between (so heads and neurons thin out together, fixed before any accuracy)."""
    n, knee = int(num_heads), max(1, min(int(knee), int(num_heads)))
    if n == knee:
        return 1.0
    share = (min(max(int(k), knee), n) - knee) / (n - knee)
    return round(float(floor) + (1.0 - float(floor)) * share, 4)


def _validate(rungs: Sequence[int], dense_accuracy: float, max_drop: float) -> list[int]:
    ks = [int(k) for k in rungs]
    if not ks:
        raise CahpError("no candidate head counts to search; the CAHP sweep gave an empty list")
    if any(k < 1 for k in ks):
        raise CahpError(f"candidate head counts must be >= 1, got {ks}")
    if any(b >= a for a, b in zip(ks, ks[1:])):
        raise CahpError(f"the ladder's head counts must be strictly decreasing, got {ks}")
    if not 0.0 <= dense_accuracy <= 1.0:
        raise CahpError(f"dense accuracy must be a fraction in [0, 1], got {dense_accuracy}")
    if not 0.0 <= max_drop <= 100.0:
        raise CahpError(f"--max-accuracy-drop is in accuracy points and must be in [0, 100], got {max_drop}")
    return ks


def search_k(
    rungs: Sequence[int],
    evaluate: Callable[[int], CandidateResult],
    dense_accuracy: float,
    max_drop: float,
) -> SearchResult:
    """Test ``rungs`` in order (fixed-sequence); the last one that passes before the first miss.

    A candidate passes when the upper confidence bound of its paired drop is at most ``max_drop``
    (:meth:`CandidateResult.passes`).

    Parameters
    ----------
    rungs : strictly decreasing head counts (:func:`ladder`): every head first, the knee last.
    evaluate : k -> :class:`CandidateResult`; called once per rung tried, in order.
    dense_accuracy : accuracy of the dense model on the same evaluation rows, a fraction in [0, 1].
    max_drop : the allowed loss in accuracy *points* (1.0 = one percentage point = 0.01 accuracy),
        as the user types it on ``--max-accuracy-drop``.

    Raises
    ------
    CahpError : bad inputs, or the first rung (every head) already misses the budget.
    """
    ks = _validate(rungs, dense_accuracy, max_drop)
    threshold = dense_accuracy - max_drop / 100.0
    tried: list[CandidateResult] = []
    stopped = None
    for k in ks:
        result = evaluate(k)
        if int(result.k) != k:
            raise ValueError(f"evaluate({k}) returned a result for k={result.k}")
        tried.append(result)
        if not result.passes(max_drop, threshold):
            stopped = k
            break
    passed = tried if stopped is None else tried[:-1]
    if not passed:
        first = tried[0]
        d = first.drop
        if d is not None and d["ref_only"] + d["new_only"] == 0:  # identical to dense, and still not within it
            raise CahpError(
                f"{d['n']} decision rows cannot show a drop within --max-accuracy-drop {max_drop:g}: even k={first.k}, "
                f"identical to dense on every row, has an upper bound of {d['upper']:.2f} points; give more decision "
                "rows (a larger --eval-split or --eval-max-examples) or a larger budget"
            )
        bound = "" if d is None else f" (upper bound of its drop {d['upper']:.2f} points)"
        raise CahpError(
            f"no head count meets --max-accuracy-drop {max_drop:g}: even k={first.k}, the first rung, reaches "
            f"{100 * first.accuracy:.2f}% against the dense {100 * dense_accuracy:.2f}%{bound}; allow a larger drop "
            "(rerun into the same --out: the candidates already recovered are reused), give more decision rows, "
            "or ship dense INT8"
        )
    return SearchResult(passed[-1], tried, dense_accuracy, max_drop, threshold, stopped)


__all__ = ["DEFAULT_RUNGS", "RULE", "CandidateResult", "SearchResult", "default_step", "ffn_ratio", "ladder",
           "search_k"]
