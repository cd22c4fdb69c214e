"""What the INT8 gate ships, checked on a split no export decision saw, and timed against dense fp32.

Usage: python experiments/int8_gate.py --dense DENSE_ART --data DATA --split test [ART ...] [--out JSON]

For the dense artifact and every other artifact (all made by ``cahp-deploy export --quantize int8``
with the default accuracy gate): the share of weight-MatMul MACs in INT8, the gate's own verdict (from
the manifest), and on ``--split`` (rows neither the tuning nor the gate used) the accuracy of the
optimized fp32 graph and of the INT8 graph through ONNX Runtime, with INT8's paired drop vs its own
fp32 (90% interval). Then one interleaved timing loop over every graph (dense fp32 first), median
ms at b1x128 and b32x128 with random token ids, so speedups vs dense fp32 share one machine state.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from cahp_deploy.data import load_labelled
from cahp_deploy.export import int8_mac_share, load_manifest, parity, variant_path
from cahp_deploy.export.int8 import tuning as int8_tuning
from cahp_deploy.export.optimize import time_graphs
from cahp_deploy.paired import correct, paired_drop

SHAPES = ((1, 128), (32, 128))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="*", type=Path)
    ap.add_argument("--dense", required=True, type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--timing-seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    arts = {"dense": args.dense, **{a.name: a for a in args.artifacts}}
    rows = load_labelled(args.data, args.split)
    report: dict = {"data": args.data, "split": args.split, "num_rows": len(rows), "artifacts": {}}
    graphs: dict[str, Path] = {}
    for name, art in arts.items():
        m = load_manifest(art)
        v = m["variants"]["int8"]
        tok, cfg = AutoTokenizer.from_pretrained(art), AutoConfig.from_pretrained(art)
        feeds, labels = parity.data_feeds(tok, rows, m["input_names"], cfg, limit=None)
        fp32 = parity.ort_logits(int8_tuning.session(variant_path(art, "optimized")), feeds)
        int8 = parity.ort_logits(int8_tuning.session(variant_path(art, "int8")), feeds)
        pd = paired_drop(correct(fp32, labels), correct(int8, labels))
        gate = v.get("gate", {})
        report["artifacts"][name] = {
            "path": str(art), "heads_kept": m["num_heads_kept"], "neurons_kept": m.get("num_neurons_kept"),
            "quantization_aware": v.get("quantization_aware", False),
            "int8_mac_share": int8_mac_share(m, "int8"), "excluded_nodes": len(v["excluded_nodes"]),
            "gate": {k: gate.get(k) for k in ("kind", "rule", "gate_rows", "num_gate_rows", "note")},
            "gate_result": {k: (gate.get("result") or {}).get(k) for k in ("drop", "drop_upper", "agreement", "passed", "reference")},
            "looks": [{k: a.get(k) for k in ("graph", "confidence", "held_out", "passed", "num_fp32")}
                      for a in v["tuning"].get("attempts", [])],
            "held_out": {"fp32_accuracy": round(pd.ref_accuracy, 2), "int8_accuracy": round(pd.new_accuracy, 2),
                         "int8_drop": round(pd.drop, 2), "ci90": [round(pd.low, 2), round(pd.high, 2)],
                         "agreement": round(float((fp32.argmax(1) == int8.argmax(1)).mean()), 4)},
            "qat_match": v.get("qat_match"),
        }
        graphs[f"{name} fp32"] = variant_path(art, "optimized")
        graphs[f"{name} int8"] = variant_path(art, "int8")
        print(name, json.dumps(report["artifacts"][name]["held_out"]), flush=True)
    keys = {g: f"g{i}" for i, g in enumerate(graphs)}
    t = time_graphs({keys[g]: p for g, p in graphs.items()}, shapes=SHAPES, vocab=30522, budget_s=args.timing_seconds)
    base = t[keys["dense fp32"]]
    report["p50_ms"] = {g: {s: round(v, 2) for s, v in t[keys[g]].items()} for g in graphs}
    report["speedup_vs_dense_fp32"] = {g: {s: round(base[s] / v, 3) for s, v in t[keys[g]].items()} for g in graphs}
    report["timing"] = "median ms, every graph interleaved in one loop, ORT default threads, random ids, full-length rows"
    report["load"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for g, sp in report["speedup_vs_dense_fp32"].items():
        print(f"{g:28s} " + "  ".join(f"{s} {report['p50_ms'][g][s]:.1f} ms ({x:.2f}x)" for s, x in sp.items()))


if __name__ == "__main__":
    main()
