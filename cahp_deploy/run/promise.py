"""The promise `run` makes, kept honest: decided on some rows, confirmed on rows the decision never saw.

A search that keeps the best-looking of many candidates on ~1,000 rows picks noise in its favour (paired
standard error ~1.5 points there). So:

1. **Decision rows vs confirmation rows** (:func:`split_eval`): with ``--confirm-split`` the whole
   evaluation split decides and that split confirms; otherwise a seeded part of the evaluation split is
   held out (:func:`default_confirm_fraction`, chosen so that neither bound is the weaker link) and never
   seen by any decision. :func:`power` says up front what those rows can show.
2. **Decisions on the upper confidence bound** of the paired drop (:mod:`cahp_deploy.paired`), and
   **one error rate for the whole run** (:class:`ErrorRates`): the search's ladder and the shipping
   sequence are the only looks at the decision rows (export's INT8 gate judges rows of its own), and
   alpha is split between the two.
3. **The shipped artifact is measured, not estimated** (:func:`ship`): the pruned model's fp32-exact
   graph, then every benchmarked artifact faster than it (the pruned INT8, and dense INT8, the honest
   competitor), slowest first; the first miss ends the sequence and the last artifact that passed is
   shipped (``confirm.json``'s ``shipped``).
4. **Confirmation**: every variant's drop (and the dense INT8's) is measured again through ONNX Runtime
   on the confirmation rows, at the length the artifact serves, and written with its interval to
   ``OUT/confirm.json``. When the shipped artifact's bound there misses the budget the promise is
   **not confirmed**, loudly: no variant is recommended, ``confirm.json``'s promise says so (``predict``
   warns), and `run` exits with :data:`EXIT_NOT_CONFIRMED` once everything is written.

Accuracy here is ONNX Runtime's, on the very files a user deploys, against the dense *fp32* artifact.
Drops are dense minus candidate, in points: positive is worse, and every bound is the drop's upper one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy.atomic import atomic_file
from cahp_deploy.errors import CahpError
from cahp_deploy.paired import DEFAULT_CONFIDENCE, correct, paired_drop, split_rows
from cahp_deploy.run.summary import points_word
from cahp_deploy.shipped import (
    CONFIRM_FILE, DENSE, DENSE_ARTIFACT_DIR, PRUNED, PRUNED_ARTIFACT_DIR, artifact_records, promise_of,
)

PARETO_PLOT = "pareto.png"
#: the share of the run's error rate the budget search's ladder gets; the shipping sequence gets the rest
SEARCH_SHARE = 0.5
#: the rates of disagreement with dense (rows one model gets right and the other wrong) the power line
#: reports: a near-dense candidate or an INT8 graph (3%), a pruned one (6%)
POWER_DISAGREEMENTS = (0.03, 0.06)
#: the exit status of `run` when everything was written but the promise was not confirmed
EXIT_NOT_CONFIRMED = 3


@dataclass(frozen=True)
class ErrorRates:
    """One error rate for the whole run, split between the two fixed sequences that look at the decision rows.

    The budget search's ladder and the shipping sequence (:func:`ship`) each stop at their first miss, so
    each keeps its false-pass chance at its own level however many rungs or artifacts it judges; but the
    shipping sequence starts again after the ladder stopped at a miss, on the same rows. Bonferroni
    across the two keeps the chance that *anything* ships above the budget at ``alpha = 1 - confidence``.
    The confirmation, on rows no decision saw, is judged at the full ``confidence``.
    """

    confidence: float

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def search(self) -> float:
        """Confidence of every bound the ladder decides on."""
        return 1.0 - self.alpha * SEARCH_SHARE

    @property
    def ship(self) -> float:
        """Confidence of every bound the shipping sequence decides on."""
        return 1.0 - self.alpha * (1.0 - SEARCH_SHARE)

    def to_dict(self) -> dict[str, float]:
        return {"alpha": round(self.alpha, 6), "search_alpha": round(1 - self.search, 6),
                "ship_alpha": round(1 - self.ship, 6), "confirmation_confidence": self.confidence}


def default_confirm_fraction(confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Share of the evaluation rows held out to confirm on when no --confirm-split is given.

    Chosen for power: decisions are judged at the split level ``1 - alpha/2``, the confirmation at
    ``1 - alpha``; a bound's width goes as ``z * sqrt(rate / rows)``, so holding out
    ``z_c**2 / (z_c**2 + z_d**2)`` of the rows makes the decision and the confirmation bounds equally
    wide at any disagreement rate: neither is the weaker link (0.38 at 90%).
    """
    from scipy.stats import norm

    rates = ErrorRates(float(confidence))
    z_c, z_d = norm.ppf(rates.confidence), norm.ppf(rates.search)
    return round(float(z_c**2 / (z_c**2 + z_d**2)), 2)


#: the held-out share at the default confidence
DEFAULT_CONFIRM_FRACTION = default_confirm_fraction()


def reach(rows: int, disagreement: float, confidence: float) -> float:
    """The smallest budget (points) ``rows`` rows can show for an artifact exactly as accurate as dense
    that disagrees with it on a ``disagreement`` share of the rows (half each way): its upper bound."""
    n = int(rows)
    m = int(round(n * float(disagreement)))
    ref = np.ones(n, dtype=bool)
    new = ref.copy()
    new[: m - m // 2] = False  # rows only dense gets right
    ref[m - m // 2 : m] = False  # rows only the candidate gets right
    return paired_drop(ref, new, confidence).upper


def power(decision_rows: int, confirmation_rows: int, max_drop: float, confidence: float,
          confirm_split: bool = False) -> dict[str, Any]:
    """What the rows can prove, before any recovery: per disagreement rate, the smallest budget the decision
    rows (at the ship's level) and the confirmation rows can show; and whether ``max_drop`` is in reach."""
    rates = ErrorRates(float(confidence))
    rows = [{"disagreement": r, "decision": round(reach(decision_rows, r, rates.ship), 3),
             "confirmation": round(reach(confirmation_rows, r, rates.confidence), 3)} for r in POWER_DISAGREEMENTS]
    worst = [max(r["decision"], r["confirmation"]) for r in rows]
    return {"decision_rows": int(decision_rows), "confirmation_rows": int(confirmation_rows),
            "max_drop_points": max_drop, "reach": rows, "confirm_split": bool(confirm_split),
            "in_reach": {f"{r['disagreement']:.0%}": bool(w <= max_drop) for r, w in zip(rows, worst)}}


def power_words(p: dict[str, Any]) -> str:
    """One line: what the rows can show, and what to do when the asked budget is out of reach."""
    parts = [f"{r['disagreement']:.0%} of rows: {max(r['decision'], r['confirmation']):.2f} points" for r in p["reach"]]
    line = (f"power: {p['decision_rows']} decision and {p['confirmation_rows']} confirmation rows can show, for an "
            f"artifact as accurate as dense that disagrees with it on " + ", on ".join(parts))
    if not any(p["in_reach"].values()):
        more = "more decision rows (a larger --eval-split)" if p.get("confirm_split") else \
            "a --confirm-split (e.g. test), more rows (--eval-max-examples)"
        line += (f"; a budget of {points_word(p['max_drop_points'])} is OUT OF REACH even at "
                 f"{POWER_DISAGREEMENTS[0]:.0%} disagreement: only an artifact that disagrees with dense on fewer rows "
                 f"can pass; give {more}, or a larger budget")
    elif not all(p["in_reach"].values()):
        line += (f"; at {points_word(p['max_drop_points'])} only artifacts that disagree with dense on fewer rows "
                 "can pass")
    return line
#: pruned variants the recommendation chooses among (fp16 is for GPUs, timed elsewhere)
CANDIDATE_VARIANTS = ("optimized", "int8", "fp32")
#: the variant recommended when there is no accuracy budget to decide on
DEFAULT_RECOMMENDED = "optimized"


def split_eval(eval_data, confirm_data=None, fraction: float = DEFAULT_CONFIRM_FRACTION, seed: int = 0):
    """(decision rows, confirmation rows, how) from the evaluation split and an optional confirm split."""
    if confirm_data is not None:
        if len(confirm_data) == 0:
            raise CahpError("the confirmation split has no rows")
        return eval_data, confirm_data, f"split {confirm_data.split!r}"
    decide, hold = split_rows(len(eval_data), fraction, seed)
    if len(hold) < 10:
        raise CahpError(f"holding out {fraction:.0%} of {len(eval_data)} evaluation rows leaves {len(hold)} to "
                        "confirm on; give more rows or a --confirm-split")
    how = f"a held-out {len(hold) / len(eval_data):.0%} of {eval_data.split!r} (seed {seed})"
    return eval_data.subset(decide), eval_data.subset(hold), how


def rows_fingerprint(data) -> str:
    """A hash of the rows themselves (texts, pairs, labels): subsets of one split differ by it."""
    from cahp_deploy.hashing import sha256_json

    return sha256_json({"texts": data.texts, "pairs": data.pairs, "labels": np.asarray(data.labels).tolist()})


def bits(mask) -> str:
    """Per-row correctness as a compact '0101' string (what candidate records store)."""
    return "".join("1" if b else "0" for b in np.asarray(mask, dtype=bool))


def from_bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def ort_correct(artifact_dir: Path, variant: str, batches, labels, threads: int | None = None) -> np.ndarray:
    """Per-row correctness of one variant of an artifact through ONNX Runtime (CPU), on ``batches``
    (:func:`cahp_deploy.bench.accuracy.encode` of the rows whose ``labels`` are given)."""
    from cahp_deploy.bench.accuracy import predict
    from cahp_deploy.export.manifest import variant_path
    from cahp_deploy.onnx_runtime import session as ort_session

    session = ort_session(variant_path(artifact_dir, variant), threads=int(threads) if threads else None)
    return correct(predict(session, batches, len(labels)), labels)


def _latency(report: dict[str, Any], artifact: str, variant: str, shape: str) -> float | None:
    for c in report.get("cells", []):
        if c.get("mode") == "grid" and c["artifact"] == artifact and c["variant"] == variant \
                and f"{c['batch']}x{c['seq']}" == shape:
            return c.get("p50_ms")
    return None


def headline_shape(report: dict[str, Any]) -> str:
    """The shape a recommendation is timed at: the largest batch at the longest timed sequence."""
    grid = [(c["batch"], c["seq"]) for c in report.get("cells", []) if c.get("mode") == "grid"]
    if not grid:
        raise CahpError("the bench report has no timed grid cell to choose a variant by")
    b, s = max(grid, key=lambda bs: (bs[1], bs[0]))
    return f"{b}x{s}"


def ship(pruned: dict[str, dict[str, Any]], dense_int8: dict[str, Any] | None, max_drop: float | None) -> dict[str, Any]:
    """What the run ships: the fastest measured artifact within the budget, chosen by a fixed sequence.

    Returns ``{"artifact": "pruned" | "dense" | None, "variant", "recommended", "why", "tested"}``:
    ``recommended`` is the pruned variant its manifest names, ``tested`` every artifact judged, in order.

    The sequence: the pruned model's fp32-exact graph (``optimized``: the model the search passed),
    then every timed artifact *faster* than it (the pruned INT8, dense INT8), slowest first, each
    judged by its decision bound; the first miss ends it, and the last artifact that passed is
    shipped. Ordering by measured latency (which no label touches) and stopping at the first miss
    keeps the chance of a false pass at one test's level, however many artifacts are compared; taking
    the fastest of all that pass would not (the winner's curse). Slower artifacts are never shipped, so
    they are not tested.
    """
    timed = {(PRUNED, v): r for v, r in pruned.items() if r.get("p50_ms") is not None}
    if dense_int8 is not None and dense_int8.get("p50_ms") is not None:
        timed[(DENSE, "int8")] = dense_int8
    pruned_timed = [key for key in timed if key[0] == PRUNED]
    if not pruned_timed:
        return {"artifact": None, "variant": None, "recommended": None, "tested": [],
                "why": "no pruned variant was timed at the headline shape"}
    first = (PRUNED, DEFAULT_RECOMMENDED) if (PRUNED, DEFAULT_RECOMMENDED) in timed else \
        max(pruned_timed, key=lambda key: timed[key]["p50_ms"])
    if max_drop is None:
        return {"artifact": PRUNED, "variant": first[1], "recommended": first[1], "tested": [],
                "why": "no accuracy budget: the fp32-exact optimized graph"}
    faster = sorted((key for key in timed if timed[key]["p50_ms"] < timed[first]["p50_ms"]),
                    key=lambda key: -timed[key]["p50_ms"])
    tested, passed = [], []
    for key in [first, *faster]:
        r = timed[key]
        ok = r["decision"]["upper"] <= max_drop + 1e-9
        tested.append({"artifact": key[0], "variant": key[1], "p50_ms": r["p50_ms"],
                       "upper": r["decision"]["upper"], "passed": ok})
        if not ok:
            break
        passed.append(key)
    steps = ", ".join(f"{t['artifact']} {t['variant']} {t['p50_ms']:.1f} ms "
                      f"{'passes' if t['passed'] else 'misses'} (bound {t['upper']:.2f})" for t in tested)
    if not passed:
        return {"artifact": None, "variant": None, "recommended": None, "tested": tested,
                "why": f"the pruned model's `{first[1]}` graph misses the budget of {points_word(max_drop)} on the decision rows "
                       f"(upper bound {timed[first]['decision']['upper']:.2f})"}
    artifact, variant = passed[-1]
    recommended = [v for a, v in passed if a == PRUNED][-1]
    return {"artifact": artifact, "variant": variant, "recommended": recommended, "tested": tested,
            "why": f"fastest measured artifact within {points_word(max_drop)} on the decision rows, judged in order of "
                   f"measured latency until the first miss: {steps}"}


def confirm(dense_art: Path, pruned_art: Path, report_dir: Path, decision, confirmation, how: str,
            max_drop: float | None, out_file: Path, confidence: float = DEFAULT_CONFIDENCE,
            threads: int | None = None, max_length: int = 128) -> dict[str, Any]:
    """Measure, choose and confirm (see the module docstring); write ``out_file``, the one record of the
    choice (:mod:`cahp_deploy.shipped` reads it for `predict` and the handoff). Every row is scored at ``max_length``, the length the artifact
    serves. Returns the record."""
    from cahp_deploy.export import int8_mac_share, load_manifest

    report = json.loads((Path(report_dir) / "report.json").read_text())
    shape = headline_shape(report)
    names = {a["path"]: a["name"] for a in report.get("artifacts", [])}
    dense_name = names.get(str(dense_art)) or next(a["name"] for a in report["artifacts"] if a.get("baseline"))
    pruned_name = names.get(str(pruned_art)) or next(a["name"] for a in report["artifacts"] if not a.get("baseline"))
    dense_manifest, pruned_manifest = load_manifest(dense_art), load_manifest(pruned_art)

    from transformers import AutoTokenizer

    from cahp_deploy.bench.accuracy import encode

    # Both artifacts come from one fine-tuned model and share its tokenizer (bench checks it):
    # each row set is tokenized once for every session.
    tokenizer = AutoTokenizer.from_pretrained(str(dense_art))
    rows = {"decision": decision, "confirmation": confirmation}
    batches = {part: encode(tokenizer, data, max_length) for part, data in rows.items()
               if not (part == "confirmation" and confirmation is decision)}

    def both(art: Path, variant: str) -> dict[str, np.ndarray]:
        """Correctness on the decision and the confirmation rows (measured once when they are the same rows)."""
        d = ort_correct(art, variant, batches["decision"], decision.labels, threads)
        return {"decision": d, "confirmation": d if confirmation is decision
                else ort_correct(art, variant, batches["confirmation"], confirmation.labels, threads)}

    ref = both(dense_art, "fp32")
    dense_p50 = _latency(report, dense_name, "fp32", shape)
    dense_int8_p50 = _latency(report, dense_name, "int8", shape)

    rates = ErrorRates(float(confidence))

    def measure(art: Path, name: str, variant: str, manifest: dict) -> dict[str, Any]:
        got = both(art, variant)
        p50 = _latency(report, name, variant, shape)
        return {
            "int8_mac_share": int8_mac_share(manifest, variant),
            # decided on at the shipping sequence's share of the run's error rate
            "decision": paired_drop(ref["decision"], got["decision"], rates.ship).to_dict(),
            "confirmation": paired_drop(ref["confirmation"], got["confirmation"], confidence).to_dict(),
            "p50_ms": p50,
            "speedup_vs_dense_fp32": None if not (p50 and dense_p50) else dense_p50 / p50,
            "speedup_vs_dense_int8": None if not (p50 and dense_int8_p50) else dense_int8_p50 / p50,
        }

    pruned = {v: measure(pruned_art, pruned_name, v, pruned_manifest) for v in CANDIDATE_VARIANTS
              if v in (pruned_manifest.get("variants") or {}) and _latency(report, pruned_name, v, shape) is not None}
    dense_int8 = measure(dense_art, dense_name, "int8", dense_manifest) if dense_int8_p50 is not None \
        and "int8" in (dense_manifest.get("variants") or {}) else None
    shipping = ship(pruned, dense_int8, max_drop)
    shipped = dense_int8 if shipping["artifact"] == DENSE else pruned.get(shipping["variant"]) \
        if shipping["artifact"] == PRUNED else None
    recommended, why, confirmed = settle(shipping, shipped, max_drop)
    record = {
        "shape": shape, "confidence": confidence, "max_drop_points": max_drop, "max_length": int(max_length),
        "error_rates": rates.to_dict() if max_drop is not None else None,
        "decision_rows": {"num_examples": len(decision), "split": decision.split},
        "confirmation_rows": {"num_examples": len(confirmation), "split": confirmation.split, "how": how},
        "reference": "dense fp32 artifact (model.onnx), ONNX Runtime",
        "dense_fp32_p50_ms": dense_p50, "dense_int8": dense_int8, "variants": pruned,
        "recommended": recommended, "why": why,
        "shipped": {**shipping, "path": None if shipping["artifact"] is None
                    else (DENSE_ARTIFACT_DIR if shipping["artifact"] == DENSE else PRUNED_ARTIFACT_DIR)},
        "confirmed": confirmed,
        "dense_int8_faster": None if shipping["artifact"] != PRUNED or dense_int8 is None
        else bool(dense_int8["p50_ms"] < shipped["p50_ms"]),
        # the artifacts this record describes, as export wrote them: the choice lives here, not in them
        "artifacts": artifact_records(Path(out_file).parent, dense_art, pruned_art),
    }
    with atomic_file(out_file, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    plot_pareto(record, Path(out_file).with_name(PARETO_PLOT))
    return record


def settle(shipping: dict[str, Any], shipped: dict[str, Any] | None, max_drop: float | None) -> tuple[str | None, str, bool | None]:
    """(recommended variant, why, confirmed) once the shipped artifact was measured on the confirmation rows.

    A promise the unseen rows do not back recommends nothing: ``predict`` then warns, and `run` exits
    non-zero. ``confirmed`` is None when there was no budget to confirm (or nothing was shipped).
    """
    recommended, why = shipping.pop("recommended", None), shipping["why"]
    confirmed = None if shipped is None or max_drop is None \
        else bool(shipped["confirmation"]["upper"] <= max_drop + 1e-9)
    if confirmed is False:
        return None, f"NOT confirmed on rows no decision saw ({why})", False
    return recommended, why, confirmed


def plot_pareto(record: dict[str, Any], path: Path) -> None:
    """Accuracy change (confirmation rows, with its interval) vs measured speedup over dense fp32 of
    every measured artifact: the shipped one starred, the budget drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [("dense fp32", 1.0, {"drop": 0.0, "low": 0.0, "high": 0.0}, False)]
    shipped = record.get("shipped") or {"artifact": PRUNED, "variant": record.get("recommended")}
    if record.get("dense_int8") and record["dense_int8"].get("speedup_vs_dense_fp32"):
        points.append(("dense int8", record["dense_int8"]["speedup_vs_dense_fp32"],
                       record["dense_int8"]["confirmation"], shipped["artifact"] == DENSE))
    for v, r in record["variants"].items():
        if r.get("speedup_vs_dense_fp32"):
            points.append((f"pruned {v}", r["speedup_vs_dense_fp32"], r["confirmation"],
                           shipped["artifact"] == PRUNED and v == shipped["variant"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, x, d, shipped in points:
        y = d["drop"]
        ax.errorbar([x], [y], yerr=[[y - d["low"]], [d["high"] - y]], fmt="*" if shipped else "o",
                    ms=14 if shipped else 6, capsize=3, label=name + (" (shipped)" if shipped else ""))
    if record.get("max_drop_points") is not None:
        ax.axhline(record["max_drop_points"], color="tab:red", ls="--", lw=1,
                   label=f"budget: a drop of {record['max_drop_points']:g} points")
    ax.set_xlabel(f"measured speedup vs dense fp32 at {record['shape']}")
    ax.set_ylabel(f"accuracy drop vs dense, points ({record['confidence']:.0%} CI; positive is worse)")
    ax.set_title(f"confirmed on {record['confirmation_rows']['num_examples']} rows no decision used")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


__all__ = ["CONFIRM_FILE", "DEFAULT_CONFIRM_FRACTION", "DENSE", "EXIT_NOT_CONFIRMED", "ErrorRates", "PARETO_PLOT",
           "PRUNED", "default_confirm_fraction", "plot_pareto", "power", "power_words", "promise_of", "reach", "settle", "bits",
           "confirm", "from_bits", "headline_shape", "ort_correct", "rows_fingerprint", "ship",
           "split_eval"]
