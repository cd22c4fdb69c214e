"""The latency lines of the model card, taken from a ``cahp-deploy bench`` report (never measured here).

The report's artifact entry is matched to the handed-off artifact by its manifest's identity (source
model sha256, selection sha256, kept heads), not by path: reports are often made on another machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cahp_deploy import schema
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_file


def _identity(d: dict) -> tuple:
    return (d.get("source_model_sha256"), d.get("selection_sha256"), json.dumps(d.get("kept_heads")))


def latency(report: str | os.PathLike, manifest: dict, variant: str) -> dict:
    """{report, sha256, machine, artifact, cells: [{mode, batch, seq, p50_ms, p99_ms, speedup...}]}."""
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise CahpError(f"--bench-report {report}: no report.json there; make one with `cahp-deploy bench`")
    try:
        rep = json.loads(path.read_text())
    except ValueError as e:
        raise CahpError(f"--bench-report {path} is not valid JSON ({e})") from e
    schema.check_schema(rep, schema.REPORT, str(path))
    match = [a for a in rep.get("artifacts", []) if _identity(a) == _identity(manifest)]
    if not match:
        names = ", ".join(a.get("name", "?") for a in rep.get("artifacts", []))
        raise CahpError(f"--bench-report {path} has no artifact from the same source model, selection and kept heads "
                        f"as this one (it has {names}); bench this artifact first")
    name = match[0]["name"]
    cells = [{k: c.get(k) for k in ("mode", "batch", "seq", "p50_ms", "p99_ms", "throughput_seq_per_s",
                                    "speedup_vs_baseline_same_variant", "speedup_vs_baseline_fp32")}
             for c in rep.get("cells", []) if c.get("artifact") == name and c.get("variant") == variant]
    if not cells:
        raise CahpError(f"--bench-report {path} did not time variant {variant} of {name}; bench it or pass --variant")
    m = rep.get("machine", {})
    machine = {k: m.get(k) for k in ("cpu_model", "physical_cores", "memory_bytes", "os", "onnxruntime", "provider",
                                     "gpus", "load_average_start", "load_average_end")}
    machine["threads"] = (m.get("threads") or {}).get("intra_op_num_threads_meaning")
    return {"report": str(path), "sha256": sha256_file(path), "artifact": name, "baseline": rep.get("baseline"),
            "machine": machine, "cells": cells}


def card_lines(bench: dict) -> list[str]:
    m = bench["machine"]
    lines = [f"- From `{bench['report']}` (sha256 `{bench['sha256'][:16]}…`), artifact `{bench['artifact']}` vs "
             f"baseline `{bench['baseline']}`. Machine: {m['cpu_model']}, {m['physical_cores']} cores, "
             f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB, {m['os']}, onnxruntime {m['onnxruntime']} ({m['provider']}"
             f"{', GPUs ' + ', '.join(m['gpus']) if m.get('gpus') else ''}), threads: {m['threads']}; load average "
             f"{m['load_average_start']} -> {m['load_average_end']}.",
             "", "| mode | batch | seq | p50 ms | p99 ms | seq/s | speedup (same variant) | speedup vs baseline fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for c in bench["cells"]:
        f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        lines.append(f"| {c['mode']} | {c['batch']} | {c['seq'] or '-'} | {f(c['p50_ms'])} | {f(c['p99_ms'])} | "
                     f"{f(c['throughput_seq_per_s'], 1)} | x{f(c['speedup_vs_baseline_same_variant'])} | "
                     f"x{f(c['speedup_vs_baseline_fp32'])} |")
    return lines
