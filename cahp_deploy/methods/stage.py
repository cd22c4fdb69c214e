"""The ``select`` stage: model + labelled data -> selection.json (+ the MSS curve as a PNG).

Everything the user can get wrong is checked before the model runs (output exists, unknown or
unavailable method, data, labels, budget); the outputs are written only at the end, each to a temp
sibling renamed into place, so an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from cahp_deploy import arch, distributed
from cahp_deploy.atomic import atomic_file, check_output_path
from cahp_deploy.data import check_labels, load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir
from cahp_deploy.methods import REGISTRY, MethodContext, needs_budget
from cahp_deploy.selection.result import Selection
from cahp_deploy.selection.topk import resolve_budget

#: ``--max-examples auto``: read the split until CAHP's selection is stable (cahp.collect_evidence)
AUTO = "auto"


def curve_path(out: str | os.PathLike) -> Path:
    """Where the MSS plot goes: ``selection.json`` -> ``selection_mss.png`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_mss.png")


def load_method(name: str):
    """The method's ``select`` callable; a one-line :class:`CahpError` if unknown or not installed."""
    if name not in REGISTRY:
        raise CahpError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    module = REGISTRY[name][0]
    try:
        return importlib.import_module(module).select
    except ModuleNotFoundError as e:
        if e.name == module:
            available = [m for m, (mod, _) in REGISTRY.items() if importlib.util.find_spec(mod) is not None]
            raise CahpError(
                f"method {name!r} is not available in this installation ({module} is missing); "
                f"available: {', '.join(available)}"
            ) from None
        raise


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _budget_from_file(path: str | os.PathLike, total: int) -> int:
    other = Selection.from_json(path)
    if other.num_heads_total != total:
        raise CahpError(
            f"--budget-from {path} was made for a model with {other.num_heads_total} heads; this one has {total}"
        )
    return other.num_heads_kept


def plot_mss_curve(selection: Selection, path: str | os.PathLike) -> None:
    """MSS(k), the fitted polynomial and the knee, as a PNG (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = sorted(selection.mss_curve)
    mss = [selection.mss_curve[k] for k in ks]
    knee = selection.details.get("knee", {})
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(ks, mss, "o", ms=3, color="tab:blue", label="MSS(k)")
    if knee.get("fitted"):
        ax.plot(ks, knee["fitted"], "-", color="tab:gray", lw=1,
                label=f"polynomial fit (degree {knee.get('degree_used')})")
    if selection.knee is not None:
        ax.axvline(selection.knee, color="tab:red", ls="--", lw=1,
                   label=f"k* = {selection.knee} ({knee.get('method', 'knee')})")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("mean simplified silhouette")
    ax.set_title(f"CAHP: {selection.num_heads_kept} of {selection.num_heads_total} heads kept")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _ffn_request(config, method: str, ffn_method: str | None, keep_ratio: float | None, neurons: int | None,
                 options: dict[str, Any]) -> dict[str, Any] | None:
    """The FFN part of a select call, validated before the model runs (None: heads only)."""
    from cahp_deploy.methods.ffn import check_method, needs_evidence
    from cahp_deploy.selection.neurons import resolve_neuron_budget

    if ffn_method is None and keep_ratio is None and neurons is None:
        return None
    ffn_method = ffn_method or ("cahp" if method == "cahp" else "gradient")
    n_layers, inter = arch.num_layers(config), arch.intermediate_size(config)
    allow_empty = bool(options.get("allow_empty_layers"))
    budget = resolve_neuron_budget(n_layers * inter, n_layers, neurons, keep_ratio, allow_empty)
    check_method(ffn_method, budget)
    feeds = needs_evidence(ffn_method) and getattr(importlib.import_module(REGISTRY[method][0]), "FEEDS_FFN", False)
    return {"method": ffn_method, "budget": budget, "layers": n_layers, "intermediate": inter,
            "allow_empty": allow_empty, "feeds": feeds, "keep_ratio": keep_ratio, "neurons": neurons}


def _ffn_collector(net, labelled):
    import numpy as np

    from cahp_deploy.signals.ffn import FfnCollector

    return FfnCollector(net, np.unique(labelled.labels))


def _select_ffn(selection: Selection, ffn: dict[str, Any], net, tokenizer, labelled, collector, seed: int,
                options: dict[str, Any], progress) -> None:
    """Choose the FFN neurons (evidence from the heads' pass when the method fed it) into ``selection``."""
    from cahp_deploy.methods.ffn import needs_evidence, select_neurons
    from cahp_deploy.signals.ffn import collect_ffn_stats

    t = time.perf_counter()
    stats = None
    if collector is not None:
        stats = collector.result()
        evidence_seconds = collector.seconds
        pass_shared = True
    elif needs_evidence(ffn["method"]):
        stats = collect_ffn_stats(net, tokenizer, labelled, fraction=float(options.get("salience_fraction") or 0.25),
                                  batch_size=int(options.get("batch_size") or 64),
                                  salience_batch_size=int(options.get("salience_batch_size") or 32),
                                  max_length=int(options.get("max_length") or 128), progress=progress)
        evidence_seconds = time.perf_counter() - t
        pass_shared = False
    else:
        evidence_seconds, pass_shared = 0.0, False
    kept, details = select_neurons(stats, ffn["method"], ffn["budget"], ffn["layers"], ffn["intermediate"], seed,
                                   allow_empty_layers=ffn["allow_empty"], degree=int(options.get("degree") or 6))
    details["timings"]["evidence"] = evidence_seconds
    details["evidence_pass"] = "shared with the heads" if pass_shared else ("own pass" if stats is not None else "none")
    details.update({"keep_ratio": ffn["keep_ratio"], "neurons": ffn["neurons"]})
    selection.kept_neurons = kept
    selection.neurons_per_layer = ffn["intermediate"]
    selection.ffn = details
    selection.timings["ffn"] = time.perf_counter() - t


def select(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "cahp",
    split: str = "train",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_examples: int | str | None = None,
    seed: int = 42,
    heads: int | None = None,
    keep_ratio: float | None = None,
    budget_from: str | os.PathLike | None = None,
    options: dict[str, Any] | None = None,
    force: bool = False,
    show_progress: bool | None = None,
    ffn_method: str | None = None,
    ffn_keep_ratio: float | None = None,
    ffn_neurons: int | None = None,
) -> Selection | None:
    """Select heads of ``model`` on ``data[split]`` with ``method``; write ``out`` and its MSS plot.

    ``max_examples``: the first N rows, or ``"auto"`` (CAHP only): read the split in chunks and stop
    once k* and the kept heads no longer change; the selection's ``details.stopped`` says where and why.
    ``options`` are method-specific (see each method module, e.g. :data:`cahp_deploy.methods.cahp.DEFAULTS`).
    FFN neurons are selected too when any of ``ffn_method`` / ``ffn_keep_ratio`` / ``ffn_neurons`` is
    given (``ffn_method`` defaults to ``cahp`` with ``method="cahp"``, else ``gradient``; CAHP without
    an amount finds one per layer from its knee). Returns the :class:`Selection` that was written.
    Launched as several ranks (torchrun), CAHP's
    evidence (heads and FFN neurons) is collected data-parallel (:mod:`cahp_deploy.distributed`); rank 0 writes and returns
    the selection, the other ranks write nothing and return None.
    """
    from cahp_deploy.modeling import is_pruned, load_classifier
    from cahp_deploy.progress import make_progress

    out = check_output_path(out, force)
    png = curve_path(out)
    run = load_method(method)
    if distributed.init_from_env() and method != "cahp":
        raise CahpError(f"--method {method} runs in one process only; launch it without torchrun (cahp is data-parallel)")
    auto = max_examples == AUTO
    if auto and method != "cahp":
        raise CahpError(f"--max-examples {AUTO} needs --method cahp (it stops once CAHP's selection is stable)")
    if auto and distributed.is_distributed():
        raise CahpError(f"--max-examples {AUTO} runs in one process only; launch it without torchrun")
    if not auto and max_examples is not None:
        try:
            max_examples = int(max_examples)
        except (TypeError, ValueError):
            raise CahpError(f"--max-examples must be a number of rows or {AUTO!r}, got {max_examples!r}") from None
        if max_examples < 1:
            raise CahpError(f"--max-examples must be at least 1, got {max_examples}")
    labelled = load_labelled(data, split, text_column=text_column, text_pair_column=text_pair_column,
                             label_column=label_column).head(None if auto else max_examples)
    net, tokenizer = load_classifier(model)
    if is_pruned(net.config):
        raise CahpError(f"{model} is already pruned; run select on the dense model it came from")
    from cahp_deploy.serving_length import check_max_length

    check_max_length((options or {}).get("max_length"), net.config)
    check_labels(labelled, int(net.config.num_labels), min_classes=2)
    n_layers, n_heads = arch.dense_head_grid(net.config)
    total = n_layers * n_heads
    from_file = _budget_from_file(budget_from, total) if budget_from is not None else None
    budget = resolve_budget(total, heads=heads, keep_ratio=keep_ratio, budget_from=from_file)
    if budget is None and needs_budget(method):
        raise CahpError(f"--method {method} needs a budget: give --heads, --keep-ratio or --budget-from")
    options = dict(options or {})
    if auto:
        options["auto"] = True
    ffn = _ffn_request(net.config, method, ffn_method, ffn_keep_ratio, ffn_neurons, options)

    start = time.perf_counter()
    quiet = not distributed.is_main() or show_progress is False
    with make_progress(disable=True if quiet else None if show_progress is None else not show_progress) as progress:
        feeds = ffn is not None and ffn["feeds"]
        with _ffn_collector(net, labelled) if feeds else contextlib.nullcontext() as collector:
            ctx = MethodContext(model=net, tokenizer=tokenizer, data=labelled, budget=budget, seed=int(seed),
                                options=options, progress=progress, ffn=collector)
            try:
                selection = run(ctx)
            except distributed.NotMainRank:  # its evidence is merged into rank 0's, which writes
                return None
        if ffn is not None:
            _select_ffn(selection, ffn, net, tokenizer, labelled, collector, int(seed), options, progress)
    selection.timings["total"] = time.perf_counter() - start
    selection.timings["peak_rss_mb"] = peak_rss_mb()
    selection.params.update({"max_examples": max_examples, "budget": budget})
    selection.provenance.update({
        "model": str(Path(model).resolve()) if Path(model).exists() else str(model),
        "model_sha256": sha256_dir(model) if Path(model).is_dir() else None,
        **labelled.provenance(),
        "world_size": distributed.world_size(),  # ranks whose passes made the evidence (launched: several)
    })

    existed = out.exists()
    with atomic_file(out, force=force) as tmp_json:
        selection.to_json(tmp_json)
        if selection.mss_curve:
            with atomic_file(png, force=True) as tmp_png:
                plot_mss_curve(selection, tmp_png)
        elif existed and png.exists():  # a stale curve beside a baseline selection would mislead
            png.unlink()
    return selection


__all__ = ["curve_path", "load_method", "peak_rss_mb", "plot_mss_curve", "select"]
