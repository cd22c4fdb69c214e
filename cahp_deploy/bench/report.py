"""report.json (everything, machine-readable) and report.md (the same numbers, readable alone)."""

from __future__ import annotations

import json
from pathlib import Path

from cahp_deploy import schema
from cahp_deploy.formatting import percent

DEFINITIONS = {
    "speedup": "median over interleaved rounds of (baseline latency / this latency), same inputs in the same round",
    "speedup_vs_baseline_same_variant": "against the baseline's file of the same variant (pruned int8 vs dense int8)",
    "speedup_vs_baseline_fp32": "against the baseline's plain fp32 export (what a naive deployment runs)",
    "flop_ceiling_speedup": "dense MACs / pruned MACs at seq 128 (pruning.json); 1.0 for a dense artifact",
    "share_of_flop_ceiling": "speedup_vs_baseline_same_variant / flop_ceiling_speedup",
    "throughput_seq_per_s": "sequences run / seconds timed (per cell)",
    "latency": "milliseconds per batch (one session.run), p50/p90/p99 over the timed repetitions",
    "rss_growth_bytes": "peak host RSS growth while the session was created and ran its first (largest) batch",
    "device_memory_bytes": "growth of GPU memory in use over the same span (None on CPU)",
    "accuracy": "ONNX Runtime predictions of that very file on the labelled split",
    "agreement": "share of examples on which the prediction equals the baseline's (fp32, or same variant)",
    "traffic": "batches drawn at random (fixed seed) from the split, padded to each batch's longest sequence",
}


def build(*, arts, sessions, cells, scores, params, machine_info, settings, notes, seconds, created) -> dict:
    """Assemble the report dict (schema ``cahp-deploy/report/1``)."""
    artifacts = []
    for a in arts:
        entry = a.describe()
        entry["params"] = params.get(a.name)
        entry["variants"] = {}
        for name, variant, info in sessions:
            if name == a.name:
                entry["variants"][variant] = {**info, **scores.get((name, variant), {})}
        artifacts.append(entry)
    return {
        "schema": schema.REPORT,
        "created": created,
        "seconds": seconds,
        "baseline": arts[0].name,
        "machine": machine_info,
        "settings": settings,
        "definitions": DEFINITIONS,
        "artifacts": artifacts,
        "cells": cells,
        "notes": notes,
    }


def headline_cell(rep: dict) -> tuple[int, int]:
    """The cell the summary table quotes: largest batch at seq 128 (or the longest seq timed)."""
    seqs, batches = rep["settings"]["seqs"], rep["settings"]["batches"]
    return max(batches), (128 if 128 in seqs else max(seqs))


def write(rep: dict, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(rep, indent=2, allow_nan=True) + "\n")
    (directory / "report.md").write_text(to_markdown(rep))


# ---------------------------------------------------------------- markdown


def _f(x, digits: int = 2, suffix: str = "") -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}{suffix}"


def _x(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _mb(x) -> str:
    return "—" if x is None else f"{x / 1e6:.1f} MB"


def _params(x) -> str:
    return "—" if x is None else f"{x / 1e6:.2f} M"


def _heads(a: dict) -> str:
    kept, total = a.get("num_heads_kept"), a.get("num_heads_total")
    if kept is None:
        return "—"
    n_kept, n_total = a.get("num_neurons_kept"), a.get("num_neurons_total")
    ffn = f", FFN {n_kept}/{n_total}" if n_kept is not None and n_kept != n_total else ""
    return f"{kept}/{total}{ffn}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _variants_in_order(rep: dict) -> list[str]:
    from cahp_deploy.bench.artifacts import VARIANTS

    seen = {v for a in rep["artifacts"] for v in a["variants"]}
    return [v for v in VARIANTS if v in seen]


def _header_lines(rep: dict, arts: dict) -> list[str]:
    """The title, the machine, the settings, how to read the numbers."""
    m, s = rep["machine"], rep["settings"]
    base = rep["baseline"]
    threads = m.get("threads", {})
    data = s.get("data")
    lines = [
        "# cahp-deploy benchmark",
        "",
        f"Baseline: **{base}** (`{arts[base]['path']}`), timed in the same run, interleaved with every other session.",
        "",
        f"- Machine: {m['cpu_model']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores "
        f"({m.get('cores_usable')} usable), {_f(m['memory_bytes'] / 2**30, 1)} GiB RAM, {m['os']}",
        f"- ONNX Runtime {m['onnxruntime']} ({m['onnxruntime_package']}), provider `{s['provider']}` "
        f"({', '.join(s['ort_providers'])}), IO binding: {'yes' if s['io_binding'] else 'no'}"
        + (f", GPU: {'; '.join(m['gpus'])}" if m.get("gpus") else ""),
        f"- Threads: intra-op {threads.get('intra_op_num_threads')} ({threads.get('intra_op_num_threads_meaning')}), "
        f"inter-op {threads.get('inter_op_num_threads')}, spinning {'on' if threads.get('allow_spinning') else 'off'}; "
        f"load average at start {m.get('load_average_start')}, end {m.get('load_average_end')}",
        f"- Grid: batch {s['batches']} x seq {s['seqs']}; per cell {s['warmup']} warm-up runs, then at least "
        f"{s['min_reps']} repetitions and {s['min_seconds']} s of timed work per session, sessions interleaved round-robin",
        "- Data: "
        + (
            f"`{data['data']}` [{data['split']}], {data['num_examples']} examples (accuracy, up to "
            f"{s['accuracy_max_length']} tokens)"
            + (f"; real traffic: {s['traffic_sequences']} sequences drawn per batch size (seed {s['seed']})" if s["traffic"] else "")
            if data
            else "none (no accuracy, no real-traffic mode)"
        ),
        f"- Run took {_f(rep['seconds'], 0)} s; created {rep['created']}",
        "",
        "Speedup = median over rounds of baseline latency / this latency (paired, same round). "
        "FLOP ceiling = dense / pruned MACs at seq 128, the speedup head pruning alone could give. "
        "Δ accuracy is in percentage points against the baseline's fp32 file.",
        "",
    ]
    return lines


def _summary_lines(rep: dict, arts: dict) -> list[str]:
    """The headline cell: every variant of every artifact, one table."""
    hb, hs = headline_cell(rep)
    lines = [f"## Summary at batch {hb} x seq {hs}", ""]
    rows = []
    grid = [c for c in rep["cells"] if c["mode"] == "grid"]
    for v in _variants_in_order(rep):
        for name, a in arts.items():
            if v not in a["variants"]:
                continue
            info = a["variants"][v]
            c = next((c for c in grid if c["artifact"] == name and c["variant"] == v and c["batch"] == hb and c["seq"] == hs), None)
            rows.append(
                [
                    v, name + (" (baseline)" if a["baseline"] else "") + (" (recommended)" if a.get("recommended") == v else ""), _heads(a), _params(a["params"]), _mb(info["size_bytes"]),
                    _f(c and c["p50_ms"]), _f(c and c["p99_ms"]), _f(c and c["throughput_seq_per_s"], 1),
                    _x(c and c["speedup_vs_baseline_same_variant"]), _x(c and c["speedup_vs_baseline_fp32"]),
                    _x(a["flop_ceiling_speedup"]), percent(info.get("accuracy")),
                    percent(info.get("accuracy_change_vs_baseline_fp32"), " pp", signed=True),
                ]
            )
    lines += _table(
        ["variant", "artifact", "heads kept", "params", "size", "p50 ms", "p99 ms", "seq/s",
         "speedup (same variant)", "speedup vs baseline fp32", "FLOP ceiling", "accuracy", "Δ accuracy"],
        rows,
    )
    lines.append("")
    return lines


def _variant_lines(rep: dict, arts: dict, v: str) -> list[str]:
    """One variant: its models, its fixed grid, its real traffic."""
    grid = [c for c in rep["cells"] if c["mode"] == "grid"]
    lines = [f"## Variant {v}", "", "### Models", ""]
    rows = []
    for name, a in arts.items():
        info = a["variants"].get(v)
        if info is None:
            continue
        row = [
            name, _heads(a), _params(a["params"]), _mb(info["size_bytes"]), _f(info["session_create_s"], 3),
            _mb(info["rss_growth_bytes"]), _mb(info.get("device_memory_bytes")),
            percent(info.get("accuracy")), percent(info.get("accuracy_change_vs_baseline_fp32"), " pp", signed=True),
            percent(info.get("agreement_with_baseline_fp32")), percent(info.get("int8_mac_share")),
        ]
        if v != "fp32":
            row += [
                percent(info.get("accuracy_change_vs_baseline_same_variant"), " pp", signed=True),
                percent(info.get("agreement_with_baseline_same_variant")),
            ]
        rows.append(row)
    header = ["artifact", "heads kept", "params", "size", "session s", "RSS growth", "GPU memory", "accuracy",
              "Δ acc vs base fp32", "agrees w/ base fp32", "MACs in INT8"]
    if v != "fp32":
        header += [f"Δ acc vs base {v}", f"agrees w/ base {v}"]
    lines += _table(header, rows)
    # For fp32 "same variant" and "fp32" are one baseline file: one speedup column, not two.
    speedups = ["speedup vs base fp32"] if v == "fp32" else [f"speedup vs base {v}", "speedup vs base fp32"]

    def speedup_cols(c: dict) -> list[str]:
        cols = [_x(c["speedup_vs_baseline_same_variant"])] if v != "fp32" else []
        return cols + [_x(c["speedup_vs_baseline_fp32"])]

    lines += ["", "### Fixed grid", ""]
    rows = [
        [
            c["artifact"], str(c["batch"]), str(c["seq"]), _f(c["p50_ms"]), _f(c["p90_ms"]), _f(c["p99_ms"]),
            f"{c['mean_ms']:.2f} ± {c['std_ms']:.2f}", str(c["reps"]), _f(c["throughput_seq_per_s"], 1),
            *speedup_cols(c), _x(c["flop_ceiling_speedup"]), percent(c["share_of_flop_ceiling"]),
        ]
        for c in grid
        if c["variant"] == v
    ]
    lines += _table(
        ["artifact", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "reps", "seq/s",
         *speedups, "FLOP ceiling", "share of ceiling"],
        rows,
    )
    traffic = [c for c in rep["cells"] if c["mode"] == "traffic" and c["variant"] == v]
    if traffic:
        lines += ["", f"### Real traffic (random batches from the data, padded per batch, up to {traffic[0]['max_length']} tokens)", ""]
        rows = [
            [
                c["artifact"], str(c["batch"]), _f(c["mean_padded_length"], 1), _f(c["mean_tokens_per_sequence"], 1),
                _f(c["p50_ms"]), _f(c["p90_ms"]), _f(c["p99_ms"]), str(c["reps"]), _f(c["throughput_seq_per_s"], 1),
                *speedup_cols(c),
            ]
            for c in traffic
        ]
        lines += _table(
            ["artifact", "batch", "mean padded length", "mean tokens/seq", "p50 ms/batch", "p90 ms/batch",
             "p99 ms/batch", "batches timed", "seq/s", *speedups],
            rows,
        )
    lines.append("")
    return lines


def to_markdown(rep: dict) -> str:
    arts = {a["name"]: a for a in rep["artifacts"]}
    lines = _header_lines(rep, arts) + _summary_lines(rep, arts)
    for v in _variants_in_order(rep):
        lines += _variant_lines(rep, arts, v)
    if rep["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)
