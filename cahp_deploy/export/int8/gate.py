"""When is an INT8 graph good enough? The accuracy gate (default) and the agreement gate.

What a user promises downstream is accuracy, so the default gate is the **accuracy drop** of the INT8
graph against its fp32 source on labelled rows, judged on a paired basis (:mod:`cahp_deploy.paired`):
it passes when the one-sided upper confidence bound of the drop is at most ``max_drop`` points. Why not
argmax agreement (the older gate, kept for users who need identical outputs): five classes with small
margins flip in both directions, so low agreement can come with no accuracy lost at all, and a 99 %
agreement gate kept most of the MACs in fp32 for nothing (DESIGN.md, "Measurements behind the code").

Without labels (random tokens) accuracy cannot be measured; the agreement gate is the only one.

The rule serves two disjoint sets of rows: the **tuning** rows choose which nodes stay fp32 (the
search stops at the cheapest set that meets :meth:`Int8Gate.target`), the **gate** rows accept or
reject the result on the upper bound of its drop (:meth:`Int8Gate.judge`): the promise.

On the tuning rows the accuracy rule predicts the bound the *gate rows* will show (:meth:`predicted_upper`)
from how often INT8 changes whether a row is right (the discordant rows), not from the tuning drop:

* tuning rows are training rows, where the fp32 model is overfit, so INT8's noise costs accuracy
  there that it does not cost elsewhere (the train drop would keep MACs fp32 for nothing);
* what the gate can accept depends on its own row count: at a zero drop a 0.5-point bound at 90 %
  allows about 8 discordant rows in 1,101, 348 in 5,000.

So the prediction is the bound of a zero drop (:func:`cahp_deploy.paired.drop_upper`) with the tuning
rows' discordance on the gate's rows; a real drop shows on the gate rows, and a miss
there shrinks the target by the overshoot's factor for one more search.

The gate rows are looked at up to three times (:data:`LOOK_SHARES`): first the graph with *every*
candidate INT8 (the fastest; the search's zero-drop prediction cannot see that INT8 may even gain
accuracy), then the searched graph, then the one
retuned after a miss. Each look spends a share of the error rate ``1 - confidence`` (Bonferroni), so
the chance that *some* look passes a graph that breaks the budget stays within ``1 - confidence``.
Pure numpy: no ONNX Runtime here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from cahp_deploy.errors import CahpError
from cahp_deploy.paired import DEFAULT_CONFIDENCE, PairedDrop, correct, drop_upper, paired_drop

#: default accuracy gate: the INT8 graph may lose at most this many points (upper confidence bound)
INT8_MAX_ACCURACY_DROP = 0.5
#: agreement gate's default margin on the tuning rows, in binomial standard errors (see :meth:`Int8Gate.target`)
MARGIN_STANDARD_ERRORS = 2.0

ACCURACY, AGREEMENT = "accuracy", "agreement"
#: the accuracy gate's looks at the gate rows and the share of the error rate (1 - confidence) each
#: spends: every candidate INT8, the searched graph, the graph retuned after a miss
LOOKS = ("every candidate INT8", "searched", "retuned after a miss")
LOOK_SHARES = (0.5, 0.25, 0.25)


def score(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None,
          confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Argmax agreement and mean squared logit error against ``reference``; with ``labels`` also the
    paired accuracy drop (points) of ``logits`` vs ``reference`` and its upper bound."""
    out = {
        "agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        "logit_mse": float(((logits - reference) ** 2).mean()),
    }
    if labels is not None:
        out.update(_drop_figures(paired_drop(correct(reference, labels), correct(logits, labels), confidence)))
    return out


def _drop_figures(pd: PairedDrop) -> dict:
    return {"accuracy": round(pd.new_accuracy, 4), "reference_accuracy": round(pd.ref_accuracy, 4),
            "drop": round(pd.drop, 4), "drop_upper": round(pd.upper, 4),
            "discordant": pd.ref_only + pd.new_only, "n": pd.n}


@dataclass(frozen=True)
class Int8Gate:
    """The acceptance rule: ``kind`` accuracy (``max_drop`` points, upper bound at ``confidence``) or
    agreement (``min_agreement``, a fraction)."""

    kind: str
    max_drop: float | None = None
    min_agreement: float | None = None
    confidence: float = DEFAULT_CONFIDENCE
    gate_rows: int | None = None  # how many rows the bound is judged on (None: as many as tuned on)

    @classmethod
    def accuracy(cls, max_drop: float, confidence: float = DEFAULT_CONFIDENCE, gate_rows: int | None = None) -> Int8Gate:
        if not 0.0 <= float(max_drop) <= 100.0:
            raise CahpError(f"--int8-max-accuracy-drop {max_drop} must be in [0, 100] points (default {INT8_MAX_ACCURACY_DROP})")
        if not 0.5 < float(confidence) < 1.0:
            raise CahpError(f"--confidence {confidence} must be in (0.5, 1)")
        return cls(ACCURACY, max_drop=float(max_drop), confidence=float(confidence), gate_rows=gate_rows)

    @classmethod
    def agreement(cls, min_agreement: float) -> Int8Gate:
        if not 0.0 <= float(min_agreement) <= 1.0:
            raise CahpError(f"--int8-min-agreement {min_agreement} must be a fraction in [0, 1]")
        return cls(AGREEMENT, min_agreement=float(min_agreement))

    @property
    def needs_labels(self) -> bool:
        return self.kind == ACCURACY

    def look(self, k: int) -> Int8Gate:
        """The gate of look ``k`` (:data:`LOOKS`): the accuracy gate at the confidence that spends
        its :data:`LOOK_SHARES` share of ``1 - confidence``; the agreement gate as it is (it has no
        error rate to spend)."""
        if self.kind != ACCURACY:
            return self
        return replace(self, confidence=1.0 - (1.0 - self.confidence) * LOOK_SHARES[k])

    def rows_needed(self) -> int:
        """The fewest rows on which every look of the accuracy gate can pass: the rows on which a graph
        identical to fp32 (no discordant row) has an upper bound (:func:`cahp_deploy.paired.drop_upper`,
        at the strictest look's confidence) within ``max_drop``; 1,130 rows for 0.5 points at 90 %
        (97.5 % at the strictest look). 1 for the agreement gate."""
        if self.kind != ACCURACY:
            return 1
        strictest = 1.0 - (1.0 - self.confidence) * min(LOOK_SHARES)
        if drop_upper(10**7, 0, 0, strictest) > self.max_drop:
            return 10**7  # no practical number of rows can show it
        low, high = 1, 10**7  # the bound falls with the rows: bisect for the first n that meets it
        while low < high:
            mid = (low + high) // 2
            if drop_upper(mid, 0, 0, strictest) <= self.max_drop + 1e-9:
                high = mid
            else:
                low = mid + 1
        return low

    def describe(self) -> str:
        if self.kind == ACCURACY:
            return f"accuracy drop vs fp32 <= {self.max_drop:g} points (one-sided {100 * self.confidence:g}% upper bound)"
        return f"argmax agreement with fp32 >= {self.min_agreement:.2%}"

    def target(self, num_examples: int, margin: float | None = None) -> float:
        """What the search demands on the tuning rows.

        Accuracy: the bound the gate rows are predicted to show (:meth:`predicted_upper`) <= ``max_drop - margin``
        (default margin 0; a miss on the gate rows tightens it). Agreement: ``min_agreement + margin``, by default :data:`MARGIN_STANDARD_ERRORS`
        binomial standard errors of an agreement of ``min_agreement`` on ``num_examples`` rows, because
        the search stops at the first node set that clears its target, which favours sets that are
        lucky on the tuning rows.
        """
        if self.kind == ACCURACY:
            return self.max_drop - (margin or 0.0)
        if margin is None:
            g = self.min_agreement
            margin = MARGIN_STANDARD_ERRORS * math.sqrt(g * (1.0 - g) / max(1, num_examples))
        return min(1.0, self.min_agreement + margin)

    def predicted_upper(self, figures: dict) -> float:
        """The upper bound (points) a zero drop would get on ``gate_rows`` rows (default: as many as
        ``figures`` has) with the discordant share of tuning-row ``figures``; one discordant row at
        least, as :func:`cahp_deploy.paired.paired_drop` counts it."""
        rows = self.gate_rows or figures["n"]
        half = max(figures["discordant"] / figures["n"], 1.0 / rows) * rows / 2  # discordant rows, half each way
        return float(drop_upper(rows, half, half, self.confidence))

    def met(self, figures: dict, target: float) -> bool:
        """Whether tuning-row ``figures`` (from :func:`score`) meet ``target`` (from :meth:`target`)."""
        if self.kind == ACCURACY:
            return self.predicted_upper(figures) <= target + 1e-9
        return figures["agreement"] >= target

    def error_ceiling(self, tuning: dict, held_out: dict) -> float:
        """After a miss on the gate rows, the tuning-row logit MSE the next search must reach.

        The zero-drop prediction cannot see a systematic drop (MiniLM-MNLI's pruned model, all INT8:
        2.1 % discordant tuning rows, predicted bound 0.43; on the gate rows 79 rows only fp32 got right
        and 41 only INT8, bound 1.23), so a retune by the prediction alone rebuilt the same graph. The miss
        says by which factor ``f`` the discordant rows must shrink (both directions alike) for the bound,
        at this gate's confidence, to fit; a row flips when the quantization noise crosses its margin, so
        flips grow with the noise's standard deviation and the logit MSE must shrink by ``f**2``.
        """
        pd = held_out["paired_drop"]
        n, b, c = pd["n"], pd["ref_only"], pd["new_only"]

        def fits(f: float) -> bool:
            return float(drop_upper(n, f * b, f * c, self.confidence)) <= self.max_drop + 1e-9

        if fits(1.0):
            return float(tuning["logit_mse"])
        low, high = 0.0, 1.0  # fits(low) (or low is 0), not fits(high)
        if fits(0.0):
            for _ in range(40):
                mid = (low + high) / 2
                low, high = (mid, high) if fits(mid) else (low, mid)
        return float(tuning["logit_mse"]) * low * low

    def retune_margin(self, target: float, tuning: dict, held_out: dict) -> float:
        """The agreement gate's margin for a second search after the gate rows rejected the first: the
        target moved by the gap between what the tuning rows promised and what the gate rows measured.
        (Shrinking the accuracy gate's zero-drop target cannot move a graph whose error is a drop, not
        discordance: that gate retunes to :meth:`error_ceiling`.)"""
        if self.kind == ACCURACY:
            raise ValueError("the accuracy gate retunes to error_ceiling(), not to a margin")
        gap = tuning["agreement"] - held_out["agreement"]
        return target - self.min_agreement + max(gap, 0.0) + 1e-9

    def judge(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
        """The gate on held-out rows: every figure, the paired drop (with labels), and ``passed``."""
        if self.needs_labels and labels is None:
            raise CahpError("the INT8 accuracy gate needs labelled rows; give --data, or use --int8-min-agreement")
        out: dict = {"gate": self.describe(), "kind": self.kind, **score(logits, reference)}
        if labels is not None:  # one paired drop: its figures and the whole record
            pd = paired_drop(correct(reference, labels), correct(logits, labels), self.confidence)
            out.update(_drop_figures(pd))
            out["paired_drop"] = pd.to_dict()
        if self.kind == ACCURACY:
            out["passed"] = out["drop_upper"] <= self.max_drop + 1e-9
        else:
            out["passed"] = out["agreement"] >= self.min_agreement
        return out

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "rule": self.describe()}
        if self.kind == ACCURACY:
            out.update({"max_drop_points": self.max_drop, "confidence": self.confidence, "num_gate_rows": self.gate_rows,
                        "looks": [{"graph": name, "confidence": round(self.look(k).confidence, 6)}
                                  for k, name in enumerate(LOOKS)]})
        else:
            out["min_agreement"] = self.min_agreement
        return out


__all__ = ["ACCURACY", "AGREEMENT", "INT8_MAX_ACCURACY_DROP", "Int8Gate", "LOOKS", "LOOK_SHARES", "MARGIN_STANDARD_ERRORS",
           "score"]
