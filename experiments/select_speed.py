"""Regenerate experiments/results/select_speed/: how fast `select` (CAHP) runs, phase by phase, and what it keeps.

Issue 18's target: all 8,544 sst5 train rows in <= 30 s wall on 2 CPU cores with the same selection
quality (k* within 1, head-masked validation accuracy within 0.5 points). This times
:func:`cahp_deploy.methods.stage.select` end to end (data and model loading included, Python and
library imports excluded). Each phase is timed from outside, by wrapping the library function that
does it (wall *and* CPU seconds: on a shared 2-core machine a wall time means little without the CPU
time and the load average beside it); a phase whose function does not exist in this version is
simply absent. Peak resident memory comes from psutil (and ru_maxrss, the same figure select records).

With ``--accuracy`` the kept heads are also scored: head-masked accuracy on the validation split
(:func:`cahp_deploy.evaluation.masked_accuracy`), outside the timed region.

Usage: python experiments/select_speed.py [--model minilm-sst5] [--data sst5] [--threads 2]
       [--max-examples N|auto] [--accuracy] [--out experiments/results/select_speed/<name>.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch

from cahp_deploy.methods.stage import select

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TARGET_SECONDS = 30.0

#: (module, attribute, phase): the functions that do each phase, in any version that has them.
PHASES = [
    ("cahp_deploy.methods.stage", "load_labelled", "load_data"),
    ("cahp_deploy.modeling", "load_classifier", "load_model"),
    ("cahp_deploy.signals.salience", "head_salience", "salience_pass"),
    ("cahp_deploy.signals.signatures", "collect_signatures", "signature_pass"),
    ("cahp_deploy.signals.evidence", "collect_head_evidence", "evidence_pass"),
    ("cahp_deploy.methods.cahp", "jm_profiles", "jm_profiles"),
    ("cahp_deploy.methods.cahp", "clustering_space", "embedding"),
    ("cahp_deploy.methods.cahp", "mss_sweep", "sweep"),
    ("cahp_deploy.methods.stage", "sha256_dir", "hash_model"),
    ("cahp_deploy.methods.stage", "plot_mss_curve", "plot"),
]


def _instrument(clock: dict[str, list[float]]) -> None:
    """Wrap each phase function so that its wall and CPU seconds add up in ``clock[phase]``."""
    for module_name, attr, phase in PHASES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        fn = getattr(module, attr, None)
        if fn is None:
            continue

        def timed(*args, _fn=fn, _phase=phase, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                slot = clock.setdefault(_phase, [0.0, 0.0])
                slot[0] += time.perf_counter() - w
                slot[1] += time.process_time() - c

        setattr(module, attr, functools.wraps(fn)(timed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sst5", help="a folder under ../shared/models")
    parser.add_argument("--data", default="sst5", help="a folder under ../shared/data")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is 2 cores)")
    parser.add_argument("--max-examples", default=None, help="N or auto; default: the whole train split")
    parser.add_argument("--accuracy", action="store_true", help="also the head-masked accuracy of the kept set")
    parser.add_argument("--label", default=None, help="a name for this run (default: model and rows)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="precision of the model's evidence passes (select --precision)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, data = SHARED / "models" / args.model, SHARED / "data" / args.data
    if not model.exists() or not data.exists():
        raise SystemExit(f"needs {model} and {data}")
    max_examples = None if args.max_examples is None else (
        args.max_examples if args.max_examples == "auto" else int(args.max_examples))
    label = args.label or f"{args.model}_{args.max_examples or 'all'}"
    out = args.out or ROOT / "experiments" / "results" / "select_speed" / f"{label}.json"
    torch.set_num_threads(args.threads)
    clock: dict[str, list[float]] = {}
    _instrument(clock)
    proc = psutil.Process()

    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sel = select(model, data, Path(tmp) / "selection.json", split="train",
                     max_examples=max_examples, seed=42, show_progress=False,
                     options={"precision": args.precision})
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    load_after = os.getloadavg()
    mem = proc.memory_info()
    peak_rss = getattr(mem, "peak_wset", None) or sel.timings["peak_rss_mb"]

    phases = {k: {"wall": round(w, 2), "cpu": round(c, 2)} for k, (w, c) in clock.items()}
    record = {
        "what": f"cahp-deploy select (CAHP, defaults) on {args.model}, {args.data} train",
        "label": label,
        "max_examples": args.max_examples,
        "num_examples": sel.provenance["num_examples"],
        "examples_used": sel.details.get("examples_used", sel.provenance["num_examples"]),
        "stopped": sel.details.get("stopped"),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "target_wall_seconds": TARGET_SECONDS,
        "within_target": wall <= TARGET_SECONDS,
        "phases": phases,
        "selection_timings": {k: round(v, 2) for k, v in sel.timings.items()},
        "peak_rss_mb": peak_rss,
        "rss_end_mb": round(mem.rss / 2**20, 1),
        "precision": sel.params.get("precision", args.precision),
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
    if args.accuracy:
        from cahp_deploy.data import load_labelled
        from cahp_deploy.evaluation import accuracy, masked_accuracy
        from cahp_deploy.modeling import load_classifier

        net, tok = load_classifier(model, attn_implementation="sdpa")
        val = load_labelled(data, args.eval_split)
        t = time.perf_counter()
        record["accuracy"] = {
            "split": args.eval_split,
            "rows": len(val),
            "dense": round(accuracy(net, tok, val), 4),
            "kept": round(masked_accuracy(net, tok, val, sel.kept_heads), 4),
            "seconds": round(time.perf_counter() - t, 1),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record.get(k) for k in ("label", "examples_used", "stopped", "wall_seconds", "cpu_seconds",
                                                 "phases", "peak_rss_mb", "knee", "num_heads_kept", "accuracy")},
                     indent=1))
    print(f"load average before/after: {record['machine']['loadavg_before']} / {record['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()
