"""Regenerate experiments/results/baselines_sst5.json: the literature baselines on minilm-sst5.

For each method (attattr, l0, dsp, pass) and each budget (25% and 50% of the 72 heads: 18 and 36),
run the method's ``select`` at its defaults on the sst5 train split, gate the unselected heads off on
the dense model (:func:`cahp_deploy.gates.head_mask`, no recovery) and measure validation accuracy.
Wall times are what one ``select`` call took. AttAttr's scores do not depend on the budget, so it
runs once and both budgets are cut from the same scores (its wall time is that one run).

Usage: python experiments/baselines_sst5.py [--methods l0,dsp] [--threads 2] [--time-budget S] [--option k=v]
Results of methods not rerun are kept from the existing file, so methods can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cahp_deploy.data import iter_batches, load_labelled
from cahp_deploy.gates import head_mask
from cahp_deploy.methods import MethodContext, get_method
from cahp_deploy.methods.gate_training import keep
from cahp_deploy.modeling import load_classifier
from cahp_deploy.signals import model_inputs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "minilm-sst5"
DATA = SHARED / "data" / "sst5"
OUT = ROOT / "experiments" / "results" / "baselines_sst5.json"
METHODS = ("attattr", "l0", "dsp", "pass")
BUDGETS = (18, 36)


def accuracy(model, tokenizer, data, kept=None) -> float:
    correct = 0
    with torch.no_grad(), (head_mask(model, kept) if kept is not None else _null()):
        for idx, enc, labels in iter_batches(tokenizer, data, batch_size=64, max_length=128):
            pred = model(**model_inputs(model, enc)).logits.argmax(-1).numpy()
            correct += int((pred == labels).sum())
    return correct / len(data)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key.replace("-", "_")] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per select call (default: the methods')")
    ap.add_argument("--option", action="append", default=[], help="extra method option key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_classifier(MODEL)
    train = load_labelled(DATA, "train")
    val = load_labelled(DATA, "validation")
    options = _parse_options(args.option)
    if args.time_budget is not None:
        options["time_budget"] = args.time_budget

    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.setdefault("methods", {})
    t = time.perf_counter()
    dense = accuracy(model, tokenizer, val)
    results.update(
        model=str(MODEL.relative_to(SHARED.parent)), data=str(DATA.relative_to(SHARED.parent)),
        selection_split="train", eval_split="validation", eval_examples=len(val),
        dense_accuracy=dense, dense_eval_seconds=round(time.perf_counter() - t, 2),
        torch_threads=args.threads, seed=args.seed, cpu_count=os.cpu_count(), platform=platform.platform(),
        note=("wall times measured on a shared 2-core machine with other jobs running (see load_average); "
              "indicative only. Heads removed by gating on the dense model, no recovery."),
    )
    for name in args.methods.split(","):
        select = get_method(name)
        entry = {"runs": {}}
        cached = None
        for k in BUDGETS:
            load_before = os.getloadavg()
            t = time.perf_counter()
            if name == "attattr" and cached is not None:
                sel, wall = cached
                kept = keep(np.asarray(sel.scores), k, options)
            else:
                sel = select(MethodContext(model=model, tokenizer=tokenizer, data=train, budget=k,
                                           seed=args.seed, options=dict(options)))
                wall = time.perf_counter() - t
                kept = sel.kept_heads
                if name == "attattr":
                    cached = (sel, wall)
            acc = accuracy(model, tokenizer, val, kept)
            run = {
                "heads_kept": sum(len(h) for h in kept),
                "keep_ratio": k / 72,
                "accuracy": acc,
                "select_wall_seconds": round(wall, 1),
                "kept_heads": kept,
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "stopped_by_time_budget": sel.details.get("stopped_by_time_budget"),
                "params": sel.params,
                "details": {**{k2: v for k2, v in sel.details.items() if k2 not in ("p_open",)}, "budget": k},
            }
            entry["runs"][str(k)] = run
            print(f"{name:8s} k={k:2d} acc={acc:.4f} wall={wall:7.1f}s stopped={run['stopped_by_time_budget']}",
                  flush=True)
        results["methods"][name] = entry
        OUT.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(OUT)


if __name__ == "__main__":
    main()
