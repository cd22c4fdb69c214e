"""Probe: layer-wise least-squares reconstruction (cahp_deploy.recovery.reconstruct) on real data.

Cuts come from ``--method gradient`` (Michel et al. head salience, and for FFN neurons the gradient
ranking), computed through the Python API on the calibration rows. For each cut the pruned model is
measured on every validation and test row before and after the refit (one refit per target / ridge /
ffn variant): accuracy, argmax agreement with dense, discordant rows vs dense (exactly one of the two
correct), mean squared logit difference to dense, and the refit's wall time.

One invocation runs one cut and some variants and writes ``runs/<cut>__<variant>.json`` (so each run
stays under ~10 minutes on one thread); ``--report`` merges every run into probe.json and probe.md::

    python experiments/reconstruct_probe.py --cut h48 --variants dense:auto:all pruned_input:auto:all
    python experiments/reconstruct_probe.py --report

A variant is ``target:ridge:ffn`` (ridge ``auto`` or a number), with ``:nozerobias`` leaving the
bias of zero-head layers as pruning set it. Cuts: ``hN`` keeps N of 72 heads, ``hNfP`` also keeps P%
of the FFN neurons, a ``zL`` suffix empties layer L as well.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from cahp_deploy import arch, evaluation
from cahp_deploy.data import LabelledData, load_labelled
from cahp_deploy.modeling import load_classifier
from cahp_deploy.pruning import prune_model
from cahp_deploy.recovery import sample_examples
from cahp_deploy.recovery.reconstruct import reconstruct

# the module, not the function of the same name the recovery package may export
reconstruct_module = importlib.import_module("cahp_deploy.recovery.reconstruct")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "reconstruct"
CACHE = Path("/tmp/reconstruct_probe_cache")
EVAL_SPLITS = ("validation", "test")
#: reconstruct's defaults, as a variant
DEFAULT_VARIANT = "residual:auto:all"


def calibration(data: str, rows: int, seed: int) -> LabelledData:
    return sample_examples(load_labelled(data, "train"), rows, seed)


def selection_for(cut: str, dense, tok, calib: LabelledData, max_length: int) -> dict:
    """Kept heads (and neurons) of a cut, from the gradient rankings; cached in OUT/selections.json."""
    from cahp_deploy.methods.base import MethodContext, top_k_selection
    from cahp_deploy.methods.ffn import select_neurons
    from cahp_deploy.selection.neurons import resolve_neuron_budget
    from cahp_deploy.signals.ffn import collect_ffn_stats
    from cahp_deploy.signals.salience import head_salience

    path = OUT / "selections.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if cut in known:
        return known[cut]
    m = re.fullmatch(r"h(\d+)(?:f(\d+))?(?:z(\d+))?", cut)
    heads, ffn_pct, empty = int(m.group(1)), m.group(2), m.group(3)
    n_layers, n_heads = arch.dense_head_grid(dense.config)
    salience = known.get("_head_salience")
    if salience is None:
        salience = head_salience(dense, tok, calib, max_length=max_length).tolist()  # 25% of the rows, as select
        known["_head_salience"] = salience
    ctx = MethodContext(model=dense, tokenizer=tok, data=calib, budget=heads, seed=42)
    sel = top_k_selection("gradient", ctx, np.asarray(salience).reshape(n_layers, n_heads))
    entry = {"kept_heads": sel.kept_heads, "kept_neurons": None}
    if empty is not None:  # a zero-head layer, to measure the refit of the bias that stands in for it
        entry["kept_heads"][int(empty)] = []
    if ffn_pct is not None:
        inter = arch.intermediate_size(dense.config)
        budget = resolve_neuron_budget(n_layers * inter, n_layers, keep_ratio=int(ffn_pct) / 100)
        stats = collect_ffn_stats(dense, tok, calib, max_length=max_length)
        entry["kept_neurons"], _ = select_neurons(stats, "gradient", budget, n_layers, inter, seed=42)
    known[cut] = entry
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known) + "\n")
    return entry


def dense_logits(dense, tok, evals: dict[str, LabelledData], max_length: int) -> dict[str, np.ndarray]:
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, data in evals.items():
        f = CACHE / f"dense_{split}_{max_length}.npy"
        if not f.exists():
            np.save(f, evaluation.logits(dense, tok, data, max_length=max_length))
        out[split] = np.load(f)
    return out


def measure(model, tok, evals, ref: dict[str, np.ndarray], max_length: int) -> dict:
    result = {}
    for split, data in evals.items():
        logits = evaluation.logits(model, tok, data, max_length=max_length)
        pred, dense_pred = logits.argmax(1), ref[split].argmax(1)
        y = np.asarray(data.labels)
        right, dense_right = pred == y, dense_pred == y
        result[split] = {
            "rows": len(data),
            "accuracy": float(right.mean()),
            "agreement": float((pred == dense_pred).mean()),
            "discordant": int((right != dense_right).sum()),
            "only_dense_right": int((dense_right & ~right).sum()),
            "only_pruned_right": int((right & ~dense_right).sum()),
            "logit_mse": float(((logits - ref[split]) ** 2).mean()),
        }
    return result


def parse_variant(v: str) -> tuple[dict, bool]:
    """``target:ridge:ffn[:nozerobias]`` -> reconstruct's options, and whether zero-head layers keep their bias."""
    target, ridge, ffn, *flags = v.split(":")
    return {"target": target, "ridge": ridge if ridge == "auto" else float(ridge), "ffn": ffn}, "nozerobias" in flags


def _without_zero_head_bias(plan_fn):
    """reconstruct's plan with every zero-head attention site skipped (its bias left as pruning set it)."""
    def plan(pruned, dense, ffn):
        heads = arch.heads_per_layer(pruned)
        return [(site, "probe: zero-head bias not refit" if site.kind == "attention" and heads[site.layer] == 0
                 else why) for site, why in plan_fn(pruned, dense, ffn)]
    return plan


def run(args) -> None:
    torch.set_num_threads(1)
    dense, tok = load_classifier(args.model, attn_implementation="sdpa")
    calib = calibration(args.data, args.calibration_rows, args.seed)
    evals = {s: load_labelled(args.data, s) for s in EVAL_SPLITS}
    ref = dense_logits(dense, tok, evals, args.max_length)
    sel = selection_for(args.cut, dense, tok, calib, args.max_length)
    pruned = prune_model(copy.deepcopy(dense), sel["kept_heads"], sel["kept_neurons"])
    runs = OUT / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    before_file = runs / f"{args.cut}__before.json"
    if not before_file.exists():
        before = {"cut": args.cut, "variant": "before", "heads_kept": sum(map(len, sel["kept_heads"])),
                  "heads_per_layer": [len(k) for k in sel["kept_heads"]],
                  "neurons_kept": None if sel["kept_neurons"] is None else sum(map(len, sel["kept_neurons"])),
                  "dense": {s: {"accuracy": float((ref[s].argmax(1) == evals[s].labels).mean())} for s in EVAL_SPLITS},
                  "metrics": measure(pruned, tok, evals, ref, args.max_length)}
        before_file.write_text(json.dumps(before, indent=2) + "\n")
        print(json.dumps({"cut": args.cut, "before": before["metrics"]}), flush=True)
    for v in args.variants:
        spec, no_zero_bias = parse_variant(v)
        model = copy.deepcopy(pruned)
        plan = reconstruct_module._plan
        if no_zero_bias:
            reconstruct_module._plan = _without_zero_head_bias(plan)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            record = reconstruct(model, dense, tok, calib, max_length=args.max_length, batch_size=32,
                                 seed=args.seed, **spec)
        finally:
            reconstruct_module._plan = plan
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        result = {"cut": args.cut, "variant": v, **spec, "refit_seconds": wall, "refit_cpu_seconds": cpu,
                  "metrics": measure(model, tok, evals, ref, args.max_length), "record": record}
        (runs / f"{args.cut}__{v.replace(':', '_')}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({"cut": args.cut, "variant": v, "seconds": round(wall, 1), "metrics": result["metrics"]}), flush=True)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def report() -> None:
    runs = [json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))]
    cuts = sorted({r["cut"] for r in runs}, key=lambda c: (-int(re.match(r"h(\d+)", c).group(1)), len(c), c))
    lines = ["# Layer-wise least-squares reconstruction: probe on minilm-sst5", "",
             "Written by `experiments/reconstruct_probe.py --report` from `runs/*.json`. Calibration: 2,000 random "
             "train rows (seed 0), max_length 128, one CPU thread. Cuts from `--method gradient` "
             "(head salience on 25% of the calibration rows; FFN neurons by gradient salience). "
             "Variant = target:ridge:ffn. agree = argmax agreement with dense; disc = discordant rows vs dense "
             "(exactly one of the two correct); mse = mean squared logit difference to dense.", ""]
    lines += [f"## Summary: before and after the default refit (`{DEFAULT_VARIANT}`)", "",
              "| cut | heads | val acc | val agree | val disc | test acc | test agree | test disc | refit wall s |",
              "|---|---:|---|---|---|---|---|---|---:|"]
    for cut in cuts:
        before = next(r for r in runs if r["cut"] == cut and r["variant"] == "before")
        after = next((r for r in runs if r["cut"] == cut and r["variant"] == DEFAULT_VARIANT), None)
        if after is None:
            continue
        cells = [cut, str(before["heads_kept"])]
        for s in EVAL_SPLITS:
            b, a = before["metrics"][s], after["metrics"][s]
            cells += [f"{_pct(b['accuracy'])} -> {_pct(a['accuracy'])}", f"{_pct(b['agreement'])} -> {_pct(a['agreement'])}",
                      f"{b['discordant']} -> {a['discordant']}"]
        lines.append("| " + " | ".join(cells + [f"{after['refit_seconds']:.0f}"]) + " |")
    lines.append("")
    merged = {"default_variant": DEFAULT_VARIANT, "cuts": {}}
    for cut in cuts:
        rows = [r for r in runs if r["cut"] == cut]
        before = next(r for r in rows if r["variant"] == "before")
        dense_acc = before["dense"]
        lines += [f"## {cut}: {before['heads_kept']} of 72 heads kept {before['heads_per_layer']}"
                  + ("" if before["neurons_kept"] is None else f", {before['neurons_kept']} of 9216 FFN neurons"), "",
                  f"Dense: validation {_pct(dense_acc['validation']['accuracy'])}%, test {_pct(dense_acc['test']['accuracy'])}%.", "",
                  "| variant | refit wall s | val acc | val agree | val disc | val mse | test acc | test agree | test disc | test mse |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ordered = [before] + sorted((r for r in rows if r["variant"] != "before"), key=lambda r: r["variant"])
        for r in ordered:
            m = r["metrics"]
            secs = "" if r["variant"] == "before" else f"{r['refit_seconds']:.0f}"
            if r.get("refit_cpu_seconds") is not None:
                secs += f" ({r['refit_cpu_seconds']:.0f} cpu)"
            cells = [r["variant"], secs]
            for s in EVAL_SPLITS:
                cells += [_pct(m[s]["accuracy"]), _pct(m[s]["agreement"]), str(m[s]["discordant"]), f"{m[s]['logit_mse']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        merged["cuts"][cut] = {"before": before, "variants": {r["variant"]: r for r in ordered[1:]}}
    notes = OUT / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (OUT / "probe.json").write_text(json.dumps(merged, indent=1) + "\n")
    (OUT / "probe.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # relative to the repository root (run from there), so no machine's absolute path is recorded
    ap.add_argument("--model", default="../shared/models/minilm-sst5")
    ap.add_argument("--data", default="../shared/data/sst5")
    ap.add_argument("--cut", default="h48")
    ap.add_argument("--variants", nargs="*", default=["dense:auto:all"])
    ap.add_argument("--calibration-rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        report()
    else:
        run(args)


if __name__ == "__main__":
    main()
