"""Regenerate experiments/results/export_latency.json: CPU latency of each export variant, side by side.

For every artifact dir given (made by ``cahp-deploy export ... --quantize int8``), time the plain
graph (``model.onnx``), the optimized one (``model_optimized.onnx``, whatever fusions the export
chose), INT8 (``model_int8.onnx``) and, for reference, ORT's every-fusion graph (``ort_default``,
rebuilt from model.onnx: the graph that was slower than the plain export) at b1 x 128 and
b32 x 128. All graphs of all artifacts run in ONE interleaved loop per shape (order reversed every
round) and medians are kept, so load from other processes hits every cell alike. Parity figures,
the optimization choice and file sizes are copied from each manifest.

Usage: python experiments/export_latency.py ART_DIR [ART_DIR ...] [--threads 0] [--rounds 20 4] [--out PATH]
(--threads 0 = ONNX Runtime's default, one per physical core; --rounds = rounds at b1 and at b32)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from cahp_deploy.export import load_manifest, variant_path, verify
from cahp_deploy.export.optimize import build_candidate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "export_latency.json"
SHAPES = ((1, 128), (32, 128))


def _feed(session, batch: int, seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, nargs=2, default=(20, 4))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    scratch = Path(tempfile.mkdtemp(prefix="export-latency-"))
    graphs: dict[tuple[str, str], Path] = {}
    report: dict = {}
    for art in args.artifacts:
        verify(art, smoke=False)
        m = load_manifest(art)
        name = art.name
        full = scratch / f"{name}-ort_default.onnx"
        onnx.save(build_candidate(art / "model.onnx", "ort_default", "bert"), str(full))
        graphs[(name, "unoptimized")] = variant_path(art, "fp32")
        graphs[(name, "optimized")] = variant_path(art, "optimized")
        if "int8" in m["variants"]:
            graphs[(name, "int8")] = variant_path(art, "int8")
        graphs[(name, "ort_all_fusions")] = full
        report[name] = {
            "path": str(art),
            "heads_kept": m["num_heads_kept"], "heads_total": m["num_heads_total"],
            "heads_per_layer": m["heads_per_layer"],
            "optimized_choice": m["variants"]["optimized"]["choice"],
            "optimized_choice_timings_ms": m["variants"]["optimized"].get("timings_ms"),
            "parity": {v: {k: rec["parity"].get(k) for k in ("on", "max_abs_diff", "argmax_agreement")}
                       | {"accuracy": (rec["parity"].get("data") or {}).get("accuracy")}
                       for v, rec in m["variants"].items()},
            "file_bytes": {v: m["files"][rec["file"]]["bytes"] for v, rec in m["variants"].items()},
            "latency_ms": {},
        }
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    keys = list(sessions)
    load_before = os.getloadavg()
    started = time.perf_counter()
    for (batch, seq), rounds in zip(SHAPES, args.rounds):
        feeds = {k: _feed(s, batch, seq, 30000) for k, s in sessions.items()}
        for k in keys:
            sessions[k].run(None, feeds[k])  # warm-up
        times = {k: [] for k in keys}
        for r in range(rounds):
            for k in keys if r % 2 == 0 else reversed(keys):
                t = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1000)
        for (name, variant), ts in times.items():
            report[name]["latency_ms"].setdefault(variant, {})[f"b{batch}x{seq}"] = {
                "median": round(statistics.median(ts), 2), "min": round(min(ts), 2), "rounds": rounds}
        print(f"b{batch}x{seq}:", {f"{n}/{v}": round(statistics.median(t), 1) for (n, v), t in times.items()}, flush=True)
    result = {
        "what": "CPU latency (ms, median of interleaved rounds) of export variants; parity and sizes from each manifest",
        "threads": args.threads or "onnxruntime default (physical cores)",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "onnxruntime": ort.__version__},
        "note": "measured on a shared machine under load from other jobs: compare cells of one run only; "
                "absolute numbers are not final",
        "seconds": round(time.perf_counter() - started, 1),
        "artifacts": report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
