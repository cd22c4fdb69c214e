"""The report's two plots, drawn from report.json alone (so they can be redrawn later).

Uses matplotlib's object API (``Figure``) rather than pyplot: no global state, no GUI backend, safe
inside a library call.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from cahp_deploy.bench.report import _variants_in_order, headline_cell

_MARKERS = {"fp32": "o", "optimized": "s", "int8": "^", "fp16": "D"}
_STYLES = ("-", "--", ":", "-.")


def latency_vs_batch(rep: dict, path: Path) -> None:
    """p50 latency (with a bar up to p99) against batch size: one panel per variant, one line per
    artifact and seq length."""
    variants = _variants_in_order(rep)
    grid = [c for c in rep["cells"] if c["mode"] == "grid"]
    seqs = rep["settings"]["seqs"]
    names = [a["name"] for a in rep["artifacts"]]
    fig = Figure(figsize=(5 * len(variants), 4), layout="constrained")
    axes = fig.subplots(1, len(variants), squeeze=False)[0]
    for ax, v in zip(axes, variants):
        for i, name in enumerate(names):
            for j, s in enumerate(seqs):
                pts = sorted((c["batch"], c["p50_ms"], c["p99_ms"]) for c in grid if c["artifact"] == name and c["variant"] == v and c["seq"] == s)
                if not pts:
                    continue
                b, p50, p99 = zip(*pts)
                ax.errorbar(
                    b, p50, yerr=[[0] * len(p50), [hi - lo for lo, hi in zip(p50, p99)]],
                    color=f"C{i % 10}", linestyle=_STYLES[j % len(_STYLES)], marker=_MARKERS.get(v, "o"),
                    capsize=2, label=f"{name}, seq {s}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(rep["settings"]["batches"], labels=[str(b) for b in rep["settings"]["batches"]])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch, p50 (bar to p99), ms")
        ax.set_title(f"{v} ({rep['settings']['provider']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=110)


def accuracy_vs_speedup(rep: dict, path: Path) -> None:
    """Accuracy against speedup over the baseline's fp32 file at the headline cell."""
    hb, hs = headline_cell(rep)
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    cells = {(c["artifact"], c["variant"]): c for c in rep["cells"] if c["mode"] == "grid" and c["batch"] == hb and c["seq"] == hs}
    plotted = 0
    for i, a in enumerate(rep["artifacts"]):
        for v in _variants_in_order(rep):
            info, c = a["variants"].get(v), cells.get((a["name"], v))
            if info is None or c is None or info.get("accuracy") is None:
                continue
            x, y = c["speedup_vs_baseline_fp32"], 100 * info["accuracy"]
            ax.scatter([x], [y], color=f"C{i % 10}", marker=_MARKERS.get(v, "o"), s=50, label=f"{a['name']} {v}")
            plotted += 1
    if plotted == 0:
        ax.text(0.5, 0.5, "accuracy not measured (no --data)", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize="x-small")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"speedup vs baseline fp32 (batch {hb} x seq {hs}, p50, paired)")
    ax.set_ylabel("accuracy, %")
    ax.set_title("accuracy vs speedup")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)
