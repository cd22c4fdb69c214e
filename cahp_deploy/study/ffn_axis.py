"""The study's FFN axis: neuron methods at several keep ratios, before and after recovery.

Every attention head is kept, so the table isolates the neurons: for each keep ratio R (of all FFN
neurons) and each ``--ffn-method`` (``cahp``, ``gradient``, ``random`` with several seeds), the dense
model is pruned to those neurons (physically: the pruning tests check that this equals gating), its
held-out accuracy measured, then it is recovered as in the head study and measured again.

The FFN evidence is collected once (one pass over the selection split) and every cell is cut from it;
each cell is cached under ``OUT/cells/`` keyed by its inputs, so an interrupted run resumes.
Results: ``OUT/ffn_study.json`` (schema :data:`cahp_deploy.schema.STUDY`, ``axis: "ffn"``) and
``OUT/ffn_study.md``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy import arch, evaluation, schema
from cahp_deploy.atomic import atomic_file
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_json
from cahp_deploy.study.stage import CELLS_DIR, CellCache, StudyConfig, _load_inputs

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
FFN_STUDY_METHODS = ("cahp", "gradient", "random")


def _accuracy(model, tok, inputs, cfg: StudyConfig) -> dict[str, float]:
    out = {"eval": evaluation.accuracy(model, tok, inputs.eval, max_length=cfg.max_length)}
    if inputs.test is not None:
        out["test"] = evaluation.accuracy(model, tok, inputs.test, max_length=cfg.max_length)
    return out


def _cell(method: str, seed: int, ratio: float, stats, inputs, cfg: StudyConfig, cache: CellCache,
          evidence_key: str) -> dict[str, Any]:
    from cahp_deploy.methods.ffn import select_neurons
    from cahp_deploy.pruning import prune_model
    from cahp_deploy.recovery import RecoveryParams, finetune_in_place
    from cahp_deploy.selection.neurons import resolve_neuron_budget

    n_layers, inter = arch.num_layers(inputs.model.config), arch.intermediate_size(inputs.model.config)
    budget = resolve_neuron_budget(n_layers * inter, n_layers, keep_ratio=ratio)
    key = sha256_json({**inputs.base_key, "what": "ffn-cell", "method": method, "seed": seed, "budget": budget,
                       "evidence": evidence_key, "recover": cfg.recover, "epochs": cfg.recover_epochs,
                       "recover_rows": inputs.recover.provenance(), "lr": cfg.recover_lr})
    name = f"ffn-{method}-s{seed}-{int(round(100 * ratio))}pct"
    cached = cache.get(name, key)
    if cached is not None:
        return cached
    t = time.perf_counter()
    kept, details = select_neurons(stats if method != "random" else None, method, budget, n_layers, inter, seed)
    heads = [list(range(h)) for h in arch.heads_per_layer(inputs.model)]
    student = prune_model(copy.deepcopy(inputs.model), heads, kept)
    cell: dict[str, Any] = {
        "method": method, "seed": seed, "ratio": ratio, "neurons": budget,
        "neurons_per_layer": [len(k) for k in kept],
        "before": _accuracy(student, inputs.tokenizer, inputs, cfg),
        "select_seconds": details["timings"]["select"],
    }
    if cfg.recover:
        params = RecoveryParams(epochs=cfg.recover_epochs, lr=cfg.recover_lr, batch_size=cfg.recover_batch_size,
                                max_length=cfg.max_length, seed=cfg.seed)
        finetune_in_place(student, inputs.tokenizer, inputs.recover, params)
        cell["after"] = _accuracy(student, inputs.tokenizer, inputs, cfg)
    cell["seconds"] = time.perf_counter() - t
    return cache.put(name, key, cell)


def ffn_study(model: str, data: str, out: str | Path, cfg: StudyConfig, ratios=DEFAULT_RATIOS,
              methods=FFN_STUDY_METHODS, columns: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the FFN axis of the study into ``out``; returns ffn_study.json's contents."""
    from cahp_deploy.signals.ffn import collect_ffn_stats

    bad = [r for r in ratios if not 0.0 < float(r) <= 1.0]
    if bad or not ratios:
        raise CahpError(f"FFN keep ratios must be in (0, 1], got {list(ratios) or 'none'}")
    unknown = [m for m in methods if m not in FFN_STUDY_METHODS]
    if unknown:
        raise CahpError(f"unknown FFN method(s) {', '.join(unknown)}; choose from {', '.join(FFN_STUDY_METHODS)}")
    out = Path(out)
    start = time.perf_counter()
    inputs = _load_inputs(str(model), str(data), cfg, columns or {})
    cache = CellCache(out / CELLS_DIR)
    opts = cfg.method_options.get("cahp", {})
    evidence_key = sha256_json({**inputs.base_key, "what": "ffn-evidence", "options": opts})
    stats = cache.get_object("ffn_evidence", evidence_key)
    if stats is None:
        stats = collect_ffn_stats(inputs.model, inputs.tokenizer, inputs.select,
                                  fraction=float(opts.get("salience_fraction", 0.25)), max_length=cfg.max_length)
        cache.put_object("ffn_evidence", evidence_key, stats)
    dense = cache.get("ffn-dense", sha256_json({**inputs.base_key, "what": "dense"}))
    if dense is None:
        dense = cache.put("ffn-dense", sha256_json({**inputs.base_key, "what": "dense"}),
                          _accuracy(inputs.model, inputs.tokenizer, inputs, cfg))
    cells = []
    for ratio in ratios:
        for method in methods:
            for seed in (cfg.random_seeds if method == "random" else (cfg.seed,)):
                cells.append(_cell(method, int(seed), float(ratio), stats, inputs, cfg, cache, evidence_key))
    result = {
        "schema": schema.STUDY, "axis": "ffn", "model": str(model), "data": str(data),
        "config": {**{k: v for k, v in vars(cfg).items() if k not in ("method_options",)}, "ratios": list(ratios)},
        "dense": dense, "cells": cells, "seconds": time.perf_counter() - start,
        "evidence_examples": int(stats.counts.sum()), "salience_examples": int(stats.salience_examples),
    }
    with atomic_file(out / "ffn_study.json", force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    with atomic_file(out / "ffn_study.md", force=True) as tmp:
        tmp.write_text(markdown(result))
    return result


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The FFN table: accuracy (%) before -> after recovery per method and keep ratio."""
    ratios = result["config"]["ratios"]
    methods = list(dict.fromkeys(c["method"] for c in result["cells"]))
    lines = [f"# FFN neurons: {result['model']}", "",
             f"Every head kept; FFN neurons kept at each ratio, accuracy (%) on `{result['config']['eval_split']}` "
             f"before -> after recovery ({result['config']['recover_epochs']} epoch(s) on "
             f"{result['config']['recover_max_examples'] or 'all'} rows of `{result['config']['select_split']}`). "
             f"Dense: {100 * result['dense']['eval']:.1f}%. Random: mean ± sd over seeds "
             f"{', '.join(map(str, result['config']['random_seeds']))}.", "",
             "| method | " + " | ".join(f"{100 * r:g}% neurons" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for m in methods:
        row = []
        for r in ratios:
            cells = [c for c in result["cells"] if c["method"] == m and c["ratio"] == r]
            before = _mean_sd([c["before"]["eval"] for c in cells])
            after = _mean_sd([c["after"]["eval"] for c in cells]) if all("after" in c for c in cells) else "—"
            row.append(f"{before} -> {after}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", f"Wall: {result['seconds'] / 60:.1f} min (cached cells are not re-timed).", ""]
    return "\n".join(lines)


__all__ = ["DEFAULT_RATIOS", "FFN_STUDY_METHODS", "ffn_study", "markdown"]
