"""The floor under `select`'s wall time on this machine: the matmuls its passes cannot skip, at the
best fp32 GEMM throughput the CPU reaches (issue 18's 30 s target, measured against arithmetic).

1. Counts the multiply-accumulates of CAHP's evidence passes over all sst5 train rows, as `select`
   runs them: length-bucketed batches (no padding), the salience rows (the first quarter) through a
   full forward and an input-gradient backward (weights frozen: no weight-gradient matmuls), the
   other rows through a forward that stops after the last layer's attention maps.
2. Times torch's fp32 GEMM at the passes' shapes (tokens x 384 x 1152/1536, 1536 x 384) on every
   core, and divides.
3. With ``--hybrid``: the selection with the signature pass under bf16 autocast and the salience pass
   in fp32 (the half of the work that moved the selection least is an open question): k*, kept heads,
   head-masked validation accuracy, wall.

Usage: python experiments/select_floor.py [--hybrid] [--out experiments/results/select_speed/floor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL, DATA = SHARED / "models" / "minilm-sst5", SHARED / "data" / "sst5"


def pass_macs(lengths: list[int], hidden: int, inter: int, layers: int, salience_fraction: float = 0.25) -> dict:
    """Multiply-accumulates of the evidence passes for rows of these token lengths."""
    per_token = 4 * hidden * hidden + 2 * hidden * inter  # Q, K, V, O + the FFN's two matmuls
    n_sal = max(1, int(salience_fraction * len(lengths)))
    sal_tokens, rest_tokens = sum(lengths[:n_sal]), sum(lengths[n_sal:])
    attention = sum(2 * n * n * hidden for n in lengths[:n_sal]) * layers * 2 \
        + sum(2 * n * n * hidden for n in lengths[n_sal:]) * layers
    return {
        "salience_linear": sal_tokens * layers * per_token * 2,  # forward + input-gradient backward
        "signature_linear": rest_tokens * ((layers - 1) * per_token + 3 * hidden * hidden),  # stops at the last maps
        "attention": attention,
    }


def gemm_gflops(tokens: int, shapes: list[tuple[int, int]], seconds: float = 1.0) -> dict:
    """fp32 GEMM throughput of (tokens x k) @ (k x n), every core, best of a timed loop per shape."""
    out = {}
    for k, n in shapes:
        a, b = torch.randn(tokens, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        out[f"{tokens}x{k}x{n}"] = 2 * tokens * k * n * reps / (time.perf_counter() - start) / 1e9
    return out


def hybrid_selection() -> dict:
    """`select` with the signature pass under bf16 autocast and the salience pass in fp32."""
    import cahp_deploy.signals.signatures as signatures
    from cahp_deploy.data import load_labelled
    from cahp_deploy.evaluation import masked_accuracy
    from cahp_deploy.methods.stage import select
    from cahp_deploy.modeling import load_classifier

    plain = signatures.collect_signatures

    def bf16_signatures(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(*args, **kwargs)

    signatures.collect_signatures = bf16_signatures  # select imports it at call time
    try:
        start, cpu = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            sel = select(str(MODEL), str(DATA), f"{tmp}/selection.json", seed=42, show_progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        signatures.collect_signatures = plain
    net, tok = load_classifier(MODEL)
    acc = masked_accuracy(net, tok, load_labelled(DATA, "validation"), sel.kept_heads)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "k_star": sel.knee,
            "heads_kept": sum(len(h) for h in sel.kept_heads), "kept_heads": sel.kept_heads,
            "masked_accuracy_validation": round(acc, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hybrid", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "select_speed" / "floor.json"))
    args = ap.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from cahp_deploy.data import load_labelled

    cfg = AutoConfig.from_pretrained(MODEL)
    tok = AutoTokenizer.from_pretrained(MODEL)
    rows = load_labelled(DATA, "train")
    lengths = [len(ids) for ids in tok(rows.texts, truncation=True, max_length=128)["input_ids"]]
    macs = pass_macs(lengths, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    total = sum(macs.values())
    tokens = 32 * round(sum(lengths) / len(lengths))  # a 32-row batch of average length
    gflops = gemm_gflops(tokens, [(cfg.hidden_size, 3 * cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size),
                                  (cfg.intermediate_size, cfg.hidden_size)])
    best = max(gflops.values())
    record = {
        "rows": len(lengths), "tokens": sum(lengths), "threads": torch.get_num_threads(),
        "macs": macs, "total_macs": total, "gemm_gflops_fp32": {k: round(v, 1) for k, v in gflops.items()},
        "floor_seconds_at_best_gemm": round(2 * total / (best * 1e9), 1),
        "load_avg": list(os.getloadavg()),
    }
    if args.hybrid:
        record["hybrid_bf16_signatures_fp32_salience"] = hybrid_selection()
    print(json.dumps(record, indent=2))
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
