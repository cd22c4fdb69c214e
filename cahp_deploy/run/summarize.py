"""The run's summary: dense vs pruned, read back from the files the stages wrote (report.json, the
recovery records, search.json, confirm.json), and the table ``run`` and ``demo`` print.

The words of ``summary.md`` are :mod:`cahp_deploy.run.summary`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cahp_deploy.run.record import REPORT_DIR, RUN_FILE, SEARCH_DIR


def budgets_on(record: dict[str, Any]) -> list[float]:
    """The budgets asked of the decision rows of the latest budget run in this OUT, in order."""
    asked = record.get("budgets_asked") or []
    if not asked:
        return []
    rows = asked[-1]["decision_rows_sha256"]
    return [a["max_drop_points"] for a in asked if a["decision_rows_sha256"] == rows]


def _read(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _recovery_summary(final_model: Path) -> dict[str, Any] | None:
    """What recovered the exported model: the refit (refit.json), the fine-tune (recovery.json), or both."""
    refit_path, path = final_model / "refit.json", final_model / "recovery.json"
    refit = None
    if refit_path.is_file():
        r = _read(refit_path)
        refit = {"rows": (r.get("calibration") or {}).get("num_examples"),
                 "split": (r.get("calibration") or {}).get("split"), "seconds": r.get("total_seconds")}
    if not path.is_file():
        return None if refit is None else {"accuracy_before": None, "accuracy_after": None, "epochs": None,
                                           "refit": refit}
    r = _read(path)
    return {
        "accuracy_before": r.get("accuracy_before"), "accuracy_after": r.get("accuracy_after"),
        "epochs": (r.get("params") or {}).get("epochs"), "train": r.get("train"), "eval": r.get("eval"),
        "distilled": r.get("distill_from") is not None, "seconds": r.get("total_seconds"), "refit": refit,
    }


def _search_summary(out: Path) -> dict[str, Any] | None:
    path = out / SEARCH_DIR / "search.json"
    if not path.is_file():
        return None
    r = _read(path)
    keys = ("dense_accuracy", "max_drop_points", "threshold", "chosen_k", "candidates_k", "tried", "seconds", "knee",
            "confidence", "ffn_keep_ratio", "stopped_at", "ladder", "ladder_rungs", "neuron_multiple")
    return {k: r.get(k) for k in keys} | {"plot": f"{SEARCH_DIR}/tradeoff.png"}


def summarize(out: str | os.PathLike, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dense vs pruned per variant, from report.json: heads, params, size, p50 per grid cell, accuracy;
    plus, from ``record`` (run.json), the splits, the recovery and the budget search."""
    out = Path(out)
    record = record if record is not None else (_read(out / RUN_FILE) if (out / RUN_FILE).is_file() else {})
    report = _read(out / REPORT_DIR / "report.json")
    grid = [c for c in report.get("cells", []) if c.get("mode") == "grid"]
    shapes = sorted({(c["batch"], c["seq"]) for c in grid})
    rows = []
    for a in report.get("artifacts", []):
        for variant, info in a.get("variants", {}).items():
            cells = {
                f"{c['batch']}x{c['seq']}": c for c in grid if c["artifact"] == a["name"] and c["variant"] == variant
            }
            rows.append({
                "artifact": a["name"],
                "baseline": bool(a.get("baseline")),
                "variant": variant,
                "heads_kept": a.get("num_heads_kept"),
                "heads_total": a.get("num_heads_total"),
                "neurons_kept": a.get("num_neurons_kept"),
                "neurons_total": a.get("num_neurons_total"),
                "params": a.get("params"),
                "bytes": info.get("size_bytes"),
                "p50_ms": {k: c.get("p50_ms") for k, c in cells.items()},
                "speedup_same_variant": {k: c.get("speedup_vs_baseline_same_variant") for k, c in cells.items()},
                "speedup_vs_dense_fp32": {k: c.get("speedup_vs_baseline_fp32") for k, c in cells.items()},
                "flop_ceiling_speedup": a.get("flop_ceiling_speedup"),
                "accuracy": info.get("accuracy"),
                "accuracy_change": info.get("accuracy_change_vs_baseline_fp32"),
            })
    data = (report.get("settings") or {}).get("data") or {}
    final = record.get("final_model")
    searched = "search" in record.get("stages", {})
    return {
        "model": record.get("model"),
        "method": record.get("method"),
        "shapes": [f"{b}x{q}" for b, q in shapes],
        "eval_split": data.get("split"),
        "eval_examples": data.get("num_examples"),
        "select_split": record.get("select_split"),
        "recover_split": record.get("recover_split"),
        "final_model": final,
        "recovery": _recovery_summary(out / final) if final else None,
        "search": _search_summary(out) if searched else None,
        "confirm": _read(out / "confirm.json") if "confirm" in record.get("stages", {}) and (out / "confirm.json").is_file() else None,
        "max_length": record.get("max_length"),
        "power": record.get("power") if searched else None,
        "budgets_asked": budgets_on(record) if searched else [],
        "int8_gate_failed": sorted(record.get("int8_gate_failed") or {}),
        "distill_warning": record.get("distill_warning") if searched else None,
        "rows": rows,
    }


def print_result(result: dict[str, Any], console=None) -> None:
    """What `run` and `demo` print: the answer in words, the table, where the reports are."""
    from cahp_deploy.run.summary import headline

    console = console or summary_console()
    for line in headline(result["summary"]):
        console.print(line, highlight=False)
    print_summary(result["summary"], console)
    console.print(f"summary: {result['summary_md']}", highlight=False)
    console.print(f"report: {result['report']}", highlight=False)


def summary_console():
    """stdout; when it is not a terminal (a log, a pipe) wide enough that no column is cut."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def print_summary(summary: dict[str, Any], console) -> None:
    """The dense-vs-pruned table a user reads first (report.md has every number).

    Kept narrow enough for an 80-column terminal: short headers, the definitions in the caption.
    """
    from rich import box
    from rich.table import Table

    def num(x, fmt, suffix=""):
        return "-" if x is None else format(x, fmt) + suffix

    shapes = summary["shapes"]
    speed_shape = shapes[-1] if shapes else None
    split = summary.get("eval_split")
    caption = ["ms BxS: median ms per batch at batch x seq",
               f"speedup: vs dense, same variant, at {speed_shape}"]
    if split:
        caption.append(f"acc: on {split} ({summary.get('eval_examples')} examples)")
        caption.append("Δ acc: points vs dense fp32")
    table = Table(title="dense vs pruned", caption="\n".join(caption), box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False)
    for col in ("model", "variant"):
        table.add_column(col, no_wrap=True)
    for col in ("heads", "params", "MB", *(f"ms {s}" for s in shapes), "speedup", "acc", "Δ acc"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in summary["rows"]:
        total = r["heads_total"]
        kept = r["heads_kept"] if r["heads_kept"] is not None else total
        speed = r["speedup_same_variant"].get(speed_shape) if speed_shape else None
        table.add_row(
            r["artifact"], r["variant"],
            "-" if total is None else f"{kept}/{total}",
            num(None if r["params"] is None else r["params"] / 1e6, ".1f", "M"),
            num(None if r["bytes"] is None else r["bytes"] / 2**20, ".1f"),
            *(num(r["p50_ms"].get(s), ".1f") for s in shapes),
            num(speed, ".2f", "x"),
            num(None if r["accuracy"] is None else 100 * r["accuracy"], ".1f", "%"),
            num(None if r["accuracy_change"] is None else 100 * r["accuracy_change"], "+.1f"),
        )
    console.print(table)


__all__ = ["budgets_on", "print_result", "print_summary", "summarize", "summary_console"]
