"""The promise `run` makes, kept honest: decided on some rows, confirmed on rows the decision never saw.

A budget search that takes the first candidate whose *point estimate* clears the bar on ~1,000 rows
picks noise in its favour (paired standard error ~1.5 points there): measured, a run promised -0.8
points on SST-5 validation and lost 3.5 on test. So:

1. **Decision rows vs confirmation rows** (:func:`split_eval`): with ``--confirm-split`` the whole
   evaluation split decides and that split confirms; otherwise a seeded part of the evaluation split
   (``--confirm-fraction``, default 40%) is held out and never seen by any decision.
2. **Decisions on the upper confidence bound** of the paired drop (:mod:`cahp_deploy.paired`): the
   search's candidates, and here the choice of the shipped precision.
3. **The shipped artifact is measured, not estimated** (:func:`ship`): the pruned model's fp32-exact
   graph, then every benchmarked artifact faster than it (the pruned INT8, and dense INT8, the honest
   competitor), slowest first, each judged by the same rule on the decision rows; the first miss
   ends the sequence and the last artifact that passed is shipped (``confirm.json``'s ``shipped``;
   the pruned manifest's ``recommended`` names the pruned variant). When that is dense INT8, the
   summary says so first.
4. **Confirmation**: every variant's drop (and the dense INT8's) is measured again through ONNX Runtime
   on the confirmation rows and written, with its interval, to ``OUT/confirm.json``; summary.md says
   plainly when the confirmation misses the budget.

Accuracy here is ONNX Runtime's, on the very files a user deploys, against the dense *fp32* artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy.atomic import atomic_file
from cahp_deploy.errors import CahpError
from cahp_deploy.paired import DEFAULT_CONFIDENCE, correct, paired_drop, split_rows
from cahp_deploy.run.summary import points_word

CONFIRM_FILE = "confirm.json"
PARETO_PLOT = "pareto.png"
#: share of the evaluation split held out for confirmation when no --confirm-split is given
DEFAULT_CONFIRM_FRACTION = 0.4
#: pruned variants the recommendation chooses among (fp16 is for GPUs, timed elsewhere)
CANDIDATE_VARIANTS = ("optimized", "int8", "fp32")
#: the variant recommended when there is no accuracy budget to decide on
DEFAULT_RECOMMENDED = "optimized"


def decision_indices(n: int, fraction: float = DEFAULT_CONFIRM_FRACTION, seed: int = 0) -> list[int]:
    """Indices of the decision rows :func:`split_eval` keeps of ``n`` evaluation rows (export gates on them)."""
    return split_rows(n, fraction, seed)[0].tolist()


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
    import onnxruntime as ort

    from cahp_deploy.bench.accuracy import predict
    from cahp_deploy.exporters.manifest import variant_path

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(variant_path(artifact_dir, variant)), options, providers=["CPUExecutionProvider"])
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


DENSE, PRUNED = "dense", "pruned"


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
            threads: int | None = None) -> dict[str, Any]:
    """Measure, choose and confirm (see the module docstring); write ``out_file`` and the manifest's
    ``recommended``. Returns the record."""
    from cahp_deploy.exporters import int8_mac_share, load_manifest

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
    batches = {part: encode(tokenizer, data, 128) for part, data in rows.items()
               if not (part == "confirmation" and confirmation is decision)}

    def both(art: Path, variant: str) -> dict[str, np.ndarray]:
        """Correctness on the decision and the confirmation rows (measured once when they are the same rows)."""
        d = ort_correct(art, variant, batches["decision"], decision.labels, threads)
        return {"decision": d, "confirmation": d if confirmation is decision
                else ort_correct(art, variant, batches["confirmation"], confirmation.labels, threads)}

    ref = both(dense_art, "fp32")
    dense_p50 = _latency(report, dense_name, "fp32", shape)
    dense_int8_p50 = _latency(report, dense_name, "int8", shape)

    def measure(art: Path, name: str, variant: str, manifest: dict) -> dict[str, Any]:
        got = both(art, variant)
        p50 = _latency(report, name, variant, shape)
        return {
            "int8_mac_share": int8_mac_share(manifest, variant),
            "decision": paired_drop(ref["decision"], got["decision"], confidence).to_dict(),
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
    recommended, why = shipping.pop("recommended"), shipping["why"]
    shipped = dense_int8 if shipping["artifact"] == DENSE else pruned.get(shipping["variant"]) \
        if shipping["artifact"] == PRUNED else None
    record = {
        "shape": shape, "confidence": confidence, "max_drop_points": max_drop,
        "decision_rows": {"num_examples": len(decision), "split": decision.split},
        "confirmation_rows": {"num_examples": len(confirmation), "split": confirmation.split, "how": how},
        "reference": "dense fp32 artifact (model.onnx), ONNX Runtime",
        "dense_fp32_p50_ms": dense_p50, "dense_int8": dense_int8, "variants": pruned,
        "recommended": recommended, "why": why,
        "shipped": {**shipping, "path": None if shipping["artifact"] is None
                    else str(dense_art if shipping["artifact"] == DENSE else pruned_art)},
        "confirmed": None if shipped is None or max_drop is None
        else bool(shipped["confirmation"]["upper"] <= max_drop + 1e-9),
        "dense_int8_faster": None if shipping["artifact"] != PRUNED or dense_int8 is None
        else bool(dense_int8["p50_ms"] < shipped["p50_ms"]),
    }
    with atomic_file(out_file, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    plot_pareto(record, Path(out_file).with_name(PARETO_PLOT))
    _set_recommended(pruned_art, recommended, why)
    return record


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
        y = -d["drop"]
        ax.errorbar([x], [y], yerr=[[y + d["high"]], [-d["low"] - y]], fmt="*" if shipped else "o",
                    ms=14 if shipped else 6, capsize=3, label=name + (" (shipped)" if shipped else ""))
    if record.get("max_drop_points") is not None:
        ax.axhline(-record["max_drop_points"], color="tab:red", ls="--", lw=1,
                   label=f"budget: -{record['max_drop_points']:g} points")
    ax.set_xlabel(f"measured speedup vs dense fp32 at {record['shape']}")
    ax.set_ylabel(f"accuracy change, points ({record['confidence']:.0%} CI)")
    ax.set_title(f"confirmed on {record['confirmation_rows']['num_examples']} rows no decision used")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _set_recommended(artifact: Path, variant: str | None, why: str) -> None:
    """Record the verified variant in the artifact's manifest (the manifest hashes no file of its own)."""
    path = Path(artifact) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["recommended"] = variant
    manifest["recommended_why"] = why
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


__all__ = ["CONFIRM_FILE", "DEFAULT_CONFIRM_FRACTION", "DENSE", "PARETO_PLOT", "PRUNED", "plot_pareto", "bits",
           "confirm", "from_bits", "headline_shape", "decision_indices", "ort_correct", "rows_fingerprint", "ship",
           "split_eval"]
