"""The accuracy budget: the smallest head count whose (recovered) model stays within P points of dense.

Pure given a callback: :func:`search_k` never touches a model. The caller (``run``) supplies
``evaluate(k)``, which selects k heads, prunes, recovers and measures, and returns a
:class:`CandidateResult`. Each call costs a recovery fine-tune, so the search tries as few k as it can.

Strategy (galloping, then bisection), over the sorted candidate list ``ks`` (CAHP's cluster sweep from
its knee upwards)::

    try ks[0] (the knee)            -> meets the budget: done, nothing else is tried
    try ks[1], ks[3], ks[7], ...    -> the gap doubles until one meets the budget,
        ... up to ks[-1]               or the largest candidate fails: CahpError
    bisect between the last failing and the first passing index -> smallest passing k

Why galloping rather than bisecting the whole list: the answer is usually close to the knee, and
galloping finds an answer at index i in about 2*log2(i) evaluations, never needing the largest
(most expensive to lose, least useful) candidate unless nothing smaller works.

Monotonicity: the search assumes accuracy does not decrease as k grows. Recovered accuracy is only
roughly monotone (fine-tuning noise, different clusterings per k). When it is not, the returned k is
still a k that *was measured* to meet the budget, and every k tried below it failed; but an untried
k between two tried ones could also have met it (the result is then a local, not a global, minimum).
``SearchResult.tried`` records every evaluation so a reader can see the gaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cahp_deploy.errors import CahpError

#: accuracies within this of the threshold count as meeting it (float noise from averaging)
_EPS = 1e-9


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
    def accuracy(self) -> float:
        """The accuracy the budget is judged on: after recovery when there was one."""
        return self.accuracy_before if self.accuracy_after is None else self.accuracy_after

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


@dataclass
class SearchResult:
    """The chosen candidate and every candidate tried, in the order they were tried."""

    chosen: CandidateResult
    tried: list[CandidateResult]
    dense_accuracy: float
    max_drop: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen_k": self.chosen.k,
            "chosen": self.chosen.to_dict(),
            "tried": [c.to_dict() for c in self.tried],
            "dense_accuracy": self.dense_accuracy,
            "max_drop_points": self.max_drop,
            "threshold": self.threshold,
        }


def _validate(candidates_k: Sequence[int], dense_accuracy: float, max_drop: float) -> list[int]:
    ks = [int(k) for k in candidates_k]
    if not ks:
        raise CahpError("no candidate head counts to search; the CAHP sweep gave an empty list")
    if any(k < 1 for k in ks):
        raise CahpError(f"candidate head counts must be >= 1, got {ks}")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise CahpError(f"candidate head counts must be strictly increasing, got {ks}")
    if not 0.0 <= dense_accuracy <= 1.0:
        raise CahpError(f"dense accuracy must be a fraction in [0, 1], got {dense_accuracy}")
    if not 0.0 <= max_drop <= 100.0:
        raise CahpError(f"--max-accuracy-drop is in accuracy points and must be in [0, 100], got {max_drop}")
    return ks


def search_k(
    candidates_k: Sequence[int],
    evaluate: Callable[[int], CandidateResult],
    dense_accuracy: float,
    max_drop: float,
) -> SearchResult:
    """The smallest candidate k whose accuracy drop stays within ``max_drop`` points of dense.

    A candidate whose result carries a paired ``drop`` passes when the drop's upper confidence bound
    is at most ``max_drop`` (the statistical margin); one without passes on the point estimate,
    ``accuracy >= dense_accuracy - max_drop / 100``.

    Parameters
    ----------
    candidates_k : strictly increasing head counts; the first is the starting point (CAHP's knee).
    evaluate : k -> :class:`CandidateResult`; called at most once per k.
    dense_accuracy : accuracy of the dense model on the same evaluation split, a fraction in [0, 1].
    max_drop : the allowed loss in accuracy *points* (1.0 = one percentage point = 0.01 accuracy),
        as the user types it on ``--max-accuracy-drop``.

    Raises
    ------
    CahpError : bad inputs, or even the largest candidate loses more than ``max_drop`` points.
    """
    ks = _validate(candidates_k, dense_accuracy, max_drop)
    threshold = dense_accuracy - max_drop / 100.0
    tried: list[CandidateResult] = []
    cache: dict[int, CandidateResult] = {}

    def passes(i: int) -> bool:
        k = ks[i]
        if k not in cache:
            result = evaluate(k)
            if int(result.k) != k:
                raise ValueError(f"evaluate({k}) returned a result for k={result.k}")
            cache[k] = result
            tried.append(result)
        result = cache[k]
        if result.drop is not None:
            return result.drop["upper"] <= max_drop + _EPS
        return result.accuracy >= threshold - _EPS

    def done(i: int) -> SearchResult:
        return SearchResult(cache[ks[i]], tried, dense_accuracy, max_drop, threshold)

    if passes(0):
        return done(0)
    # Gallop: indices 1, 3, 7, 15, ... capped at the last one.
    fail, step = 0, 1
    while True:
        i = min(fail + step, len(ks) - 1)
        if passes(i):
            ok = i
            break
        if i == len(ks) - 1:
            best = max(tried, key=lambda c: c.accuracy)
            last = cache[ks[-1]]
            bound = "" if last.drop is None else f" (upper bound of its drop {last.drop['upper']:.2f} points)"
            raise CahpError(
                f"no head count meets --max-accuracy-drop {max_drop:g}: even k={ks[-1]} reaches "
                f"{100 * last.accuracy:.2f}% against the dense {100 * dense_accuracy:.2f}%{bound} "
                f"(best tried: k={best.k} at {100 * best.accuracy:.2f}%); allow a larger drop (rerun into the same "
                "--out: the candidates already recovered are reused), recover for more epochs, or ship dense INT8"
            )
        fail, step = i, step * 2
    # Bisect: ks[fail] fails, ks[ok] passes.
    while ok - fail > 1:
        mid = (fail + ok) // 2
        if passes(mid):
            ok = mid
        else:
            fail = mid
    return done(ok)


__all__ = ["CandidateResult", "SearchResult", "search_k"]
