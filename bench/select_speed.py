"""Regenerate bench/results/select_speed.json: how fast `select` (CAHP) runs on minilm-sst5.

The issue's target: all 8,544 sst5 train rows, under 60 s wall on 2 CPU cores, peak memory reported.
This times :func:`cahp_deploy.methods.runner.select` end to end (data and model loading included,
Python and library imports excluded) and records the result's own split into signatures / salience
/ embedding / sweep, the CPU time, the peak resident memory and the machine's load, because a
timing taken on a shared machine means little without it.

Usage: python bench/select_speed.py [--threads 2] [--max-examples N] [--out bench/results/select_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from cahp_deploy.methods.runner import select

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "minilm-sst5"
DATA = SHARED / "data" / "sst5"
OUT = ROOT / "bench" / "results" / "select_speed.json"
TARGET_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is 2 cores)")
    parser.add_argument("--max-examples", type=int, default=None, help="default: the whole train split")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not MODEL.exists() or not DATA.exists():
        raise SystemExit(f"needs {MODEL} and {DATA}")
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sel = select(MODEL, DATA, Path(tmp) / "selection.json", split="train",
                     max_examples=args.max_examples, seed=42, show_progress=False)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    load_after = os.getloadavg()

    phases = {k: round(v, 2) for k, v in sel.timings.items() if k != "peak_rss_mb"}
    record = {
        "what": "cahp-deploy select (CAHP, defaults) on minilm-sst5, sst5 train",
        "num_examples": sel.provenance["num_examples"],
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "target_wall_seconds": TARGET_SECONDS,
        "within_target": wall < TARGET_SECONDS,
        "phases_seconds": phases,
        "outside_phases_seconds": round(wall - sum(phases.get(k, 0.0) for k in
                                                   ("signatures", "salience", "embedding", "sweep")), 2),
        "peak_rss_mb": sel.timings["peak_rss_mb"],
        "knee": sel.knee,
        "num_heads_kept": sel.num_heads_kept,
        "kept_heads": sel.kept_heads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("num_examples", "wall_seconds", "cpu_seconds", "phases_seconds",
                                             "peak_rss_mb", "knee", "num_heads_kept")}, indent=2))
    print(f"load average before/after: {record['machine']['loadavg_before']} / {record['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()
