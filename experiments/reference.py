"""Regenerate the committed reference benchmark in experiments/results/.

For each reference classifier in ../shared/models (minilm-sst5, minilm-mnli: BERT, 6 layers x 12 heads)
it runs the user's path, stage by stage, through the ``cahp-deploy`` CLI::

    select --method cahp      (train split)               -> WORK/<model>/selection_cahp.json   (k* heads, the knee)
    select --method gradient  --budget-from cahp          -> WORK/<model>/selection_gradient.json (same head count)
    select --method random    --budget-from cahp          -> WORK/<model>/selection_random.json
    prune  (each selection)                               -> WORK/<model>/pruned_<method>/
    export dense + each pruned (fp32, optimized, INT8)    -> WORK/<model>/artifacts/{dense,cahp,gradient,random}/
    bench  cahp gradient random --baseline dense          -> experiments/results/<model>/run<r>/
           variants fp32/optimized/int8, batch 1 and 32, seq 128, real-traffic mode, accuracy on the
           evaluation split (sst5: validation; mnli: validation_matched)

and then writes experiments/results/reference.md: the reference table at batch 32 x seq 128 (the issue's
target cell) and the run-to-run variation between the bench repeats (``--repeats 2`` by default,
the same artifacts benchmarked twice, so the spread is the machine's, not the export's).

Intermediate models and artifacts go to --work (outside the repository by default; they are large
and reproducible); only the reports, the selections and reference.md are kept under --results.
A stage whose output already exists in --work is reused, so a rerun only re-benchmarks; --fresh
redoes everything.

Usage::

    python experiments/reference.py                                   # the committed results (quiet machine!)
    python experiments/reference.py --models minilm-sst5 --repeats 1  # one model, one bench run
    python experiments/reference.py --quick --results /tmp/ref-quick  # tiny end-to-end check of the plumbing

Run it on an otherwise idle machine: timings are only comparable within one report. Wall time on
2 CPU cores: ``--quick`` took 13 min (minilm-sst5) and 18 min (minilm-mnli) on a heavily shared
machine, mostly the 4 exports (2.5-5 min each; their parity check runs every variant on the
evaluation split). One bench run with the full settings below (12 sessions, 1101 sst5 examples)
took 5.5 min on the quiet machine. The full script, both models, 2 bench repeats: about 1-1.5 h.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

#: model -> (data dir, selection split, evaluation split)
MODELS = {
    "minilm-sst5": ("sst5", "train", "validation"),
    "minilm-mnli": ("mnli", "train", "validation_matched"),
}
METHODS = ("cahp", "gradient", "random")
SEED = 42
# INT8 with the export's defaults: it keeps the MatMuls quantization hurts most in fp32 until argmax
# agreement with fp32 meets the 99% gate, and measures per-channel and per-tensor scales and keeps
# the better. (Plain dynamic INT8 of MiniLM-sst5 agreed only 83.7% per-tensor / 93.5% per-channel,
# which is why earlier references forced per-channel and lowered the gate to 90%.) Each manifest
# records the gate, the scales chosen and the nodes left in fp32; bench reports the accuracy cost
# next to the speed.
INT8 = ["--quantize", "int8"]

FULL = {
    "export": [],  # the export times its fusion candidates on this machine and keeps the fastest
    "select_examples": 2000,  # CAHP/gradient statistics on the first 2000 training examples
    "bench": ["--variant", "fp32", "--variant", "optimized", "--variant", "int8", "--batch", "1,32", "--seq", "128",
              "--min-seconds", "3", "--min-reps", "20", "--warmup", "5", "--traffic-sequences", "512"],
    "eval_examples": {"minilm-sst5": None, "minilm-mnli": 2000},  # mnli: 2000 of 9815 pairs keeps accuracy at ~minutes
}
QUICK = {
    "export": ["--no-timing"],
    "select_examples": 64,
    "bench": ["--variant", "fp32", "--variant", "optimized", "--variant", "int8", "--batch", "1,4", "--seq", "32",
              "--min-seconds", "0", "--min-reps", "3", "--warmup", "1", "--traffic-sequences", "16"],
    "eval_examples": {"minilm-sst5": 64, "minilm-mnli": 64},
}


def cli(*args: str) -> None:
    """Run one ``cahp-deploy`` command, echoing it; stop the script when it fails."""
    cmd = [sys.executable, "-m", "cahp_deploy.commands.cli", *map(str, args)]
    print("$ cahp-deploy " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"reference: `cahp-deploy {args[0]}` failed (exit {proc.returncode})")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def stage(out: Path, fresh: bool, *args: str) -> None:
    """Run a stage unless its output exists (and --fresh was not given)."""
    if out.exists() and not fresh:
        print(f"reuse {out}", flush=True)
        return
    cli(*args, *(["--force"] if out.exists() else []))


def build_artifacts(model: str, work: Path, cfg: dict, fresh: bool) -> dict[str, Path]:
    """select -> prune -> export for dense and the three methods; returns {name: artifact dir}."""
    data_name, select_split, eval_split = MODELS[model]
    model_dir, data = SHARED / "models" / model, SHARED / "data" / data_name
    work.mkdir(parents=True, exist_ok=True)
    sel = {m: work / f"selection_{m}.json" for m in METHODS}
    common = ["--data", data, "--split", select_split, "--seed", str(SEED), "--max-examples", str(cfg["select_examples"])]
    stage(sel["cahp"], fresh, "select", model_dir, "--method", "cahp", "--out", sel["cahp"], *common)
    for m in METHODS[1:]:
        stage(sel[m], fresh, "select", model_dir, "--method", m, "--budget-from", sel["cahp"], "--out", sel[m], *common)
    arts = {"dense": work / "artifacts" / "dense"}
    export = ["--data", data, "--split", eval_split, *INT8, *cfg["export"]]
    stage(arts["dense"], fresh, "export", model_dir, "--out", arts["dense"], *export)
    for m in METHODS:
        pruned = work / f"pruned_{m}"
        stage(pruned, fresh, "prune", model_dir, "--selection", sel[m], "--out", pruned)
        arts[m] = work / "artifacts" / m
        stage(arts[m], fresh, "export", pruned, "--out", arts[m], *export)
    return arts


def run_bench(model: str, arts: dict[str, Path], out: Path, cfg: dict) -> None:
    data_name, _, eval_split = MODELS[model]
    n = cfg["eval_examples"][model]
    cli("bench", *(arts[m] for m in METHODS), "--baseline", arts["dense"], "--out", out,
        "--data", SHARED / "data" / data_name, "--split", eval_split, *cfg["bench"],
        *(["--max-examples", str(n)] if n else []), "--force")


# ------------------------------------------------------------------------------------------ summary


def _cell(rep: dict, artifact: str, variant: str, mode: str, batch: int, seq: int | None) -> dict | None:
    return next((c for c in rep["cells"] if c["artifact"] == artifact and c["variant"] == variant
                 and c["mode"] == mode and c["batch"] == batch and c["seq"] == seq), None)


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None else format(x, spec) + suffix


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def model_section(model: str, runs: list[dict]) -> list[str]:
    rep = runs[0]
    batch = max(rep["settings"]["batches"])
    seq = 128 if 128 in rep["settings"]["seqs"] else max(rep["settings"]["seqs"])
    m = rep["machine"]
    data = rep["settings"]["data"] or {}
    lines = [
        f"## {model}",
        "",
        f"Batch {batch} x seq {seq}, CPU ({m['cpu_model']}, {m['logical_cores']} logical cores, "
        f"onnxruntime {m['onnxruntime']}, intra-op threads: {m['threads']['intra_op_num_threads_meaning']}). "
        f"Accuracy on `{data.get('split')}` ({data.get('num_examples')} examples), through ONNX Runtime. "
        f"Speedups are paired medians against dense in the same run; run 1 of {len(runs)}.",
        "",
        "| method | variant | heads | params | size | p50 ms | p99 ms | seq/s | traffic seq/s | speedup vs dense same variant "
        "| speedup vs dense fp32 | FLOP ceiling | accuracy | Δ accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rep["artifacts"]:
        for v, info in a["variants"].items():
            c = _cell(rep, a["name"], v, "grid", batch, seq)
            t = _cell(rep, a["name"], v, "traffic", batch, None)
            lines.append(
                f"| {a['name']} | {v} | {a['num_heads_kept']}/{a['num_heads_total']} | {_fmt(a['params'] and a['params'] / 1e6, '.2f', ' M')} "
                f"| {_fmt(info['size_bytes'] / 1e6, '.1f', ' MB')} | {_fmt(c and c['p50_ms'], '.1f')} | {_fmt(c and c['p99_ms'], '.1f')} "
                f"| {_fmt(c and c['throughput_seq_per_s'], '.0f')} | {_fmt(t and t['throughput_seq_per_s'], '.0f')} "
                f"| {_fmt(c and c['speedup_vs_baseline_same_variant'], '.2f', 'x')} | {_fmt(c and c['speedup_vs_baseline_fp32'], '.2f', 'x')} "
                f"| {a['flop_ceiling_speedup']:.2f}x | {_fmt(_pct(info.get('accuracy')), '.1f', '%')} "
                f"| {_fmt(_pct(info.get('accuracy_change_vs_baseline_fp32')), '+.1f', ' pp')} |"
            )
    cahp = _cell(rep, "cahp", "fp32", "grid", batch, seq)
    cahp_int8 = _cell(rep, "cahp", "int8", "grid", batch, seq)
    ceiling = next((a["flop_ceiling_speedup"] for a in rep["artifacts"] if a["name"] == "cahp"), None)
    lines += ["", "Targets (issue 6):", ""]
    if cahp:
        s = cahp["speedup_vs_baseline_same_variant"]
        lines.append(f"- CAHP knee, fp32, batch {batch} x seq {seq}: speedup {s:.2f}x vs FLOP ceiling {ceiling:.2f}x: "
                     + ("**met**" if s >= ceiling else f"**not met** ({100 * s / ceiling:.0f}% of the ceiling)"))
    if cahp_int8:
        s = cahp_int8["speedup_vs_baseline_fp32"]
        lines.append(f"- CAHP knee + INT8 vs dense fp32: {s:.2f}x (product goal 3x: {'met' if s >= 3 else 'not met'})")
    if len(runs) > 1:
        lines += ["", *variation(runs)]
    lines.append("")
    return lines


def variation(runs: list[dict]) -> list[str]:
    """Run-to-run spread: relative p50 difference and speedup difference per cell, run 1 vs run 2."""
    a, b = runs[0], runs[1]
    p50, speed = [], []
    for c in a["cells"]:
        d = _cell(b, c["artifact"], c["variant"], c["mode"], c["batch"], c["seq"])
        if d is None:
            continue
        p50.append(abs(d["p50_ms"] - c["p50_ms"]) / c["p50_ms"])
        if c["artifact"] != a["baseline"]:
            speed.append(abs(d["speedup_vs_baseline_fp32"] - c["speedup_vs_baseline_fp32"]))
    med = sorted(p50)[len(p50) // 2]
    lines = [f"Variation between run 1 and run 2 over {len(p50)} cells: p50 latency differs by a median "
             f"{100 * med:.1f}% (max {100 * max(p50):.1f}%)"]
    if speed:
        lines[0] += (f"; speedup vs dense fp32 differs by a median {sorted(speed)[len(speed) // 2]:.3f} "
                     f"(max {max(speed):.3f})")
    lines[0] += "."
    return lines


def write_summary(results: Path, models: list[str]) -> None:
    lines = ["# Reference benchmark", "",
             "Regenerate with `python experiments/reference.py` (see its docstring). Full reports, per run: "
             "`<model>/run<r>/report.md`; selections: `<model>/selections/`.", ""]
    for model in models:
        runs = [json.loads((d / "report.json").read_text()) for d in sorted((results / model).glob("run*")) if (d / "report.json").exists()]
        if runs:
            lines += model_section(model, runs)
    (results / "reference.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results / 'reference.md'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results", help="where reports and reference.md go")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cahp-deploy-reference",
                   help="intermediate selections, pruned models and artifacts (reused across runs)")
    p.add_argument("--repeats", type=int, default=2, help="bench runs per model (the variation needs 2)")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the plumbing, numbers mean nothing")
    p.add_argument("--fresh", action="store_true", help="redo select/prune/export even if their outputs exist")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [one per physical core]")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"reference: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    for m in models:
        if not (SHARED / "models" / m).is_dir():
            sys.exit(f"reference: {SHARED / 'models' / m} not found; this script needs ../shared beside the repository")
    cfg = dict(QUICK if args.quick else FULL)
    if args.threads:
        cfg["bench"] = [*cfg["bench"], "--threads", str(args.threads)]
    work = args.work / ("quick" if args.quick else "full")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    for model in models:
        arts = build_artifacts(model, work / model, cfg, args.fresh)
        dest = args.results / model
        (dest / "selections").mkdir(parents=True, exist_ok=True)
        for m in METHODS:
            shutil.copy2(work / model / f"selection_{m}.json", dest / "selections" / f"{m}.json")
        for r in range(1, args.repeats + 1):
            run_bench(model, arts, dest / f"run{r}", cfg)
    write_summary(args.results, [m for m in MODELS if (args.results / m).is_dir()])
    print(f"reference: done in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
