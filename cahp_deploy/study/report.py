"""What a study writes: study.json, study.md (the tables a reader checks) and three plots.

Plots use matplotlib's Agg canvas directly (no pyplot state), like the select stage's MSS plot:

* ``accuracy_vs_heads.png``: accuracy against heads kept, one line per method (random: mean over
  seeds, bars from min to max), before and after recovery, with the dense accuracy as a line;
* ``kept_heads_heatmap.png``: heads kept per layer, one row per method, one panel per budget: the
  layer profile behind "CAHP keeps intermediate layers, gradient keeps those near the output";
* ``mss_curve.png``: CAHP's MSS curve with its fitted polynomial and the knee.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy.atomic import atomic_file
from cahp_deploy.formatting import percent

FILES = ("study.json", "study.md", "accuracy_vs_heads.png", "kept_heads_heatmap.png", "mss_curve.png")


def _entry(stats: dict | None, budget_heads: int) -> str:
    if stats is None:
        return "–"
    text = percent(stats["mean"], unit="", missing="–")
    if stats["n"] > 1:
        text += f" ± {100 * stats['std']:.1f}"
    if round(stats["heads"]) != budget_heads:  # CAHP's cut at a budget may keep fewer heads
        text += f" [{stats['heads']:g}]"
    return text


def accuracy_table(result: dict, phase: str, split: str) -> list[str]:
    """Markdown rows: one per method, one column per budget, best mean per column in bold."""
    table = result["summary"].get(phase, {}).get(split)
    if not table:
        return []
    budgets = result["budgets"]
    header = "| method | " + " | ".join(f"{b['label']} ({b['heads']} heads)" for b in budgets) + " |"
    lines = [header, "|---" * (len(budgets) + 1) + "|"]
    best = {}
    for b in budgets:
        means = [t[b["label"]]["mean"] for t in table.values() if b["label"] in t]
        best[b["label"]] = max(means) if means else None
    for method in result["methods"]["run"]:
        row = table.get(method, {})
        cells = []
        for b in budgets:
            stats = row.get(b["label"])
            text = _entry(stats, b["heads"])
            if stats is not None and best[b["label"]] is not None and stats["mean"] >= best[b["label"]] - 1e-12:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def sensitivity_lines(sens: dict | None) -> list[str]:
    if not sens:
        return ["CAHP was not part of this study: no knee sensitivity."]
    lines: list[str] = []
    for space in ("tsne", "full"):
        block = sens.get(space)
        if not block:
            continue
        d = block["default"]
        lines += [
            f"### {'t-SNE' if space == 'tsne' else 'full'} space (reference: degree {d['degree']}, seed {d['seed']}: "
            f"k* = {d['k_star']}, {d['heads_kept']} heads kept)",
            "",
            "| variant | k* | knee rule | heads kept | heads per layer | Jaccard vs reference |",
            "|---|---|---|---|---|---|",
        ]
        for row in block["degree"]:
            lines.append(f"| degree {row['degree']} | {row['k_star']} | {row['knee_method']} | {row['heads_kept']} | "
                         f"{row['heads_per_layer_kept']} | {row['jaccard_vs_default']:.2f} |")
        for row in block["seed"]:
            lines.append(f"| seed {row['seed']} | {row['k_star']} | {row['knee_method']} | {row['heads_kept']} | "
                         f"{row['heads_per_layer_kept']} | {row['jaccard_vs_default']:.2f} |")
        ks = [r["k_star"] for r in block["degree"]] + [r["k_star"] for r in block["seed"]]
        js = [r["jaccard_vs_default"] for r in block["degree"] + block["seed"]]
        lines += ["", f"k* ranges over {min(ks)}..{max(ks)}; Jaccard overlap with the reference "
                      f"{min(js):.2f}..{max(js):.2f} (mean {np.mean(js):.2f}).", ""]
    if sens.get("jaccard_between_space_defaults") is not None:
        lines.append(f"Jaccard overlap of the t-SNE and full-space reference selections: "
                     f"{sens['jaccard_between_space_defaults']:.2f}.")
    return lines


def layer_profile_lines(result: dict) -> list[str]:
    layers = result["num_layers"]
    lines = ["| method | budget | heads kept | " + " | ".join(f"L{i}" for i in range(layers)) + " |",
             "|---" * (layers + 3) + "|"]
    groups: dict[tuple[str, str], list[list[int]]] = {}
    for c in result["cells"]:
        if not c.get("error"):
            groups.setdefault((c["method"], c["budget"]), []).append(c["heads_per_layer_kept"])
    order = [b["label"] for b in result["budgets"]]
    for (method, budget), rows in sorted(groups.items(), key=lambda kv: (order.index(kv[0][1]), kv[0][0])):
        mean = np.mean(rows, axis=0)
        vals = " | ".join(f"{v:g}" for v in np.round(mean, 1))
        lines.append(f"| {method} | {budget} | {np.sum(mean):g} | {vals} |")
    return lines


def markdown(result: dict) -> str:
    cfg, n, sp = result["config"], result["num_examples"], result["splits"]
    dense = result["dense"]
    t = result["timings"]
    lines = [f"# Head-selection study: `{Path(result['model']).name}` on `{Path(result['data']).name}`", ""]
    if cfg.get("note"):
        lines += [f"> **{cfg['note']}**", ""]
    dense_text = f"{percent(dense['eval'], unit='', missing='–')}% on `{sp['eval']}`"
    if "test" in dense:
        dense_text += f", {percent(dense['test'], unit='', missing='–')}% on `{sp['test']}`"
    lines += [
        f"- Model: `{result['model']}` ({result['num_layers']} layers x {result['heads_per_layer']} heads = "
        f"{result['num_heads_total']}); dense accuracy {dense_text}.",
        f"- Selection on `{sp['select']}` ({n['select']} examples); evaluation on `{sp['eval']}` ({n['eval']} examples)"
        + (f"; final table on `{sp['test']}` ({n['test']} examples)." if sp["test"] else "."),
        "- Heads removed *before* recovery: gated to zero on the dense model (identical to physical removal, "
        "checked by the pruning tests). Recovery: a physically pruned copy fine-tuned for "
        f"{cfg['recover_epochs']} epoch(s) on {n['recover']} examples of `{sp['select']}` (AdamW, lr "
        f"{cfg['recover_lr']:g}, batch {cfg['recover_batch_size']})." if cfg["recover"] else
        "- Heads removed by gating (identical to physical removal, checked by the pruning tests); no recovery.",
        "- Cells: accuracy in %; random = mean ± std over seeds "
        f"{cfg['random_seeds']}; `[n]` = heads actually kept when a method keeps fewer than the budget; "
        "best per column in bold.",
    ]
    if result["knee"]:
        kn = result["knee"]
        lines.append(f"- CAHP knee: k* = {kn['k']} clusters ({kn['method']}), {kn['heads_kept']} heads kept "
                     "after the one-head-per-layer guard: the `knee` column.")
    if result["methods"]["skipped"]:
        lines.append("- Skipped: " + "; ".join(f"{m} ({why})" for m, why in result["methods"]["skipped"].items()))
    errors = [c for c in result["cells"] if c.get("error")]
    if errors:
        lines.append("- Cells that failed: " + "; ".join(f"{c['method']} @ {c['budget']}: {c['error']}" for c in errors))
    lines.append("")
    lines += [f"## Accuracy before recovery (`{sp['eval']}`)", ""] + accuracy_table(result, "before", "eval") + [""]
    if cfg["recover"]:
        lines += [f"## Accuracy after recovery (`{sp['eval']}`)", ""] + accuracy_table(result, "after", "eval") + [""]
    if sp["test"]:
        lines += [f"## Final table (`{sp['test']}`): before recovery", ""] + accuracy_table(result, "before", "test") + [""]
        if cfg["recover"]:
            lines += [f"## Final table (`{sp['test']}`): after recovery", ""] + accuracy_table(result, "after", "test") + [""]
    lines += ["## Knee sensitivity", ""] + sensitivity_lines(result["sensitivity"]) + [""]
    lines += ["## Kept heads per layer", "", "Mean over seeds; L0 is the layer nearest the embeddings.", ""]
    lines += layer_profile_lines(result) + [""]
    cost = result["cost"]
    lines += [
        "## Cost",
        "",
        f"- Wall time {t['total'] / 60:.1f} min (cells {t.get('cells', 0) / 60:.1f} min, CAHP evidence "
        f"{t.get('cahp_evidence', 0):.0f} s, knee sensitivity {t.get('sensitivity', 0):.0f} s) with "
        f"{cost['torch_threads']} torch thread(s); cached cells count as their load time.",
    ]
    if cost["recovery_seconds_per_example_epoch"]:
        lines.append(f"- Recovery: {1000 * cost['recovery_seconds_per_example_epoch']:.1f} ms per example per epoch "
                     f"(median over cells).")
    if cost["eval_seconds_per_example"]:
        lines.append(f"- Evaluation: {1000 * cost['eval_seconds_per_example']:.2f} ms per example.")
    if result.get("command"):
        lines += ["", "## Reproduce", "", "```", result["command"], "```"]
    lines += ["", "Plots: `accuracy_vs_heads.png`, `kept_heads_heatmap.png`, `mss_curve.png`. Raw numbers: `study.json`.", ""]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(result: dict, path: str | os.PathLike) -> None:
    phases = ["before"] + (["after"] if result["config"]["recover"] else [])
    fig = _figure(6.0 * len(phases), 4.2)
    split = "eval"
    for i, phase in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), i + 1)
        table = result["summary"].get(phase, {}).get(split, {})
        for method in result["methods"]["run"]:
            pts = sorted((s["heads"], s["mean"], s["min"], s["max"], b) for b, s in table.get(method, {}).items())
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [100 * p[1] for p in pts]
            err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
            line = ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=method)
            for p in pts:
                if p[4] == "knee":
                    ax.plot([p[0]], [100 * p[1]], marker="*", ms=12, color=line[0].get_color(), mec="black", mew=0.5)
        ax.axhline(100 * result["dense"][split], color="black", ls="--", lw=1, label="dense")
        ax.set_xlabel(f"heads kept (of {result['num_heads_total']})")
        ax.set_ylabel(f"accuracy on {result['splits']['eval']} (%)")
        ax.set_title(f"{phase} recovery" + ("  (★ = CAHP knee budget)" if result["knee"] else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_heatmap(result: dict, path: str | os.PathLike) -> None:
    budgets = [b["label"] for b in result["budgets"]]
    methods = result["methods"]["run"]
    layers = result["num_layers"]
    fig = _figure(max(4.0, 2.4 * len(budgets)), 0.45 * len(methods) + 1.6)
    for i, budget in enumerate(budgets):
        ax = fig.add_subplot(1, len(budgets), i + 1)
        grid = np.full((len(methods), layers), np.nan)
        for r, method in enumerate(methods):
            rows = [c["heads_per_layer_kept"] for c in result["cells"]
                    if c["method"] == method and c["budget"] == budget and not c.get("error")]
            if rows:
                grid[r] = np.mean(rows, axis=0)
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=result["heads_per_layer"], aspect="auto")
        for r in range(len(methods)):
            for c in range(layers):
                if not np.isnan(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.3g}", ha="center", va="center", fontsize=6,
                            color="white" if grid[r, c] < result["heads_per_layer"] / 2 else "black")
        ax.set_xticks(range(layers), [str(x) for x in range(layers)], fontsize=7)
        ax.set_yticks(range(len(methods)), methods if i == 0 else [""] * len(methods), fontsize=7)
        head = next(b for b in result["budgets"] if b["label"] == budget)["heads"]
        ax.set_title(f"{budget} ({head} heads)", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
    fig.suptitle("heads kept per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_outputs(out: str | os.PathLike, result: dict[str, Any], knee_selection=None) -> None:
    """Write study.json, study.md and the plots into ``out``, each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "study.md") as tmp:
        tmp.write_text(markdown(result))
    with atomic_file(out / "accuracy_vs_heads.png") as tmp:
        plot_accuracy(result, tmp)
    with atomic_file(out / "kept_heads_heatmap.png") as tmp:
        plot_heatmap(result, tmp)
    if knee_selection is not None:
        from cahp_deploy.methods.stage import plot_mss_curve

        with atomic_file(out / "mss_curve.png") as tmp:
            plot_mss_curve(knee_selection, tmp)
    # study.json last: its presence marks a finished study
    with atomic_file(out / "study.json") as tmp:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


__all__ = ["FILES", "accuracy_table", "markdown", "plot_accuracy", "plot_heatmap", "write_outputs"]
