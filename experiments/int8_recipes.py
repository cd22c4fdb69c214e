"""Every INT8 recipe tried, on one artifact: accuracy, agreement, INT8 share of MACs, latency.

Usage: python experiments/int8_recipes.py ART_DIR --data DATA --splits validation,test [--static] [--out JSON]

ART_DIR is an artifact made by ``cahp-deploy export --quantize int8 --data DATA`` (its
``model_int8.onnx`` is the shipped, gated recipe). The other recipes are rebuilt here from its
``model_optimized.onnx``:

* ``dynamic per-tensor`` / ``dynamic per-channel``: every weight MatMul INT8 (ORT quantize_dynamic);
* ``smooth a=<alpha> per-channel``: :mod:`cahp_deploy.export.int8.smoothing` (an explicit ``Mul`` before
  each MatMul: BERT is post-LN) with 1,024 train rows, then dynamic per-channel INT8;
* ``static QDQ`` (``--static``): ORT quantize_static, MinMax calibration on 256 train rows, QDQ format.

Accuracy is through ONNX Runtime on each split (all rows), paired against the fp32 optimized graph
(drop, one-sided 90% upper bound); latency is interleaved over all graphs in one loop, median ms at
b1x128 and b32x128, ORT default threads, random token ids. Nothing here is used by the tool itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from transformers import AutoConfig, AutoTokenizer

from cahp_deploy.data import load_labelled
from cahp_deploy.export import load_manifest, parity, variant_path
from cahp_deploy.export.int8 import quantize as quant
from cahp_deploy.export.int8 import tuning as int8_tuning
from cahp_deploy.export.optimize import time_graphs
from cahp_deploy.export.int8.smoothing import smooth
from cahp_deploy.paired import correct, paired_drop

SHAPES = ((1, 128), (32, 128))


def _feeds(tok, cfg, names, data, split, n=None, seed=0):
    d = load_labelled(data, split)
    if n is not None and n < len(d):
        d = d.subset(np.sort(np.random.default_rng(seed).choice(len(d), size=n, replace=False)))
    return parity.data_feeds(tok, d, names, cfg, limit=None)


def static_qdq(src: Path, dst: Path, feeds) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"],
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def int8_share(graph: Path, fp32: onnx.ModelProto) -> float:
    """Share of the quantizable MACs whose node no longer multiplies by its fp32 weight initializer
    (dynamic INT8 replaces the node; static QDQ keeps it but feeds it a DequantizeLinear output)."""
    nodes = int8_tuning.quantizable_nodes(fp32)
    g = onnx.load(str(graph), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    fp32_left = {n.name for n in g.node if n.op_type in ("MatMul", "Attention", "Gemm") and len(n.input) > 1
                 and n.input[1] in inits}
    total = sum(n.macs for n in nodes)
    return round(sum(n.macs for n in nodes if n.quantizer_name not in fp32_left and n.name not in fp32_left) / total, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--splits", default="validation,test")
    ap.add_argument("--alphas", default="0.5,0.75")
    ap.add_argument("--static", action="store_true")
    ap.add_argument("--timing-seconds", type=float, default=40.0)
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=PATH more INT8 graphs of the same model to score")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timing-only", action="store_true",
                    help="rebuild the graphs and re-time them into the existing --out (accuracy kept); for a quieter machine")
    args = ap.parse_args()

    art = args.artifact
    tok, cfg = AutoTokenizer.from_pretrained(art), AutoConfig.from_pretrained(art)
    manifest = load_manifest(art)
    names = manifest["input_names"]
    src = variant_path(art, "optimized")
    fp32 = onnx.load(str(src))
    scratch = Path(tempfile.mkdtemp(prefix="int8-recipes-"))  # rebuilt graphs: large, never kept
    graphs: dict[str, Path] = {"fp32 (optimized)": src, "shipped: accuracy gate": variant_path(art, "int8")}
    graphs.update({k: Path(v) for k, v in (e.split("=", 1) for e in args.extra)})
    t0 = time.perf_counter()
    for pc in (False, True):
        dst = scratch / f"dyn_{pc}.onnx"
        quant.quantize_int8(src, dst, per_channel=pc)
        graphs[f"dynamic {'per-channel' if pc else 'per-tensor'}, all MatMuls"] = dst
    calib = _feeds(tok, cfg, names, args.data, "train", 1024)[0]
    for alpha in [float(a) for a in args.alphas.split(",") if a]:
        sm = scratch / f"smooth_{alpha}.onnx"
        onnx.save(smooth(fp32, calib, alpha)[0], str(sm))
        dst = scratch / f"smooth_{alpha}_pc.onnx"
        quant.quantize_int8(sm, dst, per_channel=True)
        graphs[f"smooth a={alpha} + dynamic per-channel"] = dst
    if args.static:
        dst = scratch / "static_qdq.onnx"
        static_qdq(src, dst, _feeds(tok, cfg, names, args.data, "train", 256)[0])
        graphs["static QDQ, MinMax (256 train rows)"] = dst
    build_seconds = time.perf_counter() - t0

    splits = [s for s in args.splits.split(",") if s]
    if args.timing_only:
        report = json.loads(args.out.read_text())
        timings = time_graphs({f"g{k}": p for k, p in enumerate(graphs.values())}, shapes=SHAPES,
                              vocab=int(getattr(cfg, "vocab_size", 1000)), budget_s=args.timing_seconds)
        base = timings["g0"]
        for k, name in enumerate(graphs):
            if name in report["recipes"]:
                t = timings[f"g{k}"]
                report["recipes"][name]["p50_ms"] = {sh: round(v, 2) for sh, v in t.items()}
                report["recipes"][name]["speedup_vs_fp32"] = {sh: round(base[sh] / v, 3) for sh, v in t.items()}
        report["machine"]["load"] = os.getloadavg()
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
        for name, r in report["recipes"].items():
            print(f"{name:42s} " + " ".join(f"{sh} {r['p50_ms'][sh]} ms {v}x" for sh, v in r["speedup_vs_fp32"].items()))
        return
    evals = {s: _feeds(tok, cfg, names, args.data, s) for s in splits}
    ref = {s: parity.ort_logits(int8_tuning.session(src), f) for s, (f, _) in evals.items()}
    rows: dict[str, dict] = {}
    for name, path in graphs.items():
        sess = int8_tuning.session(path)
        row: dict = {"int8_mac_share": 0.0 if path == src else int8_share(path, fp32)}
        for s, (f, y) in evals.items():
            lg = parity.ort_logits(sess, f)
            pd = paired_drop(correct(ref[s], y), correct(lg, y))
            row[s] = {"accuracy": round(pd.new_accuracy, 2), "drop": round(pd.drop, 2), "upper": round(pd.upper, 2),
                      "ci": [round(pd.low, 2), round(pd.high, 2)], "n": pd.n,
                      "agreement": round(float((lg.argmax(1) == ref[s].argmax(1)).mean()), 4)}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    keys = {name: f"g{k}" for k, name in enumerate(graphs)}
    timings = time_graphs({keys[n]: p for n, p in graphs.items()}, shapes=SHAPES,
                          vocab=int(getattr(cfg, "vocab_size", 1000)), budget_s=args.timing_seconds)
    base = timings[keys["fp32 (optimized)"]]
    for name in graphs:
        t = timings[keys[name]]
        rows[name]["p50_ms"] = {sh: round(v, 2) for sh, v in t.items()}
        rows[name]["speedup_vs_fp32"] = {sh: round(base[sh] / v, 3) for sh, v in t.items()}
    report = {
        "artifact": str(art), "source_model": manifest.get("source_model"), "num_heads_kept": manifest["num_heads_kept"],
        "num_neurons_kept": manifest.get("num_neurons_kept"), "data": args.data, "splits": splits,
        "shipped_gate": manifest["variants"]["int8"].get("gate"),
        "recipes": rows, "build_seconds": round(build_seconds, 1),
        "timing": "median ms, all graphs interleaved in one loop, ORT default threads, random ids, full-length rows",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    for name, r in rows.items():
        accs = "  ".join(f"{s} {r[s]['accuracy']:.2f} ({-r[s]['drop']:+.2f}, up {r[s]['upper']:+.2f}, agr {r[s]['agreement']:.3f})"
                         for s in splits)
        sp = " ".join(f"{sh} {v}x" for sh, v in r["speedup_vs_fp32"].items())
        print(f"{name:42s} int8 {r['int8_mac_share']:.0%}  {accs}  {sp}")


if __name__ == "__main__":
    main()
