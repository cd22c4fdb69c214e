"""The ``export`` stage: model dir (dense or pruned) -> verified ONNX artifact dir.

::

    check options, paths, data ──► load model (sdpa/eager) ──► model.onnx ──► parity vs PyTorch
        ──► [optimize: candidates, fused-head check, timing, choice] ──► model_optimized.onnx ──► parity
        ──► [int8 from the optimized graph: mixed-precision search on tuning rows] ──► gate on other rows
            (paired accuracy drop vs fp32 within --int8-max-accuracy-drop; or argmax agreement)
        ──► [fp16 from the fully fused graph] ──► parity on CPU (looser tolerance)
        ──► config.json, tokenizer, pruning.json, manifest.json (sha256 of every file)

Everything the user can get wrong is checked before the first export; everything is written into a
temporary sibling of ``out`` that replaces it only when every parity gate passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cahp_deploy import arch, onnx_runtime, schema
from cahp_deploy.atomic import atomic_dir, check_output_path
from cahp_deploy.errors import CahpError, Int8GateError
from cahp_deploy.export import fp16 as fp16_variant, onnx_export, optimize as ortopt, parity
from cahp_deploy.export.int8 import quantize as quant
from cahp_deploy.export.int8 import tuning as int8_tuning
from cahp_deploy.export.int8.gate import ACCURACY, INT8_MAX_ACCURACY_DROP, LOOKS, Int8Gate
from cahp_deploy.export.manifest import VARIANT_FILES, file_records, versions, write_manifest
from cahp_deploy.hashing import sha256_dir
from cahp_deploy.modeling import KEPT_HEADS_FIELD, load_classifier, load_config
from cahp_deploy.paired import DEFAULT_CONFIDENCE

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
#: --provider choices (ONNX Runtime names in :data:`cahp_deploy.onnx_runtime.PROVIDERS`)
PROVIDERS = ("cpu", "cuda")
#: random-input batches stored in the manifest for ``verify``'s smoke test (kept small)
_SMOKE_FEEDS = 2
#: the split INT8 tunes on when --data is given (never the split the agreement is reported on)
INT8_TUNING_SPLIT = "train"
#: random-token tuning set without --data: (batch, sequence) shapes, a seed apart from the parity inputs
INT8_RANDOM_TUNING_SHAPES: tuple[tuple[int, int], ...] = ((16, 16), (16, 32), (16, 64), (16, 128))


def resolve_int8_gate(max_accuracy_drop: float | None, min_agreement: float | None, rows: int | None = None,
                      confidence: float = DEFAULT_CONFIDENCE, gate_rows: int | None = None) -> tuple[Int8Gate, str | None]:
    """The INT8 gate from the user's options, and a note when it is not the one they would expect.

    ``rows``: the fewer of the labelled tuning and gate rows (None: no labelled data); ``gate_rows``:
    how many rows the gate judges (the tuning search predicts the bound there). The accuracy
    gate is the default; the agreement gate when asked for, or the only one random tokens allow
    (at most :data:`parity.INT8_MIN_AGREEMENT_RANDOM`). When the rows are too few for the accuracy
    gate to ever pass (:meth:`Int8Gate.rows_needed`), the default falls back to the agreement gate
    (:data:`parity.INT8_MIN_AGREEMENT`) and says so; an explicit accuracy gate is an error.
    """
    if max_accuracy_drop is not None and min_agreement is not None:
        raise CahpError("--int8-max-accuracy-drop and --int8-min-agreement are two different INT8 gates; give one")
    if min_agreement is not None:
        gate = Int8Gate.agreement(min_agreement)
        if rows is None:
            return Int8Gate.agreement(min(gate.min_agreement, parity.INT8_MIN_AGREEMENT_RANDOM)), None
        return gate, None
    gate = Int8Gate.accuracy(INT8_MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop, confidence,
                             gate_rows)
    if rows is None:
        if max_accuracy_drop is not None:
            raise CahpError("--int8-max-accuracy-drop needs labelled rows to measure accuracy on; give --data "
                            "(or --int8-min-agreement for an agreement gate on random tokens)")
        return Int8Gate.agreement(parity.INT8_MIN_AGREEMENT_RANDOM), None
    if rows < gate.rows_needed():
        why = (f"{rows} labelled rows cannot bound an INT8 accuracy drop of {gate.max_drop:g} points at "
               f"{gate.confidence:.0%} over the gate's looks (that needs >= {gate.rows_needed()} tuning and gate rows)")
        if max_accuracy_drop is not None:
            raise CahpError(f"{why}; give more rows, a larger --int8-max-accuracy-drop, or --int8-min-agreement")
        return Int8Gate.agreement(parity.INT8_MIN_AGREEMENT), f"{why}: the agreement gate was used instead"
    return gate, None


def _check_options(quantize, per_channel, fp16, opset, provider,
                   int8_tuning_examples=int8_tuning.TUNING_EXAMPLES, int8_tuning_margin=None) -> None:
    if not isinstance(int8_tuning_examples, int) or int8_tuning_examples < 8:
        raise CahpError(f"--int8-tuning-examples {int8_tuning_examples} must be an integer >= 8 (default {int8_tuning.TUNING_EXAMPLES})")
    if int8_tuning_margin is not None and not 0.0 <= float(int8_tuning_margin) < 100.0:
        raise CahpError(f"--int8-tuning-margin {int8_tuning_margin} must be >= 0 (points for the accuracy gate, "
                        "a fraction for the agreement gate)")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise CahpError(f"--quantize {quantize!r} is not supported; choose from {', '.join(QUANTIZE_CHOICES)}")
    if per_channel and quantize is None:
        raise CahpError("--per-channel only applies to quantization; add --quantize int8 or drop --per-channel")
    if provider not in PROVIDERS:
        raise CahpError(f"--provider {provider!r} is not supported; choose from {', '.join(PROVIDERS)}")
    if opset is not None:
        hi = onnx_export.max_opset()
        if not isinstance(opset, int) or not onnx_export.MIN_OPSET <= opset <= hi:
            raise CahpError(
                f"--opset {opset} cannot be exported (torch/Optimum support {onnx_export.MIN_OPSET}..{hi}); pick one in that range"
            )
    if fp16:  # the fp16 graph is checked on --provider, which must be there (export alone need not run on it)
        onnx_runtime.check_provider(provider, PROVIDERS, purpose=fp16_variant.FP16_CHECK)


def _gate_close(variant: str, result: dict, atol: float, where: str) -> None:
    if result["max_abs_diff"] > atol or result["argmax_mismatches"]:
        raise CahpError(
            f"parity check failed for {variant} on {where}: max |logit diff| {result['max_abs_diff']:.2e} "
            f"(limit {atol:g}), {result['argmax_mismatches']} argmax mismatches of {result['num_examples']}; "
            "nothing was written"
        )


def _int8_gate_failure(result: dict, where: str, tuned: dict) -> str | None:
    """What the INT8 gate's miss looked like, in one line; None when it passed."""
    if result["passed"]:
        return None
    if result["kind"] == ACCURACY:
        pd = result["paired_drop"]
        got = (f"accuracy drop {pd['drop']:+.2f} points, {100 * pd['confidence']:g}% upper bound {pd['upper']:+.2f} "
               f"({pd['ref_only']} rows only fp32 gets right, {pd['new_only']} only INT8)")
    else:
        got = f"argmax agreement {result['agreement']:.2%}"
    return f"INT8 gate failed on {where}: {got}; the gate is {result['gate']} (tuned to {tuned['figure']} on {tuned['on']})"


def _attempt(rec: dict, held_out: dict, gate: Int8Gate, graph: str) -> dict:
    keys = ("agreement", "drop", "drop_upper")
    out = {"graph": graph, "target": rec["target"], "tuning": {k: rec["tuning"][k] for k in keys if k in rec["tuning"]},
           "held_out": {k: held_out[k] for k in keys if k in held_out}, "passed": held_out["passed"],
           "num_fp32": len(rec["excluded_nodes"])}
    if gate.kind == ACCURACY:
        out["confidence"] = round(gate.confidence, 6)
    return out


def _tune_and_check_int8(check, source: Path, dst: Path, feeds, labels, tune_record: dict | None, per_channel, margin,
                         say, keep_failed: bool = False, smooth_alpha: float | None = int8_tuning.SEARCH_SMOOTH_ALPHA) -> tuple:
    """Tune INT8 on the tuning rows, then judge it with the gate on the held-out rows: up to three looks.

    The accuracy gate first judges the graph with every candidate INT8 (the fastest; the search's
    prediction assumes a zero drop and cannot see that INT8 may gain accuracy on the gate rows). On a
    miss, the search runs and its graph is judged; the search stops at the first node set that
    clears its target on the tuning rows, so the held-out figure comes out worse. Under the accuracy
    gate each miss also sets the logit MSE the next search must reach on the tuning rows
    (:meth:`Int8Gate.error_ceiling`: the share of the error the miss says must go). When the searched
    graph misses too and the user left the margin at its default, the search runs once more: under the
    tighter ceiling (accuracy gate), or with its target moved by the observed gap (agreement gate). Each look judges at its own confidence (:meth:`Int8Gate.look`:
    the looks share the error rate), and the manifest records every look. The agreement gate has no
    first look.

    When the last look misses too: :class:`Int8GateError`, or, with ``keep_failed``, the last look's
    graph stays in ``dst`` and ``rec["gate_failed"]`` says why (``run`` under a budget judges it
    against dense on the decision rows, like every other graph); with ``keep_failed``, a retune whose
    target no graph short of fp32 meets keeps the previous look's graph the same way.
    """
    gate = check.gate
    attempts: list[dict] = []
    looks = [0, 1, 2] if gate.kind == ACCURACY else [1, 2]
    if margin is not None:  # the user chose the margin: no retry behind their back
        looks = looks[:-1]
    measured_granularity = None
    ceiling = None
    previous = None
    for k, look in enumerate(looks):
        g = gate.look(look)
        full = look == 0
        if full:
            say("int8: every MatMul in INT8 first")
        try:
            tuned = int8_tuning.tune_int8(source, dst, feeds, g, labels=labels, per_channel=per_channel,
                                          margin=margin, max_logit_mse=ceiling, smooth_alpha=smooth_alpha,
                                          say=say, search_nodes=not full)
        except CahpError as e:
            if not (keep_failed and previous is not None):
                raise
            tuned, rec, result, failure = previous  # dst still holds the previous look's graph
            attempts.append({"graph": LOOKS[look], "passed": False, "unreachable": str(e)})
            rec["attempts"] = attempts
            rec["gate_failed"] = f"{failure}; the {LOOKS[look]} graph: {e}"
            say(f"int8: {rec['gate_failed']}; kept, marked failed, for the accuracy budget to judge against dense")
            return tuned, rec, result
        rec = {**tuned.record, "data": tune_record}
        if measured_granularity is not None:  # the granularity was measured by the first look
            rec.update(measured_granularity)
        result = check.check("int8", onnx_runtime.session(dst), g)
        held_out = result["gate"]
        attempts.append(_attempt(rec, held_out, g, LOOKS[look]))
        figure = (f"a predicted gate-row bound of {g.predicted_upper(rec['tuning']):+.2f} points"
                  if gate.kind == ACCURACY else f"agreement {rec['tuning']['agreement']:.2%}")
        failure = _int8_gate_failure(held_out, (tune_record or {}).get("report_on") or check.gate_rows(),
                                     {"figure": figure, "on": (tune_record or {}).get("on")})
        if held_out["passed"] or k == len(looks) - 1:
            rec["attempts"] = attempts
            if failure is not None and not keep_failed:
                raise Int8GateError(f"{failure}; nothing was written (loosen the gate knowingly, or ship the "
                                    "optimized fp32 model)")
            if failure is not None:
                rec["gate_failed"] = failure
                say(f"int8: {failure}; kept, marked failed, for the accuracy budget to judge against dense")
            return tuned, rec, result
        if gate.kind == ACCURACY:
            nxt = gate.look(looks[k + 1]).error_ceiling(rec["tuning"], held_out)
            ceiling = nxt if ceiling is None else min(ceiling, nxt)
            previous = (tuned, rec, result, failure)
        if full:
            measured_granularity = {key: rec[key] for key in ("granularity", "per_channel_chosen_by")}
            per_channel = tuned.per_channel
            say("int8: every MatMul in INT8 missed the gate rows; searching for the nodes to smooth or keep fp32"
                + ("" if ceiling is None else f" (tuning logit MSE <= {ceiling:.4g})"))
        elif gate.kind == ACCURACY:
            say(f"int8: the held-out rows missed the gate; retuning to a tuning logit MSE <= {ceiling:.4g}")
        else:
            margin = g.retune_margin(rec["target"], rec["tuning"], held_out)
            say(f"int8: the held-out rows missed the gate; retuning with margin {margin:.4g}")
    raise AssertionError("unreachable: the last look returns or raises")


class _Parity:
    """Reference logits computed once, then every variant's session checked against them."""

    def __init__(self, model, tokenizer, config, input_names, data, gate: Int8Gate | None, max_length: int):
        self.gate = gate
        self.random_feeds = parity.random_feeds(input_names, config)
        self.random_ref = parity.torch_logits(model, self.random_feeds)
        self.data = data
        self.data_feeds, self.labels, self.data_ref = [], None, None
        if data is not None:
            self.data_feeds, self.labels = parity.data_feeds(tokenizer, data, input_names, config, max_length=max_length)
            self.data_ref = parity.torch_logits(model, self.data_feeds)

    def gate_rows(self) -> str:
        return f"{self.data.source} [{self.data.split}]" if self.data is not None else "random tokens (no --data given)"

    def run(self, session) -> tuple[np.ndarray, np.ndarray | None]:
        rnd = parity.ort_logits(session, self.random_feeds)
        dat = parity.ort_logits(session, self.data_feeds) if self.data is not None else None
        return rnd, dat

    def check(self, variant: str, session, gate: Int8Gate | None = None) -> dict:
        """``gate``: the INT8 gate of this look (default: the export's)."""
        rnd, dat = self.run(session)
        out: dict = {"reference": "pytorch fp32"}
        out["random"] = parity.compare(self.random_ref, rnd,
                                       tie_margin=2 * parity.FP16_ATOL if variant == "fp16" else 0.0)
        out["data"] = None
        if dat is not None:
            out["data"] = parity.compare(self.data_ref, dat,
                                         tie_margin=2 * parity.FP16_ATOL if variant == "fp16" else 0.0)
            out["data"]["accuracy"] = parity.accuracy(dat, self.labels)
            out["data"]["reference_accuracy"] = parity.accuracy(self.data_ref, self.labels)
        head = out["data"] or out["random"]
        out["on"] = "data" if out["data"] else "random_tokens"
        out["max_abs_diff"] = max(out["random"]["max_abs_diff"], (out["data"] or {}).get("max_abs_diff", 0.0))
        out["argmax_agreement"] = head["argmax_agreement"]
        if variant in ("fp32", "optimized"):
            out["atol"] = parity.FP32_ATOL
            _gate_close(variant, out["random"], parity.FP32_ATOL, "random inputs")
            if out["data"]:
                _gate_close(variant, out["data"], parity.FP32_ATOL, f"{self.data.source} [{self.data.split}]")
        elif variant == "fp16":
            out["atol"] = parity.FP16_ATOL
            out["tie_margin"] = 2 * parity.FP16_ATOL
            _gate_close(variant, out["random"], parity.FP16_ATOL, "random inputs")
            if out["data"]:
                _gate_close(variant, out["data"], parity.FP16_ATOL, f"{self.data.source} [{self.data.split}]")
        elif variant == "int8":  # judged by the caller (_tune_and_check_int8): a miss may be retuned
            if not out["data"]:
                out["note"] = "no --data given: agreement measured on random tokens, not on real data"
            labels = self.labels if dat is not None else None
            logits, ref = (dat, self.data_ref) if dat is not None else (rnd, self.random_ref)
            out["gate"] = {**(gate or self.gate).judge(logits, ref, labels), "on": self.gate_rows(), "reference": "pytorch fp32"}
            out["passed"] = out["gate"]["passed"]
            return out
        out["passed"] = True
        return out

    def smoke(self) -> dict:
        feeds = self.random_feeds[:_SMOKE_FEEDS]
        n = sum(len(next(iter(f.values()))) for f in feeds)
        return {
            "inputs": [{k: v.tolist() for k, v in f.items()} for f in feeds],
            "logits": self.random_ref[:n].tolist(),
        }


def _int8_random_shapes(config) -> tuple[tuple[int, int], ...]:
    """:data:`INT8_RANDOM_TUNING_SHAPES` capped at the model's usable positions."""
    return arch.clamp_shapes(INT8_RANDOM_TUNING_SHAPES, arch.max_sequence_length(config))


def _int8_rows(data, split: str, columns: dict, labelled, num_labels: int, examples: int, config,
               tuning_split: str = INT8_TUNING_SPLIT):
    """(tuning rows, report rows, record): INT8 tunes on rows the agreement is never reported on.

    With a train split (other than ``split``) in ``data``: ``examples`` random rows of it (seed 0),
    reported on ``split``. Otherwise (one file, no train split, or ``split`` is train): the first half
    of ``split`` (at most ``examples`` rows), reported on the second half. Without data: None (random
    tokens at :func:`_int8_random_shapes` of ``config``).
    """
    if labelled is None:
        shapes = [list(s) for s in _int8_random_shapes(config)]
        return None, None, {"on": "random tokens (no --data given)", "shapes": shapes, "seed": 1}
    from cahp_deploy.data import check_labels, load_labelled

    why = None
    train = None
    if split == tuning_split:
        why = f"--split is {tuning_split}"
    else:
        try:
            train = load_labelled(data, tuning_split, **columns)
        except CahpError as e:
            why = f"no usable {tuning_split} split ({str(e)[:160]})"
        if train is not None and (train.split == labelled.split or train.file_hashes == labelled.file_hashes):
            train, why = None, "the data is a single split"
    if train is not None:
        check_labels(train, num_labels)
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(len(train), size=min(examples, len(train)), replace=False))
        record = {"on": f"{train.source} [{train.split}]", "split": train.split, "rows": f"{len(idx)} random rows of {len(train)} (seed 0)",
                  "num_examples": int(len(idx)), "report_on": f"{labelled.source} [{labelled.split}]"}
        return train.subset(idx), labelled, record
    half = len(labelled) // 2
    if half < 2:
        raise CahpError(
            f"INT8 tuning needs a {tuning_split} split in --data or >= 4 rows in split {split!r} "
            f"(it has {len(labelled)}): it tunes on one half and reports on the other"
        )
    tune = labelled.subset(range(min(examples, half)))
    report = labelled.subset(range(half, len(labelled)))
    record = {"on": f"{labelled.source} [{labelled.split}] first half", "split": labelled.split,
              "rows": f"rows 0..{len(tune) - 1} of {len(labelled)} (first half, {why})", "num_examples": len(tune),
              "report_on": f"{labelled.source} [{labelled.split}] second half (rows {half}..{len(labelled) - 1})"}
    return tune, report, record


def _int8_tuning_feeds(tune_rows, tokenizer, input_names, config, max_length: int) -> tuple[list, np.ndarray | None]:
    """Tuning batches and their labels (None for random tokens)."""
    if tune_rows is None:
        return parity.random_feeds(input_names, config, seed=1, shapes=_int8_random_shapes(config)), None
    return parity.data_feeds(tokenizer, tune_rows, input_names, config, limit=None, max_length=max_length)


def _time_int8(source: Path, int8: Path, vocab: int, max_seq: int) -> dict:
    """INT8 vs the graph it was quantized from, interleaved (as the optimization choice is timed).

    Recorded, not gated: with many nodes kept fp32 INT8 can lose to fp32 (each quantized MatMul adds
    a dynamic quantization of its input), and the manifest should say so rather than imply a speedup.
    """
    timings = ortopt.time_graphs({"source": source, "int8": int8}, shapes=ortopt.timing_shapes(max_seq),
                                 vocab=vocab, budget_s=4.0)
    speedup = {shape: round(timings["source"][shape] / timings["int8"][shape], 3) for shape in timings["int8"]}
    if max(speedup.values()) < 1.0:
        log.warning("INT8 is slower than its fp32 source at every timed shape (%s); model_optimized.onnx is the faster choice", speedup)
    return {"timings_ms": timings, "speedup_vs_source": speedup,
            "timing_note": "median ms, interleaved, ONNX Runtime default threads, on the exporting machine"}


def _read_pruning(model_dir: Path) -> dict | None:
    p = model_dir / "pruning.json"
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
    except ValueError as e:
        raise CahpError(f"{p} is not valid JSON ({e}); re-run `cahp-deploy prune`") from e
    schema.check_schema(record, schema.PRUNING, str(p))
    return record


def _qat(model_dir: Path) -> dict | None:
    """The quantization-aware recovery that made ``model_dir``, if any (its ``recovery.json``): INT8
    then uses the weight granularity the model was trained for."""
    from cahp_deploy.recovery.stage import RECOVERY_FILE

    p = model_dir / RECOVERY_FILE
    try:
        params = json.loads(p.read_text()).get("params", {}) if p.is_file() else {}
    except ValueError:
        return None
    return {"per_channel": bool(params.get("qat_per_channel", True))} if params.get("qat") else None


def _qat_match(model, check: _Parity, int8: Path, per_channel: bool, excluded: int) -> dict:
    """How closely the INT8 graph computes what the quantization-aware model computed in PyTorch
    (the same rounding simulated, :mod:`cahp_deploy.recovery.qat`), next to how far it is from fp32."""
    from cahp_deploy.recovery.qat import simulated_int8

    feeds = check.data_feeds or check.random_feeds
    with simulated_int8(model, per_channel):
        simulated = parity.torch_logits(model, feeds)
    got = parity.ort_logits(onnx_runtime.session(int8), feeds)
    fp32 = check.data_ref if check.data_feeds else check.random_ref
    keep = ("num_examples", "max_abs_diff", "argmax_agreement")
    return {
        "vs_simulated_int8": {k: parity.compare(simulated, got)[k] for k in keep}
        | {"mean_abs_diff": float(np.abs(simulated - got).mean())},
        "vs_fp32": {k: parity.compare(fp32, got)[k] for k in keep} | {"mean_abs_diff": float(np.abs(fp32 - got).mean())},
        "note": "PyTorch with every Linear fake-quantized vs the INT8 graph"
                + (f"; {excluded} MatMuls stayed fp32 in the graph, so the two differ there" if excluded else ""),
    }


def _neuron_fields(config, n_layers: int) -> dict:
    """FFN neurons in the manifest: kept per layer (null when the FFN is dense), counts."""
    kept = getattr(config, arch.KEPT_NEURONS_FIELD, None)
    total = n_layers * arch.intermediate_size(config)
    return {
        "kept_neurons": kept,
        "neurons_per_layer": None if kept is None else [len(k) for k in kept],
        "num_neurons_kept": total if kept is None else int(sum(len(k) for k in kept)),
        "num_neurons_total": total,
    }


def export(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    optimize: bool = True,
    quantize: str | None = None,
    per_channel: bool | None = None,
    fp16: bool = False,
    opset: int | None = None,
    data: str | os.PathLike | None = None,
    split: str = "validation",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    force: bool = False,
    provider: str = "cpu",
    measure: bool = True,
    int8_max_accuracy_drop: float | None = None,
    int8_min_agreement: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    int8_tuning_examples: int = int8_tuning.TUNING_EXAMPLES,
    int8_tuning_margin: float | None = None,
    max_examples: int | None = None,
    rows: Sequence[int] | None = None,
    int8_smooth: float | None = None,
    max_length: int | None = None,
    int8_tuning_split: str = INT8_TUNING_SPLIT,
    exporter: str = "auto",
    keep_failed_int8: bool = False,
) -> Path:
    """Export ``model_dir`` (dense or pruned classifier) to a parity-checked ONNX artifact dir ``out``.

    Parameters
    ----------
    optimize : also write ``model_optimized.onnx`` (ORT fusions chosen by measurement, see
        :mod:`cahp_deploy.export.optimize`).
    quantize : ``"int8"`` writes ``model_int8.onnx``: dynamic quantization of the optimized graph's
        weight MatMuls, the most sensitive kept in fp32 until the agreement gate holds on a tuning
        set (see :mod:`cahp_deploy.export.int8.tuning`).
    per_channel : INT8 weight scales per output channel (True) or per tensor (False); None measures
        both on the tuning set and keeps the better.
    fp16 : write ``model_fp16.onnx`` (for CUDA; fp32 inputs/outputs), checked on ``provider``.
    opset : ONNX opset; Optimum's default for the architecture when None.
    data, split, text_column, text_pair_column, label_column : labelled data for parity on real
        examples (and the INT8 agreement gate); random inputs only when None.
    provider : the device the artifact is made for: ``cpu`` (timing picks the fusions) or ``cuda``.
    measure : time the optimization candidates (a few seconds); False uses the provider default.
    int8_max_accuracy_drop : the INT8 gate (default with labelled data, 0.5 points): the one-sided
        ``confidence`` upper bound of INT8's paired accuracy drop vs fp32 on the gate rows must be
        at most this many points (see :mod:`cahp_deploy.export.int8.gate`).
    int8_min_agreement : the other gate: argmax agreement with fp32 at least this (for identical
        outputs; the only gate without data, where it is at most 0.90 on random tokens).
    int8_tuning_examples : rows INT8 tunes on: random rows of ``data``'s train split, else the first
        half of ``split`` (then the gate is checked on the second half); random tokens without data.
    int8_tuning_margin : the search's target on the tuning rows is the gate tightened by this
        (points, or a fraction of agreement); None: 0 for the accuracy gate (its upper bound is the
        margin), two binomial standard errors for the agreement gate.
    max_examples : check parity (and the INT8 gate) on the first N rows of ``split`` only (None: all;
        the rows ``bench --max-examples`` scores).
    int8_smooth : SmoothQuant-style smoothing of every MatMul input before INT8, with this alpha
        (:mod:`cahp_deploy.export.int8.smoothing`; None: off). The smoothed fp32 graph is parity-checked.
    rows : check parity and gate INT8 on these rows (indices, after ``max_examples``) of ``split``
        only: ``run`` keeps its confirmation rows out of every decision this way.
    max_length : the length the artifact serves (recorded in the manifest as ``max_length``; predict,
        bench's accuracy and the handoff use it); every data row is checked cut at it. None: 512, capped
        at the model's positions.
    int8_tuning_split : the split INT8 tunes on (random rows of it); when it is ``split`` itself, INT8
        tunes on its first half and is gated on the second. Under an accuracy budget `run` passes its
        selection split as both, so the gate's looks never touch the decision or confirmation rows.
    exporter : ``auto`` (Optimum when installed and compatible with the installed transformers, else
        torch), ``optimum`` or ``torch``; see :mod:`cahp_deploy.export.onnx_export`. Recorded in the
        manifest as ``exporter`` ({name, why}).
    keep_failed_int8 : an INT8 graph that misses its gate after every look is still written, its
        manifest entry marked ``gate_failed`` (default: :class:`Int8GateError`, nothing written). For
        ``run`` under an accuracy budget, whose shipping sequence judges every graph against dense on
        the decision rows; ``predict`` and ``handoff`` never pick an INT8 graph on their own.

    Returns ``out``. Raises :class:`CahpError` on bad input (before any work) or a failed parity
    gate (then nothing is written).
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    out = check_output_path(out, force)
    _check_options(quantize, per_channel, fp16, opset, provider, int8_tuning_examples, int8_tuning_margin)
    _check_smoothing(int8_smooth, quantize)
    exporter_name, exporter_why = onnx_export.resolve_exporter(exporter)
    config = load_config(model_dir)
    max_length = _serving_length(max_length, config)
    pruning = _read_pruning(model_dir)
    qat, per_channel, granularity_from_qat = _qat_granularity(model_dir, quantize, per_channel)
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    labelled, labelled_rows = _parity_data(data, split, columns, config, max_examples, rows)
    tune_rows, parity_rows, tune_record, gate, gate_note = _int8_plan(
        quantize, data, split, columns, labelled, config, int8_tuning_examples, int8_tuning_split,
        int8_max_accuracy_drop, int8_min_agreement, confidence)

    attn = onnx_export.attn_implementation_for(config)
    model, tokenizer = load_classifier(model_dir, attn_implementation=attn)
    opset = onnx_export.resolve_opset(model, opset, exporter_name)
    heads = arch.heads_per_layer(model)

    from cahp_deploy.progress import make_progress

    steps = 2 + int(optimize) + int(quantize is not None) + int(fp16)
    with atomic_dir(out, force) as tmp, tempfile.TemporaryDirectory(prefix=".cahp-export-", dir=tmp.parent) as scratch, make_progress() as bar:
        task = bar.add_task("export", total=steps)
        say = _progress_words(bar, task)
        scratch = Path(scratch)
        plain = tmp / VARIANT_FILES["fp32"]
        say("ONNX")
        input_names = onnx_export.export_onnx(model, plain, opset, exporter_name)
        check = _Parity(model, tokenizer, config, input_names, parity_rows, gate, max_length)
        variants: dict[str, dict] = {"fp32": {"file": plain.name, "parity": check.check("fp32", onnx_runtime.session(plain))}}
        bar.advance(task)

        optimized, fp16_source = None, plain  # the optimization's candidates (INT8 picks its source), what fp16 converts
        if optimize:
            say("optimize")
            variants["optimized"], optimized, fp16_source = _optimized_variant(
                check, plain, tmp, scratch, config, heads, measure, provider)
            bar.advance(task)
        if quantize == "int8":
            say("int8")
            tune_feeds, tune_labels = _int8_tuning_feeds(tune_rows, tokenizer, input_names, config, max_length)
            variants["int8"] = _int8_variant(
                check, model, config, optimized, plain, tmp / VARIANT_FILES["int8"], scratch, tune_feeds, tune_labels,
                tune_record, per_channel, int8_tuning_margin, int8_smooth, gate, gate_note, qat, granularity_from_qat,
                measure, provider, say, keep_failed_int8)
            bar.advance(task)
        if fp16:
            say("fp16")
            variants["fp16"] = _fp16_variant(check, fp16_source, plain, tmp / VARIANT_FILES["fp16"], provider)
            bar.advance(task)

        say("manifest")
        _copy_model_files(model_dir, tmp, tokenizer, pruning)
        manifest = {
            "schema": schema.MANIFEST,
            "task": onnx_export.TASK,
            "variants": variants,
            "files": file_records(tmp),
            **_model_fields(model_dir, config, heads, pruning),
            "opset": opset,
            "exporter": {"name": exporter_name, "why": exporter_why},
            "input_names": input_names,
            "max_position_embeddings": int(getattr(config, "max_position_embeddings", 0) or 0) or None,
            "max_length": max_length,
            "attn_implementation": attn,
            "parity_data": _parity_provenance(check, labelled, labelled_rows, parity_rows, tune_record),
            "smoke": check.smoke(),
            "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(tmp, manifest)
        bar.advance(task)
    log.info("exported %s -> %s (%s)", model_dir, out, ", ".join(variants))
    return out


def _progress_words(bar, task):
    """``say(msg)``: show ``export: msg`` on the progress bar's task."""
    def say(msg: str) -> None:
        bar.update(task, description=f"export: {msg}")

    return say


def _check_smoothing(int8_smooth: float | None, quantize: str | None) -> None:
    if int8_smooth is not None and (quantize != "int8" or not 0.0 <= float(int8_smooth) <= 1.0):
        raise CahpError(f"--int8-smooth {int8_smooth} needs --quantize int8 and an alpha in [0, 1] (0.75 measured best)")


def _qat_granularity(model_dir: Path, quantize: str | None, per_channel: bool | None):
    """(the quantization-aware recovery behind ``model_dir`` or None, the INT8 weight granularity, whether
    that recovery chose it): with no ``per_channel`` asked, INT8 uses the granularity the recovery simulated."""
    qat = _qat(model_dir) if quantize == "int8" else None
    granularity_from_qat = qat is not None and per_channel is None
    if granularity_from_qat:
        per_channel = qat["per_channel"]  # what the recovery simulated
    return qat, per_channel, granularity_from_qat


def _serving_length(max_length: int | None, config) -> int:
    from cahp_deploy.serving_length import check_max_length, default_serving_length

    return check_max_length(max_length, config) or default_serving_length(config)


def _parity_data(data, split: str, columns: dict, config, max_examples: int | None, rows: Sequence[int] | None):
    """(labelled rows parity is checked on, or None without data; words for ``rows`` when given)."""
    if data is None:
        return None, None
    from cahp_deploy.data import check_labels, load_labelled

    labelled = load_labelled(data, split, **columns)
    check_labels(labelled, int(config.num_labels))
    if max_examples is not None:
        if max_examples < 1:
            raise CahpError(f"--max-examples must be at least 1, got {max_examples}")
        labelled = labelled.head(max_examples)
    if rows is None:
        return labelled, None
    idx = np.asarray(list(rows), dtype=np.int64)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= len(labelled):
        raise CahpError(f"rows must be indices into the {len(labelled)} rows of split {split!r}")
    return labelled.subset(idx), f"{len(idx)} chosen rows of {split!r} (the rest held out)"


def _int8_plan(quantize: str | None, data, split: str, columns: dict, labelled, config, examples: int,
               tuning_split: str, max_accuracy_drop: float | None, min_agreement: float | None, confidence: float):
    """(tuning rows, parity rows, tuning record, gate, gate note): which rows INT8 tunes on and is judged
    on; without INT8, parity is checked on ``labelled`` and the rest is None."""
    if quantize != "int8":
        return None, labelled, None, None, None
    tune_rows, parity_rows, tune_record = _int8_rows(data, split, columns, labelled, int(config.num_labels),
                                                     examples, config, tuning_split)
    n_gate = min(len(parity_rows), parity.MAX_DATA_EXAMPLES) if parity_rows is not None else None
    labelled_n = None if tune_rows is None else min(len(tune_rows), n_gate)
    gate, gate_note = resolve_int8_gate(max_accuracy_drop, min_agreement, labelled_n, confidence, n_gate)
    if gate_note:
        log.warning("int8: %s", gate_note)
    return tune_rows, parity_rows, tune_record, gate, gate_note


def _optimized_variant(check: _Parity, plain: Path, tmp: Path, scratch: Path, config, heads, measure: bool,
                       provider: str) -> tuple[dict, Path, Path]:
    """ORT's fusions on the plain export, chosen by timing (:func:`cahp_deploy.export.optimize.optimize`):
    (its manifest entry, the graph INT8 quantizes, the graph FP16 converts)."""
    spec = arch.spec_for(config)
    result = ortopt.optimize(
        plain, tmp / VARIANT_FILES["optimized"], scratch / "candidates",
        onnx_model_type=spec.onnx_model_type, heads_per_layer=heads,
        head_dim=arch.head_dim(config), vocab_size=int(getattr(config, "vocab_size", 1000)),
        measure=measure, provider=provider, max_seq=arch.max_sequence_length(config),
    )
    entry = {"file": result.path.name, **result.record,
             "parity": check.check("optimized", onnx_runtime.session(result.path))}
    return entry, result, result.candidates.get("ort_default", result.path)


def _int8_source(check: _Parity, optimized, scratch: Path, config, measure: bool, provider: str) -> tuple[Path, dict]:
    """The fp32 graph INT8 quantizes (:func:`cahp_deploy.export.optimize.choose_int8_source`) and the
    record of the choice; a candidate other than the optimized variant's is parity-checked first."""
    name, record = ortopt.choose_int8_source(
        optimized.candidates, optimized.choice, scratch, measure=measure, provider=provider,
        vocab_size=int(getattr(config, "vocab_size", 1000)), max_seq=arch.max_sequence_length(config))
    if name == optimized.choice:
        return optimized.path, record
    source = optimized.candidates[name]
    record["parity"] = check.check("optimized", onnx_runtime.session(source))  # within 1e-4 of PyTorch, or raise
    return source, record


def _copy_model_files(model_dir: Path, tmp: Path, tokenizer, pruning: dict | None) -> None:
    """config.json, the tokenizer and pruning.json go into the artifact next to the graphs."""
    shutil.copyfile(model_dir / "config.json", tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    if pruning is not None:
        shutil.copyfile(model_dir / "pruning.json", tmp / "pruning.json")


def _smoothed_source(check: _Parity, fused_source: Path, scratch: Path, tune_feeds, alpha: float):
    """(the SmoothQuant-smoothed fp32 graph INT8 quantizes, its record), parity-checked (exact in fp32, or raise)."""
    import onnx

    from cahp_deploy.export.int8.smoothing import smooth

    smoothed, smoothing = smooth(onnx.load(str(fused_source)), tune_feeds, alpha)
    int8_source = scratch / "smoothed.onnx"
    onnx.save(smoothed, str(int8_source))
    smoothing["parity"] = check.check("optimized", onnx_runtime.session(int8_source))  # exact in fp32, or raise
    return int8_source, smoothing


def _int8_variant(check: _Parity, model, config, optimized, plain: Path, dst: Path, scratch: Path,
                  tune_feeds, tune_labels, tune_record, per_channel, tuning_margin, smooth_alpha, gate, gate_note,
                  qat, granularity_from_qat: bool, measure: bool, provider: str, say, keep_failed: bool) -> dict:
    """Write ``dst`` (INT8 of the fusion candidate :func:`_int8_source` picks, or of ``plain`` when nothing
    was optimized; tuned and gated) and return its manifest entry (``gate_failed`` when it was kept
    after missing its gate)."""
    fused_source, source_choice = plain, None
    if optimized is not None:
        say("int8 source")
        fused_source, source_choice = _int8_source(check, optimized, scratch, config, measure, provider)
        say("int8")
    int8_source, smoothing = fused_source, None
    if smooth_alpha is not None:
        say("int8 smoothing")
        int8_source, smoothing = _smoothed_source(check, fused_source, scratch, tune_feeds, smooth_alpha)
    tuned, rec, result = _tune_and_check_int8(
        check, int8_source, dst, tune_feeds, tune_labels, tune_record, per_channel, tuning_margin, say=say,
        keep_failed=keep_failed,
        # the search smooths only a plain source whose rounding no quantization-aware training matched
        smooth_alpha=None if smoothing is not None or qat is not None else int8_tuning.SEARCH_SMOOTH_ALPHA,
    )
    smoothing = smoothing or tuned.smoothing
    report = result["data"] or result["random"]
    if granularity_from_qat:
        rec["per_channel_chosen_by"] = "quantization-aware recovery (recovery.json)"
    entry = {
        "file": dst.name, "source": "fp32" if fused_source == plain else
        "optimized" if fused_source.name == VARIANT_FILES["optimized"] else f"fusion candidate {fused_source.stem}",
        "per_channel": tuned.per_channel, "weight_type": "int8", "activation_type": "uint8 (dynamic)",
        "quantization_aware": qat is not None, "smoothing": smoothing, "source_choice": source_choice,
        "excluded_nodes": rec["excluded_nodes"], "fp32_mac_fraction": rec["fp32_mac_fraction"],
        "int8_mac_fraction": rec["int8_mac_fraction"],
        "gate": {**gate.to_dict(), **({"note": gate_note} if gate_note else {}), "tuning_rows": tune_record["on"], "gate_rows": tune_record.get("report_on", result["gate"]["on"]),
                 "tuning": rec["tuning"], "result": result["gate"]},
        "agreement": {"tuning": rec["tuning_agreement"], "tuning_on": tune_record["on"],
                      "report": result["argmax_agreement"],
                      "report_on": tune_record.get("report_on", "random tokens (no --data given)")},
        "accuracy": None if not result["data"] else {"int8": report["accuracy"], "pytorch_fp32": report["reference_accuracy"]},
        "tuning": rec,
        "parity": result,
    }
    if rec.get("gate_failed"):
        entry["gate_failed"] = rec["gate_failed"]
    if qat is not None:
        entry["qat_match"] = _qat_match(model, check, dst, tuned.per_channel, len(rec["excluded_nodes"]))
    if measure and provider == "cpu":
        entry.update(_time_int8(fused_source, dst, int(getattr(config, "vocab_size", 1000)),
                                arch.max_sequence_length(config)))
    return entry


def _fp16_variant(check: _Parity, fp16_source: Path, plain: Path, dst: Path, provider: str) -> dict:
    """Write ``dst`` (FP16 of ``fp16_source``, checked on ``provider``) and return its manifest entry."""
    fp16_variant.convert_fp16(fp16_source, dst)
    session = fp16_variant.fp16_session(dst, provider)
    return {
        "file": dst.name, "source": "ort_default" if fp16_source != plain else "fp32",
        "keep_io_types": True, "intended_provider": "CUDAExecutionProvider",
        "checked_on": session.get_providers()[0],
        "parity": check.check("fp16", session),
    }


def _model_fields(model_dir: Path, config, heads, pruning) -> dict:
    """The manifest's description of the model: heads and neurons kept, provenance, labels."""
    n_layers, dense_heads = arch.dense_head_grid(config)
    return {
        "kept_heads": getattr(config, KEPT_HEADS_FIELD, None),
        "heads_per_layer": heads,
        "num_heads_kept": int(sum(heads)),
        "num_heads_total": int(n_layers * dense_heads),
        **_neuron_fields(config, n_layers),
        "pruning": pruning,
        "source_model": str(model_dir),
        "source_model_sha256": sha256_dir(model_dir),
        "selection_sha256": (pruning or {}).get("selection_sha256"),
        "num_labels": int(config.num_labels),
        "id2label": {str(k): v for k, v in (config.id2label or {}).items()},
        "model_type": config.model_type,
    }


def _parity_provenance(check: _Parity, labelled, labelled_rows: str | None, parity_rows, tune_record) -> dict | None:
    """The manifest's ``parity_data``: which rows parity (and the INT8 gate) was checked on."""
    if labelled is None:
        return None
    return {
        **parity_rows.provenance(), "num_examples": len(check.labels),
        **({"rows": labelled_rows} if labelled_rows else {}),
        **({"rows": tune_record["report_on"]} if tune_record and parity_rows is not labelled else {}),
    }
