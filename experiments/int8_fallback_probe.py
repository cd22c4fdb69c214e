"""Does keeping the most INT8-sensitive MatMuls in fp32 rescue a pruned model's INT8 graph, and at what speed? (issue #26)

    python experiments/int8_fallback_probe.py RUN_OUT DATA OUT.json [SPEC ...]

RUN_OUT is a ``run`` output whose pruned INT8 graph missed (e.g. MNLI at budget 1: bound 1.13 vs dense).
Rebuilds the INT8 source the export chose (``variants.int8.source``) from ``artifacts/pruned/model.onnx``,
quantizes every weight MatMul per-channel, ranks the nodes by leave-one-in logit MSE on 128 train rows
(what ``export.int8.tuning`` does), then for each SPEC (default k0 k1 k2 k3 k4 k6 k8) scores:
``kK`` the top K in fp32, the rest INT8; ``sA`` / ``sAkK`` / ``sAtN`` the same after SmoothQuant-style smoothing
with alpha A of every node / of the N most sensitive only (``export.int8.smoothing``, 1,024 tuning rows; the ranking stays the unsmoothed one):

* the tuning rows (train 0..2047) and the gate rows (train 4999..9998) vs the pruned fp32 graph
  (INT8 vs its own fp32: what the export's gate judges);
* the decision rows (first 5,000 of the run's search split) vs the dense fp32 graph (what the shipping
  sequence judges), and the confirmation split vs dense;

each with its paired drop and one-sided 95% upper bound, length-bucketed batches of 32 (``run``'s
batching); then one interleaved timing loop with the dense INT8 graph at b32x128 (``export.optimize.time_graphs``,
1 thread and ORT's default). The committed JSON files were timed by an inline loop of the same kind
(12 interleaved rounds, order reversed every round, median). Exploratory: it looks at the decision rows, so nothing here is a promise.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx


def main(run_out: str, data: str, out: str, *ks: str) -> None:
    from transformers import AutoTokenizer

    from cahp_deploy.bench import accuracy
    from cahp_deploy.data import load_labelled
    from cahp_deploy.export.int8 import quantize as quant
    from cahp_deploy.export.int8 import tuning
    from cahp_deploy.export.optimize import build_candidate, time_graphs
    from cahp_deploy.onnx_runtime import session
    from cahp_deploy.paired import correct, paired_drop

    specs = list(ks) or ["k0", "k1", "k2", "k3", "k4", "k6", "k8"]
    run = Path(run_out)
    art = run / "artifacts"
    manifest = json.loads((art / "pruned" / "manifest.json").read_text())
    run_json = json.loads((run / "run.json").read_text())
    max_length = int(manifest["max_length"])
    source = manifest["variants"]["int8"]["source"].removeprefix("fusion candidate ")
    tok = AutoTokenizer.from_pretrained(str(art / "pruned"))
    search_split = "validation_matched"  # run.json: the eval split of the MNLI runs
    confirm_split = run_json["config"]["budget"].get("confirm_split") or "validation_mismatched"
    train = load_labelled(data, "train")
    splits = {
        "tuning": train.head(2048),
        "gate": train.subset(range(4999, min(9999, len(train)))),
        "decision": load_labelled(data, search_split).head(5000),
        "confirm": load_labelled(data, confirm_split),
    }
    batches = {k: accuracy.encode(tok, v, max_length) for k, v in splits.items()}
    labels = {k: np.asarray(v.labels) for k, v in splits.items()}

    def preds(model, split: str, threads: int = 2) -> np.ndarray:
        return accuracy.predict(session(model, threads=threads), batches[split], len(splits[split]))

    dense_fp32 = art / "dense" / "model_optimized.onnx"
    pruned_fp32 = art / "pruned" / "model.onnx"
    refs = {s: preds(pruned_fp32, s) for s in ("tuning", "gate")}
    refs |= {s: preds(dense_fp32, s) for s in ("decision", "confirm")}

    def judged(p: np.ndarray, split: str) -> dict:
        pd = paired_drop(correct(refs[split], labels[split]), correct(p, labels[split]), 0.95)
        return {"drop": round(pd.drop, 3), "upper": round(pd.upper, 3), "ref_only": pd.ref_only, "new_only": pd.new_only,
                "agreement": round(float((p == refs[split]).mean()), 4)}

    result: dict = {"run": str(run), "source": source, "max_length": max_length, "rows": {k: len(v) for k, v in splits.items()},
                    "reference": {"tuning, gate": "pruned fp32 (INT8 vs its own fp32)", "decision, confirm": "dense fp32"}}
    with tempfile.TemporaryDirectory(prefix="fallback-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src.onnx"
        onnx.save(build_candidate(pruned_fp32, source, "bert"), str(src))
        full = tmp / "full.onnx"
        quant.quantize_int8(src, full, per_channel=True)
        fp32, qmodel = onnx.load(str(src)), onnx.load(str(full))
        cands = [c for c in tuning.quantizable_nodes(fp32)]
        mixer = tuning.Mixer(fp32, qmodel, [c.name for c in cands])
        cands = [c for c in cands if c.name in mixer.subgraphs]
        total_macs = sum(c.macs for c in cands)
        # leave-one-in sensitivity on every 16th tuning batch
        sub = batches["tuning"][::16]
        sess_fp32 = session(fp32, threads=2)
        out_name = sess_fp32.get_outputs()[0].name
        ref_logits = [sess_fp32.run([out_name], b.arrays)[0] for _, b in sub]
        sens = []
        names = [c.name for c in cands]
        for c in cands:
            s = session(mixer.build([n for n in names if n != c.name]), threads=2)
            mse = float(np.mean([np.mean((s.run([out_name], b.arrays)[0] - r) ** 2) for (_, b), r in zip(sub, ref_logits)]))
            sens.append({"name": c.name, "layer": c.layer, "role": c.role, "macs_share": round(c.macs / total_macs, 4), "logit_mse": mse})
        sens.sort(key=lambda r: -r["logit_mse"])
        result["sensitivity"] = sens
        print(json.dumps(sens[:10], indent=1), flush=True)
        graphs = {"dense int8": art / "dense" / "model_int8.onnx"}
        result["mixes"] = []
        mixers = {None: mixer}
        for spec in specs:
            t0 = time.perf_counter()
            m = re.fullmatch(r"(?:s([0-9.]+)(?:t(\d+))?)?(?:k(\d+))?", spec)
            alpha, top, k = (float(m.group(1)) if m.group(1) else None), m.group(2), int(m.group(3) or 0)
            key = (alpha, top)
            if alpha is not None and key not in mixers:
                from cahp_deploy.export.int8.smoothing import smooth
                sm, sq = tmp / f"s{alpha}t{top}.onnx", tmp / f"s{alpha}t{top}_q.onnx"
                only = None if top is None else [r["name"] for r in sens[:int(top)]]
                onnx.save(smooth(fp32, [b.arrays for _, b in batches["tuning"][:32]], alpha, only=only)[0], str(sm))
                quant.quantize_int8(sm, sq, per_channel=True)
                mixers[key] = tuning.Mixer(onnx.load(str(sm)), onnx.load(str(sq)), names)
            mixer_ = mixers[key] if alpha is not None else mixer
            excluded = [r["name"] for r in sens[:k]]
            path = tmp / f"{spec}.onnx"
            onnx.save(mixer_.build(excluded), str(path))
            graphs[spec] = path
            row = {"spec": spec, "smooth_alpha": alpha, "k": k, "fp32_nodes": excluded,
                   "fp32_mac_share": round(sum(r["macs_share"] for r in sens[:k]), 4)}
            for split in splits:
                row[split] = judged(preds(path, split), split)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            result["mixes"].append(row)
            print(json.dumps(row), flush=True)
        timing = {f"threads={t or 'default'}": _speedups(time_graphs(graphs, shapes=((32, 128),), budget_s=40.0, threads=t))
                  for t in (1, None)}
        result["timing_b32x128_ms"] = timing
        print(json.dumps(timing, indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def _speedups(timings: dict[str, dict[str, float]]) -> dict:
    """{graph: {ms, speedup_vs_dense_int8}} from ``time_graphs``' medians at b32x128."""
    med = {k: t["b32x128"] for k, t in timings.items()}
    return {k: {"ms": round(v, 1), "speedup_vs_dense_int8": round(med["dense int8"] / v, 3)} for k, v in med.items()}


if __name__ == "__main__":
    main(*sys.argv[1:])
