"""The study: every selection method at several budgets, before and after recovery, on one model.

The evidence behind "the heads that matter, chosen automatically": for each method (CAHP at its
knee and at fixed budgets, gradient salience, random with several seeds, the literature baselines)
and each budget (fractions of all heads, plus the number CAHP keeps at its knee), the accuracy on a
held-out split with the other heads removed, before and after a recovery fine-tune; CAHP's knee
sensitivity (:mod:`cahp_deploy.study.sensitivity`); the kept heads per layer. Results go to
``study.json`` (schema :data:`cahp_deploy.schema.STUDY`), ``study.md`` and plots
(:mod:`cahp_deploy.study.report`).

How heads are removed, and why it is fair:

* **before recovery**: gated (:func:`cahp_deploy.evaluation.masked_accuracy` on the one dense model).
  The pruning tests check that gating equals physical removal, and gating needs no copy or rewrite.
* **recovery**: on a *physically pruned* copy (:func:`cahp_deploy.pruning.prune_model`), which trains
  faster than a gated dense model; the gradients of the kept weights are the same either way.

Cost control, since a full study is hours on a CPU: CAHP's evidence is collected once and every CAHP
cell and the whole knee sensitivity are cut from it; ranking methods (gradient, attattr, random) are
run once per seed and re-cut at every budget from their scores (top-k with the same one-head-per-layer
guard the methods apply, which the tests check against the methods themselves); and each finished
piece (dense accuracy, evidence, selection, cell, sensitivity) is cached under ``OUT/cells/`` keyed
by a hash of its inputs (CAHP's cells also by the evidence's content), so an interrupted study resumes
where it stopped. The keys do not cover this package's code: after changing a method, delete its
``cells/select-*`` and ``cells/cell-*`` files.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy import arch, evaluation, schema
from cahp_deploy.atomic import atomic_file
from cahp_deploy.data import LabelledData, check_labels, load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir, sha256_json
from cahp_deploy.methods import REGISTRY, MethodContext
from cahp_deploy.progress import make_progress
from cahp_deploy.selection.topk import keep_top_k

log = logging.getLogger(__name__)

ALL_METHODS = tuple(REGISTRY)
DEFAULT_METHODS = ("cahp", "gradient", "random", "attattr", "l0", "dsp", "pass")
DEFAULT_BUDGETS = (0.1, 0.25, 0.5, 0.75)
#: methods whose selection is the top-k of budget-independent scores, with the one-head-per-layer guard
RANKING_METHODS = ("gradient", "attattr", "random")
CELLS_DIR = "cells"
KNEE = "knee"


@dataclass
class StudyConfig:
    """Everything that defines a study (recorded in study.json; cached cells are keyed on it)."""

    select_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = None
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    methods: tuple[str, ...] = DEFAULT_METHODS
    random_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 42
    max_examples: int | None = None
    eval_max_examples: int | None = None
    recover: bool = True
    recover_epochs: int = 3
    recover_max_examples: int | None = None
    recover_lr: float = 2e-5
    recover_batch_size: int = 32
    max_length: int = 128
    degrees: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    sensitivity_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str | None = None

    def validate(self) -> None:
        if not self.budgets:
            raise CahpError("give at least one budget (--budgets 0.25,0.5)")
        bad = [b for b in self.budgets if not 0.0 < b <= 1.0]
        if bad:
            raise CahpError(f"--budgets are fractions of all heads in (0, 1], got {bad}")
        unknown = [m for m in self.methods if m not in REGISTRY]
        if unknown:
            raise CahpError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from {', '.join(REGISTRY)}")
        if not self.methods:
            raise CahpError("give at least one method (--methods cahp,gradient)")
        if "random" in self.methods and not self.random_seeds:
            raise CahpError("--random-seeds is empty; give at least one seed for the random baseline")
        if self.eval_split == self.select_split:
            raise CahpError(
                f"--eval-split {self.eval_split!r} is also the selection split; evaluate on held-out data"
            )
        if self.test_split is not None and self.test_split in (self.select_split, self.eval_split):
            raise CahpError(f"--test-split {self.test_split!r} must differ from the selection and evaluation splits")
        for name, n in (("--max-examples", self.max_examples), ("--eval-max-examples", self.eval_max_examples),
                        ("--recover-max-examples", self.recover_max_examples)):
            if n is not None and n < 1:
                raise CahpError(f"{name} must be at least 1, got {n}")
        if self.recover and self.recover_epochs < 1:
            raise CahpError(f"--recover-epochs must be at least 1, got {self.recover_epochs}")
        unknown = [m for m in self.method_options if m not in REGISTRY]
        if unknown:
            raise CahpError(f"--method-option for unknown method(s) {', '.join(unknown)}")


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.1,0.25"`` -> (0.1, 0.25), sorted, duplicates removed."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CahpError(f"--budgets must be comma-separated fractions like 0.1,0.25, got {text!r}") from None
    return tuple(sorted(set(values)))


def parse_method_option(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """``("l0.steps=100", "cahp.space=full")`` -> {"l0": {"steps": 100}, "cahp": {"space": "full"}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, eq, value = item.partition("=")
        method, dot, key = name.partition(".")
        if not eq or not dot or not key:
            raise CahpError(f"--method-option must look like METHOD.KEY=VALUE (e.g. l0.steps=100), got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key.replace("-", "_")] = parsed
    return out


# ----------------------------------------------------------------------------------------------
# the cache of finished pieces
# ----------------------------------------------------------------------------------------------


class CellCache:
    """JSON (or pickle) files under OUT/cells, each stored with the hash of the inputs that made it."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, key: str) -> dict | None:
        path = self.root / f"{name}.json"
        if not path.exists():
            return None
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        return stored["value"] if stored.get("key") == key else None

    def put(self, name: str, key: str, value: dict) -> dict:
        with atomic_file(self.root / f"{name}.json") as tmp:
            with open(tmp, "w") as f:
                json.dump({"key": key, "value": _jsonable(value)}, f, indent=1)
        return value

    def get_object(self, name: str, key: str):
        path = self.root / f"{name}.pkl"
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                stored_key, obj = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, ValueError):
            return None
        return obj if stored_key == key else None

    def put_object(self, name: str, key: str, obj) -> None:
        with atomic_file(self.root / f"{name}.pkl") as tmp:
            with open(tmp, "wb") as f:
                pickle.dump((key, obj), f)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    model: Any
    tokenizer: Any
    select: LabelledData
    eval: LabelledData
    test: LabelledData | None
    recover: LabelledData
    base_key: dict[str, Any]


def _available(method: str) -> bool:
    return importlib.util.find_spec(REGISTRY[method][0]) is not None


def _budget_heads(fraction: float, total: int, n_layers: int) -> int:
    """Heads kept at ``fraction``; at least one per layer, since every method keeps one per layer."""
    return int(min(total, max(n_layers, round(fraction * total))))


def _budget_label(fraction: float | None) -> str:
    return KNEE if fraction is None else f"{100 * fraction:g}%"


def _file_label(label: str) -> str:
    return label.replace("%", "pct")


def _accuracies(model, tok, inputs: _Inputs, cfg: StudyConfig, kept=None) -> dict[str, float]:
    """Accuracy on the evaluation (and test) split; gated when ``kept`` is given."""
    def one(data: LabelledData) -> float:
        if kept is None:
            return evaluation.accuracy(model, tok, data, max_length=cfg.max_length)
        return evaluation.masked_accuracy(model, tok, data, kept, max_length=cfg.max_length)

    out = {"eval": one(inputs.eval)}
    if inputs.test is not None:
        out["test"] = one(inputs.test)
    return out


def _load_inputs(model_dir: str, data: str, cfg: StudyConfig, columns: dict[str, Any]) -> _Inputs:
    from cahp_deploy.modeling import is_pruned, load_classifier
    from cahp_deploy.recovery import sample_examples

    net, tok = load_classifier(model_dir)  # eager attention: CAHP's signatures need the probabilities
    if is_pruned(net.config):
        raise CahpError(f"{model_dir} is already pruned; run the study on the dense model it came from")
    select_full = load_labelled(data, cfg.select_split, **columns)
    held_out = load_labelled(data, cfg.eval_split, **columns).head(cfg.eval_max_examples)
    test = load_labelled(data, cfg.test_split, **columns) if cfg.test_split else None
    num_labels = int(net.config.num_labels)
    check_labels(select_full, num_labels, min_classes=2)
    check_labels(held_out, num_labels)
    if test is not None:
        check_labels(test, num_labels)
    select = select_full.head(cfg.max_examples)
    recover_rows = sample_examples(select_full, cfg.recover_max_examples, cfg.seed)
    base_key = {
        "model_sha256": sha256_dir(model_dir),
        "select": select.provenance(),
        "eval": held_out.provenance(),
        "test": None if test is None else test.provenance(),
        "max_length": cfg.max_length,
    }
    return _Inputs(net, tok, select, held_out, test, recover_rows, base_key)


def _evidence(inputs: _Inputs, cfg: StudyConfig, cache: CellCache):
    from cahp_deploy.methods.cahp import collect_evidence

    options = cfg.method_options.get("cahp", {})
    key = sha256_json({**inputs.base_key, "what": "cahp-evidence", "options": options, "seed": cfg.seed})
    evidence = cache.get_object("cahp_evidence", key)
    if evidence is None:
        ctx = MethodContext(model=inputs.model, tokenizer=inputs.tokenizer, data=inputs.select,
                            seed=cfg.seed, options=dict(options))
        evidence = collect_evidence(ctx)
        cache.put_object("cahp_evidence", key, evidence)
    return evidence


def _evidence_fingerprint(evidence) -> str:
    """What CAHP's cells and the sensitivity scan depend on, by content: the evidence pickle is not
    committed, so a rerun recomputes it, and a change in how it is computed must redo those cells."""
    parts = [np.ascontiguousarray(evidence.profiles, dtype=np.float64).tobytes()]
    if evidence.salience is not None:
        parts.append(np.ascontiguousarray(evidence.salience, dtype=np.float64).tobytes())
    return hashlib.sha256(b"".join(parts) + str(int(evidence.knee.k)).encode()).hexdigest()


def _selection_record(sel, seconds: float) -> dict[str, Any]:
    return {
        "kept_heads": sel.kept_heads,
        "heads_kept": sel.num_heads_kept,
        "select_seconds": seconds,
        "scores": sel.scores,
        "knee": sel.knee,
        "details": {k: v for k, v in sel.details.items() if k in ("budget", "k", "k_from", "rescued_layers",
                                                                     "examples_used", "stopped_by_time_budget")},
    }


def _select(method: str, seed: int, heads: int, label: str, inputs: _Inputs, cfg: StudyConfig,
            cache: CellCache, evidence) -> dict[str, Any]:
    """The kept heads of ``method`` at ``heads`` (cached); ranking methods are re-cut from their scores."""
    options = cfg.method_options.get(method, {})
    common = {**inputs.base_key, "method": method, "seed": seed, "options": options}
    if method == "cahp":
        from cahp_deploy.methods.cahp import k_for_budget, select_at

        t = time.perf_counter()
        k = evidence.knee.k if label == KNEE else k_for_budget(evidence, heads)
        sel = select_at(evidence, k)
        record = _selection_record(sel, time.perf_counter() - t + sum(evidence.timings.values()))
        record["details"]["k"] = int(k)
        return record
    if method in RANKING_METHODS:
        name = f"select-{method}-s{seed}"
        key = sha256_json({**common, "what": "ranking"})
        ranking = cache.get(name, key)
        if ranking is None:
            ranking = _run_method(method, seed, heads, inputs, options)
            cache.put(name, key, ranking)
        scores = np.asarray(ranking["scores"], dtype=np.float64)
        allow_empty = bool(options.get("allow_empty_layers", False))
        kept = keep_top_k(scores, heads, min_per_layer=0 if allow_empty else 1)
        details = {**ranking["details"], "budget": int(heads), "recut_from_scores": True}
        return {**ranking, "kept_heads": kept, "heads_kept": sum(len(k) for k in kept), "details": details}
    name = f"select-{method}-s{seed}-{_file_label(label)}"
    key = sha256_json({**common, "what": "selection", "heads": heads})
    record = cache.get(name, key)
    if record is None:
        record = cache.put(name, key, _run_method(method, seed, heads, inputs, options))
    return record


def _run_method(method: str, seed: int, heads: int, inputs: _Inputs, options: dict) -> dict[str, Any]:
    from cahp_deploy.methods.stage import load_method

    run = load_method(method)
    # A copy: trainable baselines may be asked (--method-option X.train_weights=true) to move weights.
    ctx = MethodContext(model=copy.deepcopy(inputs.model), tokenizer=inputs.tokenizer, data=inputs.select,
                        budget=int(heads), seed=int(seed), options=dict(options))
    t = time.perf_counter()
    sel = run(ctx)
    return _selection_record(sel, time.perf_counter() - t)


def _cell(method: str, seed: int, fraction: float | None, heads: int, inputs: _Inputs, cfg: StudyConfig,
          cache: CellCache, evidence, evidence_fp: str | None) -> dict[str, Any]:
    """One (method, seed, budget): selection, accuracy before and after recovery (cached)."""
    label = _budget_label(fraction)
    name = f"cell-{method}-s{seed}-{_file_label(label)}"
    recover_params = None
    if cfg.recover:
        recover_params = {"epochs": cfg.recover_epochs, "lr": cfg.recover_lr, "batch_size": cfg.recover_batch_size,
                          "max_examples": cfg.recover_max_examples, "rows": inputs.recover.provenance()}
    key = sha256_json({**inputs.base_key, "what": "cell", "method": method, "seed": seed, "heads": heads,
                       "label": label, "options": cfg.method_options.get(method, {}),
                       "cahp_options": cfg.method_options.get("cahp", {}), "recover": recover_params,
                       **({"evidence": evidence_fp} if method == "cahp" else {})})
    cached = cache.get(name, key)
    if cached is not None:
        return cached
    base = {"method": method, "seed": seed, "budget": label, "fraction": fraction, "heads_budget": heads}
    try:
        sel = _select(method, seed, heads, label, inputs, cfg, cache, evidence)
    except CahpError as e:  # a method that cannot meet this budget: recorded, the study goes on
        return cache.put(name, key, {**base, "error": str(e)})
    kept = sel["kept_heads"]
    t = time.perf_counter()
    before = _accuracies(inputs.model, inputs.tokenizer, inputs, cfg, kept)
    eval_seconds = time.perf_counter() - t
    cell = {
        **base,
        "heads_kept": sel["heads_kept"],
        "kept_heads": kept,
        "heads_per_layer_kept": [len(k) for k in kept],
        "select_seconds": sel["select_seconds"],
        "selection_details": sel["details"],
        "accuracy_before": before,
        "accuracy_after": None,
        "recovery": None,
        "eval_seconds": eval_seconds,
        "error": None,
    }
    if cfg.recover:
        cell["accuracy_after"], cell["recovery"] = _recover_and_measure(kept, inputs, cfg)
    return cache.put(name, key, cell)


def _recover_and_measure(kept, inputs: _Inputs, cfg: StudyConfig):
    from cahp_deploy.pruning import prune_model
    from cahp_deploy.recovery import RecoveryParams, finetune_in_place

    student = prune_model(copy.deepcopy(inputs.model), kept)
    params = RecoveryParams(epochs=cfg.recover_epochs, lr=cfg.recover_lr, batch_size=cfg.recover_batch_size,
                            max_length=cfg.max_length, seed=cfg.seed)
    stats = finetune_in_place(student, inputs.tokenizer, inputs.recover, params)
    after = _accuracies(student, inputs.tokenizer, inputs, cfg)
    return after, stats


def _plan(cfg: StudyConfig, total: int, n_layers: int, knee_heads: int | None, skipped: dict[str, str]):
    """(method, seed, fraction, heads) for every cell, in the order they run (cheap methods first)."""
    budgets: list[tuple[float | None, int]] = [(f, _budget_heads(f, total, n_layers)) for f in cfg.budgets]
    if knee_heads is not None:
        budgets.append((None, knee_heads))
    cells = []
    for method in cfg.methods:
        if method in skipped:
            continue
        seeds = cfg.random_seeds if method == "random" else (cfg.seed,)
        for seed in seeds:
            for fraction, heads in budgets:
                cells.append((method, int(seed), fraction, heads))
    return budgets, cells


def _check_out(out: Path, force: bool) -> None:
    """A finished study needs ``force``; a dir holding only ``cells/`` is resumed; anything else is refused."""
    if out.exists():
        if not out.is_dir():
            raise CahpError(f"--out {out} exists and is not a directory")
        if (out / "study.json").exists() and not force:
            raise CahpError(f"output {out} already holds a study; pass --force to redo it (unchanged cells are reused)")
        if not (out / CELLS_DIR).is_dir() and any(out.iterdir()) and not force:
            raise CahpError(f"output {out} already exists and is not a study; pass --force or choose another --out")


def _cahp_knee(inputs, cfg: StudyConfig, cache: CellCache, bar, timings: dict[str, float]):
    """(CAHP's evidence, its fingerprint, the knee's record, the knee's selection): one evidence pass."""
    from cahp_deploy.methods.cahp import select_at

    task = bar.add_task("CAHP evidence (signatures, salience, sweep)", total=None)
    t = time.perf_counter()
    evidence = _evidence(inputs, cfg, cache)
    evidence_fp = _evidence_fingerprint(evidence)
    knee_sel = select_at(evidence, evidence.knee.k)
    knee_record = {"k": int(evidence.knee.k), "heads_kept": knee_sel.num_heads_kept,
                   "method": evidence.knee.method, "mss_curve": knee_sel.mss_curve,
                   "knee": knee_sel.details["knee"], "evidence_timings": evidence.timings}
    timings["cahp_evidence"] = time.perf_counter() - t
    bar.update(task, total=1, completed=1)
    return evidence, evidence_fp, knee_record, knee_sel


def _sensitivity(evidence, evidence_fp: str, inputs, cfg: StudyConfig, cache: CellCache, bar,
                 timings: dict[str, float]) -> dict:
    """How the knee moves with the polynomial degree and the seed (cached)."""
    from cahp_deploy.study.sensitivity import knee_sensitivity

    task = bar.add_task("knee sensitivity", total=None)
    t = time.perf_counter()
    sens_key = sha256_json({**inputs.base_key, "what": "sensitivity", "cahp": cfg.method_options.get("cahp", {}),
                            "seed": cfg.seed, "degrees": cfg.degrees, "seeds": cfg.sensitivity_seeds,
                            "evidence": evidence_fp})
    sensitivity = cache.get("sensitivity", sens_key)
    if sensitivity is None:
        sensitivity = cache.put("sensitivity", sens_key, knee_sensitivity(
            evidence, list(cfg.degrees), list(cfg.sensitivity_seeds)))
    timings["sensitivity"] = time.perf_counter() - t
    bar.update(task, total=1, completed=1)
    return sensitivity


def study(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: StudyConfig | None = None,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    force: bool = False,
    show_progress: bool | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study of ``model`` on ``data``; write study.json, study.md and plots to ``out``.

    An ``out`` holding a finished study (study.json) is an error without ``force``; an ``out`` holding
    only ``cells/`` is resumed: cells whose inputs are unchanged are reused. Returns study.json's contents.
    """
    from cahp_deploy.study import report as study_report

    cfg = config or StudyConfig()
    cfg.validate()
    out = Path(out)
    _check_out(out, force)
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    start = time.perf_counter()
    inputs = _load_inputs(str(model), str(data), cfg, columns)
    from cahp_deploy.serving_length import check_max_length

    check_max_length(cfg.max_length, inputs.model.config)
    cache = CellCache(out / CELLS_DIR)
    n_layers, per_layer = arch.dense_head_grid(inputs.model.config)
    total = n_layers * per_layer
    skipped = {m: f"{REGISTRY[m][0]} is not installed" for m in cfg.methods if not _available(m)}

    timings: dict[str, float] = {}
    with make_progress(disable=None if show_progress is None else not show_progress) as bar:
        t = time.perf_counter()
        dense_key = sha256_json({**inputs.base_key, "what": "dense"})
        dense = cache.get("dense", dense_key)
        if dense is None:
            dense = cache.put("dense", dense_key, _accuracies(inputs.model, inputs.tokenizer, inputs, cfg))
        timings["dense_eval"] = time.perf_counter() - t

        evidence, evidence_fp, knee_record, sensitivity, knee_sel_plot = None, None, None, None, None
        if "cahp" in cfg.methods and "cahp" not in skipped:
            evidence, evidence_fp, knee_record, knee_sel_plot = _cahp_knee(inputs, cfg, cache, bar, timings)
            sensitivity = _sensitivity(evidence, evidence_fp, inputs, cfg, cache, bar, timings)

        budgets, plan = _plan(cfg, total, n_layers, knee_record["heads_kept"] if knee_record else None, skipped)
        task = bar.add_task("study cells", total=len(plan))
        cells = []
        t = time.perf_counter()
        for method, seed, fraction, heads in plan:
            bar.update(task, description=f"{method} (seed {seed}) @ {_budget_label(fraction)} = {heads} heads")
            cells.append(_cell(method, seed, fraction, heads, inputs, cfg, cache, evidence, evidence_fp))
            bar.advance(task)
        timings["cells"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    result = {
        "schema": schema.STUDY,
        "model": str(model),
        "model_sha256": inputs.base_key["model_sha256"],
        "data": str(data),
        "splits": {"select": cfg.select_split, "eval": cfg.eval_split, "test": cfg.test_split},
        "num_examples": {"select": len(inputs.select), "recover": len(inputs.recover), "eval": len(inputs.eval),
                         "test": None if inputs.test is None else len(inputs.test)},
        "config": _jsonable(asdict(cfg)),
        "num_layers": n_layers,
        "heads_per_layer": per_layer,
        "num_heads_total": total,
        "dense": dense,
        "knee": knee_record,
        "budgets": [{"label": _budget_label(f), "fraction": f, "heads": h} for f, h in budgets],
        "methods": {"run": [m for m in cfg.methods if m not in skipped], "skipped": skipped},
        "cells": cells,
        "summary": summarize(cells, budgets),
        "sensitivity": sensitivity,
        "cost": cost_model(cells, inputs, timings),
        "timings": timings,
        "versions": _versions(),
        "command": command,
    }
    study_report.write_outputs(out, result, knee_sel_plot)
    return result


def summarize(cells: list[dict], budgets) -> dict[str, Any]:
    """{phase: {split: {method: {budget label: {mean, std, min, max, n, heads}}}}} over seeds."""
    out: dict[str, Any] = {}
    for phase in ("before", "after"):
        out[phase] = {}
        for split in ("eval", "test"):
            table: dict[str, dict[str, Any]] = {}
            for cell in cells:
                acc = cell.get(f"accuracy_{phase}")
                if cell.get("error") or not acc or split not in acc:
                    continue
                table.setdefault(cell["method"], {}).setdefault(cell["budget"], []).append(
                    (acc[split], cell["heads_kept"]))
            if table:
                out[phase][split] = {
                    m: {b: {"mean": float(np.mean([a for a, _ in v])), "std": float(np.std([a for a, _ in v])),
                            "min": float(min(a for a, _ in v)), "max": float(max(a for a, _ in v)),
                            "n": len(v), "heads": float(np.mean([h for _, h in v]))}
                        for b, v in by_budget.items()}
                    for m, by_budget in table.items()
                }
    return out


def cost_model(cells: list[dict], inputs: _Inputs, timings: dict[str, float]) -> dict[str, Any]:
    """Measured unit costs, for extrapolating to larger runs (seconds per example-epoch, per evaluation)."""
    rec = [c["recovery"] for c in cells if c.get("recovery")]
    per_ex_epoch = [e["seconds"] / e["examples"] for r in rec for e in r["epochs"] if e["examples"]]
    evals = [c["eval_seconds"] for c in cells if c.get("eval_seconds")]
    n_eval = len(inputs.eval) + (len(inputs.test) if inputs.test is not None else 0)
    return {
        "recovery_seconds_per_example_epoch": float(np.median(per_ex_epoch)) if per_ex_epoch else None,
        "eval_seconds_per_example": float(np.median(evals)) / n_eval if evals else None,
        "cells": len(cells),
        "torch_threads": _torch_threads(),
        "note": "measured on this machine under its load at the time; see the report for the extrapolation",
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from cahp_deploy import __version__

    return {"cahp_deploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


__all__ = ["ALL_METHODS", "DEFAULT_BUDGETS", "DEFAULT_METHODS", "RANKING_METHODS", "StudyConfig", "cost_model",
           "parse_budgets", "parse_method_option", "study", "summarize"]
