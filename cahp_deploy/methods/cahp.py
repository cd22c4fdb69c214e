"""CAHP (Livertovsky, Somin & Singer, arXiv 2606.19150): keep one head per cluster of complementary heads.

Two phases, so other stages can re-cut at another k without re-running the model:

::

    collect_evidence(ctx) ─► CahpEvidence            signatures ─► JM profiles ─► t-SNE (or full space)
                                                      ─► FasterPAM + MSS for k = 2..N-1 ─► knee k*
                                                      + gradient salience
    select_at(evidence, k, ctx) ─► Selection          clusters at k ─► one representative each ─► guard

``select(ctx)`` is ``select_at(collect_evidence(ctx), k*)``. ``ctx.options["k"]`` forces k; a budget
(``--heads`` / ``--keep-ratio`` / ``--budget-from``) picks the largest k whose selection, guard
included, keeps at most that many heads.

Options (``ctx.options``; defaults in :data:`DEFAULTS`): ``degree`` (knee polynomial), ``pool_size``
(B), ``space`` (``tsne`` | ``full``), ``representative`` (``salience`` | ``medoid``),
``salience_fraction``, ``allow_empty_layers``, ``k``, ``batch_size`` and ``max_length`` (signature
pass), ``salience_batch_size``, ``auto`` (``--max-examples auto``: read the split in chunks of
``auto_chunk`` rows and stop once the selection is stable, see :func:`collect_evidence`),
``auto_patience`` and ``auto_overlap``, ``precision`` of the model's passes (``auto`` | ``bf16`` |
``fp32``, :mod:`cahp_deploy.signals.precision`; the resolved one is recorded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cahp_deploy import arch, distributed
from cahp_deploy.errors import CahpError
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.selection.clustering import Clustering, Sweep, distance_matrix, fasterpam, mss_sweep
from cahp_deploy.selection.embedding import SPACES, clustering_space, tsne_perplexity
from cahp_deploy.selection.knee import DEFAULT_DEGREE, Knee, find_knee
from cahp_deploy.selection.representatives import (
    REPRESENTATIVES,
    cluster_representatives,
    guard_layers,
    split_by_layer,
    to_layer_head,
)
from cahp_deploy.selection.result import Selection
from cahp_deploy.selection.separability import class_pairs, jm_profiles
from cahp_deploy.signals.precision import check_precision

#: CAHP's passes over the data also feed ``ctx.ffn`` (FFN neuron evidence), see MethodContext.
FEEDS_FFN = True

DEFAULTS: dict[str, Any] = {
    "degree": DEFAULT_DEGREE,
    "pool_size": 32,
    "precision": "fp32",
    "space": "tsne",
    "representative": "salience",
    "salience_fraction": 0.25,
    "allow_empty_layers": False,
    "k": None,
    "batch_size": 64,
    "max_length": 128,
    "salience_batch_size": 32,
    "auto": False,
    "auto_chunk": 1024,
    "auto_patience": 2,
    "auto_overlap": 0.8,
}


def cahp_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and every value checked; a :class:`CahpError` names the bad one."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in (options or {}).items() if k in DEFAULTS and v is not None})
    if int(opts["degree"]) < 0:
        raise CahpError(f"--degree must be 0 (no smoothing) or more, got {opts['degree']}")
    opts["degree"] = int(opts["degree"])
    for name in ("pool_size", "batch_size", "max_length", "salience_batch_size", "auto_chunk", "auto_patience"):
        if int(opts[name]) < 1:
            raise CahpError(f"--{name.replace('_', '-')} must be at least 1, got {opts[name]}")
        opts[name] = int(opts[name])
    if opts["space"] not in SPACES:
        raise CahpError(f"--space must be one of {', '.join(SPACES)}, got {opts['space']!r}")
    if opts["representative"] not in REPRESENTATIVES:
        raise CahpError(f"--representative must be one of {', '.join(REPRESENTATIVES)}, got {opts['representative']!r}")
    if not 0.0 < float(opts["salience_fraction"]) <= 1.0:
        raise CahpError(f"--salience-fraction must be in (0, 1], got {opts['salience_fraction']}")
    opts["salience_fraction"] = float(opts["salience_fraction"])
    opts["allow_empty_layers"] = bool(opts["allow_empty_layers"])
    opts["auto"] = bool(opts["auto"])
    if not 0.0 < float(opts["auto_overlap"]) <= 1.0:
        raise CahpError(f"auto_overlap must be in (0, 1], got {opts['auto_overlap']}")
    opts["auto_overlap"] = float(opts["auto_overlap"])
    check_precision(opts["precision"])
    return opts


@dataclass
class CahpEvidence:
    """Everything CAHP learned about the heads; enough to cut at any k without the model.

    ``profiles`` (N, P*D) JM profiles; ``points`` the (N, dims) clustering space; ``distances`` (N, N);
    ``salience`` (N,) normalised gradient salience or None (medoid representatives without the guard);
    ``sweep`` the MSS curve and its clusterings; ``knee`` k* and how it was found.
    """

    heads_per_layer: list[int]
    classes: list[int]
    class_counts: list[int]
    profiles: np.ndarray
    points: np.ndarray
    distances: np.ndarray
    salience: np.ndarray | None
    sweep: Sweep
    knee: Knee
    seed: int
    options: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    ffn: Any = None  # FfnStats from the same passes, when a collector was attached (ctx.ffn)
    stopped: dict[str, Any] | None = None  # --max-examples auto: where reading stopped and why

    @property
    def num_heads(self) -> int:
        return int(sum(self.heads_per_layer))

    def clustering(self, k: int) -> Clustering:
        """The clustering at k: from the sweep when computed there, else FasterPAM now (same seed)."""
        if not 1 <= k <= self.num_heads:
            raise CahpError(f"k must be between 1 and {self.num_heads} heads, got {k}")
        c = self.sweep.clusterings.get(k)
        if c is None:
            c = fasterpam(self.distances, k, self.seed)
            self.sweep.clusterings[k] = c
        return c


def collect_evidence(ctx: MethodContext) -> CahpEvidence:
    """Run the model once (signatures, salience) and do all of CAHP up to the knee.

    With ``options["auto"]`` the split is read in chunks of ``auto_chunk`` rows and reading stops once
    the selection is stable (:func:`_read_until_stable`); ``evidence.stopped`` says where and why.
    """
    from cahp_deploy.signals.precision import evidence_precision, resolve_precision
    from cahp_deploy.signals.signatures import SignatureCollector

    opts = cahp_options(ctx.options)
    heads = arch.heads_per_layer(ctx.model)
    n = sum(heads)
    if n < 3:
        raise CahpError(f"CAHP needs at least 3 heads to cluster, the model has {n}; keep them all")
    classes = np.unique(ctx.data.labels)
    if len(classes) < 2:
        raise CahpError("CAHP compares classes: the data needs at least 2 classes")
    collector = SignatureCollector(heads, classes, opts["pool_size"])
    device = next(ctx.model.parameters()).device.type
    opts["precision"] = resolve_precision(opts["precision"], device)
    with evidence_precision(opts["precision"], device):  # the model's passes only; statistics stay float64
        if opts["auto"]:
            return _read_until_stable(ctx, opts, collector, heads)
        return _evidence_passes(ctx, opts, collector, heads)


def _evidence_passes(ctx: MethodContext, opts: dict[str, Any], collector, heads: list[int]) -> CahpEvidence:
    """One pass over the split: salience rows (whose forward also feeds signatures), then the rest."""
    from cahp_deploy.signals.salience import head_salience, head_salience_over_ranks, salience_examples
    from cahp_deploy.signals.signatures import collect_signatures

    timings: dict[str, float] = {}

    # One forward pass per row. Salience first: its forward pass also feeds the signatures of the
    # examples it sees, so those need no second forward. Time spent pooling them is counted under
    # "signatures".
    t = time.perf_counter()
    salience = None
    rest = ctx.data
    if _needs_salience(opts):
        n_sal = salience_examples(len(ctx.data), opts["salience_fraction"])
        salience_fn = head_salience_over_ranks if distributed.is_distributed() else head_salience
        salience = salience_fn(ctx.model, ctx.tokenizer, ctx.data.head(n_sal), fraction=1.0,
                               batch_size=opts["salience_batch_size"], max_length=opts["max_length"],
                               progress=ctx.progress, attention_sink=collector.add, ffn=ctx.ffn)
        rest = ctx.data.subset(np.arange(n_sal, len(ctx.data)))
    # Data-parallel (torchrun): each rank pools its own whole batches; the identity in one process.
    rest = distributed.shard_examples(rest, ctx.tokenizer, opts["batch_size"], opts["max_length"])
    pooled_during_salience = collector.seconds
    timings["salience"] = time.perf_counter() - t - pooled_during_salience

    t = time.perf_counter()
    stats = collect_signatures(ctx.model, ctx.tokenizer, rest, batch_size=opts["batch_size"],
                               max_length=opts["max_length"], progress=ctx.progress, collector=collector, ffn=ctx.ffn)
    if distributed.is_distributed():  # exact merge of every rank's statistics; only rank 0 goes on
        distributed.merge_welford([collector.acc])
        if ctx.ffn is not None:  # the FFN neurons' moments and salience, from the same sharded passes
            ctx.ffn.merge_over_ranks()
        stats = collector.result()
        if not distributed.is_main():
            raise distributed.NotMainRank
    timings["signatures"] = time.perf_counter() - t + pooled_during_salience
    return _cluster(stats, salience, heads, opts, ctx.seed, ctx.progress, timings,
                    ffn=ctx.ffn.result() if ctx.ffn is not None else None)


def _needs_salience(opts: dict[str, Any]) -> bool:
    """Salience picks the representatives, and the guard needs it to rescue an emptied layer."""
    return opts["representative"] == "salience" or not opts["allow_empty_layers"]


def _cluster(stats, salience: np.ndarray | None, heads: list[int], opts: dict[str, Any], seed: int, progress,
             timings: dict[str, float], ffn: Any = None) -> CahpEvidence:
    """Statistics -> JM profiles -> clustering space -> MSS sweep -> knee: the model-free rest of CAHP."""
    n = sum(heads)
    t = time.perf_counter()
    profiles = jm_profiles(stats.mean, stats.var, stats.counts)
    points = clustering_space(profiles, opts["space"], seed)
    timings["embedding"] = timings.get("embedding", 0.0) + time.perf_counter() - t

    t = time.perf_counter()
    distances = distance_matrix(points)
    task = progress.add_task("MSS sweep", total=n - 2) if progress is not None else None
    sweep = mss_sweep(distances, seed, on_step=(lambda k: progress.advance(task)) if task is not None else None)
    if task is not None:
        progress.update(task, completed=n - 2)
    knee = find_knee(sweep.ks, sweep.mss, opts["degree"])
    timings["sweep"] = timings.get("sweep", 0.0) + time.perf_counter() - t

    return CahpEvidence(
        heads_per_layer=list(heads),
        classes=[int(c) for c in stats.classes],
        class_counts=[int(c) for c in stats.counts],
        profiles=profiles,
        points=points,
        distances=distances,
        salience=salience,
        sweep=sweep,
        knee=knee,
        seed=int(seed),
        options=opts,
        timings=timings,
        ffn=ffn,
    )


def _overlap(a: tuple[int, frozenset] | None, b: tuple[int, frozenset]) -> float | None:
    """Shared kept heads of two checks over the larger kept set (1.0: identical); None without ``a``."""
    if a is None:
        return None
    return len(a[1] & b[1]) / max(len(a[1]), len(b[1]), 1)


def _read_until_stable(ctx: MethodContext, opts: dict[str, Any], collector, heads: list[int]) -> CahpEvidence:
    """``--max-examples auto``: read chunk after chunk, stop once the selection stops changing.

    Each chunk of ``auto_chunk`` rows (in data order) is read as the whole split is otherwise: its
    first ``salience_fraction`` through the salience pass (whose forward also feeds the signatures),
    the rest through the signature pass. After each chunk the whole of CAHP is redone on the
    statistics so far (~0.5 s for 72 heads, small next to a chunk's passes); reading stops when
    the selection has been stable over ``auto_patience`` consecutive chunks: each time k* moved by at
    most 1 and the kept heads overlap the previous check's by at least ``auto_overlap`` (shared
    heads / the larger set; 1.0 asks for the identical set). Exact equality is too strict in
    practice: the kept set moves by a few heads from one chunk to the next while k* stays put
    (DESIGN.md, "Measurements behind the code"). Checks start once
    every class has two rows (a variance needs them). The evidence returned is the last check's, so the selection written is
    exactly the one found stable. Salience rows differ from a whole-split run (the first fraction of
    every chunk read, not of the split), so reading to the end may cut slightly differently.
    """
    from cahp_deploy.signals.salience import head_salience, min_max_normalise, salience_examples
    from cahp_deploy.signals.signatures import collect_signatures

    if distributed.is_distributed():
        raise CahpError("--max-examples auto runs in one process only; launch it without torchrun")
    total, chunk, patience = len(ctx.data), opts["auto_chunk"], opts["auto_patience"]
    timings = {"salience": 0.0, "signatures": 0.0, "embedding": 0.0, "sweep": 0.0}
    salience_sum = np.zeros(sum(heads))
    salience_rows = 0
    history: list[dict[str, Any]] = []
    previous, same, evidence, prev_mean = None, 0, None, None
    why = "the split ran out before the selection was stable"
    read = 0
    for start in range(0, total, chunk):
        part = ctx.data.subset(np.arange(start, min(start + chunk, total)))
        read += len(part)
        t, pooled_before = time.perf_counter(), collector.seconds
        rest = part
        if _needs_salience(opts):
            n_sal = salience_examples(len(part), opts["salience_fraction"])
            mean = head_salience(ctx.model, ctx.tokenizer, part.head(n_sal), fraction=1.0,
                                 batch_size=opts["salience_batch_size"], max_length=opts["max_length"],
                                 normalise=False, progress=ctx.progress, attention_sink=collector.add, ffn=ctx.ffn)
            salience_sum += mean * n_sal
            salience_rows += n_sal
            rest = part.subset(np.arange(n_sal, len(part)))
        pooled = collector.seconds - pooled_before
        timings["salience"] += time.perf_counter() - t - pooled
        t = time.perf_counter()
        if len(rest):
            collect_signatures(ctx.model, ctx.tokenizer, rest, batch_size=opts["batch_size"],
                               max_length=opts["max_length"], progress=ctx.progress, collector=collector, ffn=ctx.ffn)
        timings["signatures"] += time.perf_counter() - t + pooled

        stats = collector.result()
        if stats.counts.min() < 2 and read < total:
            history.append({"rows": read, "knee": None, "num_heads_kept": None, "unchanged": False,
                            "mean_change": None})
            continue
        salience = min_max_normalise(salience_sum / salience_rows) if salience_rows else None
        checks: dict[str, float] = {}
        evidence = _cluster(stats, salience, heads, opts, ctx.seed, None, checks)
        timings["embedding"] += checks["embedding"]
        timings["sweep"] += checks["sweep"]
        _, _, kept, _ = _cut(evidence, evidence.knee.k, opts["representative"], opts["allow_empty_layers"])
        key = (int(evidence.knee.k), frozenset((li, int(h)) for li, layer in enumerate(kept) for h in layer))
        overlap = _overlap(previous, key)
        change = None
        if prev_mean is not None:  # largest relative change of any class's mean signature, for the record
            norms = np.linalg.norm(prev_mean, axis=(0, 2))  # (N, C, D) -> per class
            diffs = np.linalg.norm(stats.mean - prev_mean, axis=(0, 2))
            change = float(np.max(diffs / np.maximum(norms, 1e-12)))
        prev_mean = stats.mean
        steady = overlap is not None and abs(key[0] - previous[0]) <= 1 and overlap >= opts["auto_overlap"]
        same = same + 1 if steady else 0
        previous = key
        history.append({"rows": read, "knee": key[0], "num_heads_kept": len(key[1]), "overlap": overlap,
                        "unchanged": steady, "mean_change": change,
                        "kept_heads": [[int(h) for h in layer] for layer in kept]})
        if same >= patience:
            why = (f"the selection was stable over the last {patience} chunks of {chunk} rows (k* moved by at "
                   f"most 1, kept heads overlapping by >= {opts['auto_overlap']:.2f} each time)")
            break
    evidence.timings = timings
    evidence.ffn = ctx.ffn.result() if ctx.ffn is not None else None
    evidence.stopped = {"rows_used": read, "rows_available": total, "stopped_early": read < total,
                        "why": why, "chunk": chunk, "patience": patience, "salience_rows": salience_rows,
                        "checks": history}
    return evidence


def _cut(evidence: CahpEvidence, k: int, representative: str, allow_empty: bool):
    clustering = evidence.clustering(k)
    if (representative == "salience" or not allow_empty) and evidence.salience is None:
        raise CahpError("this evidence has no salience; collect it with representative='salience' or the guard on")
    reps = cluster_representatives(clustering, evidence.salience, representative)
    kept = split_by_layer(reps, evidence.heads_per_layer)
    rescued: list[int] = []
    if not allow_empty:
        kept, rescued = guard_layers(kept, split_by_layer_scores(evidence.salience, evidence.heads_per_layer))
    return clustering, reps, kept, rescued


def split_by_layer_scores(values: np.ndarray | None, heads_per_layer: list[int]) -> list[list[float]] | None:
    """A global (N,) vector -> per layer lists (the ``scores`` layout of selection.json)."""
    if values is None:
        return None
    offsets = np.concatenate([[0], np.cumsum(heads_per_layer)])
    return [[float(v) for v in values[offsets[i]:offsets[i + 1]]] for i in range(len(heads_per_layer))]


def _where(g: int, heads_per_layer: list[int]) -> list[int]:
    return list(to_layer_head(int(g), heads_per_layer))


def select_at(evidence: CahpEvidence, k: int, ctx: MethodContext | None = None) -> Selection:
    """The selection at k clusters: one representative per cluster, plus the guard unless turned off.

    ``ctx`` may override ``representative`` and ``allow_empty_layers``; everything else comes from
    the evidence.
    """
    opts = dict(evidence.options)
    if ctx is not None:
        opts.update({key: ctx.options[key] for key in ("representative", "allow_empty_layers")
                     if ctx.options.get(key) is not None})
    opts = cahp_options(opts)
    k = int(k)
    clustering, reps, kept, rescued = _cut(evidence, k, opts["representative"], opts["allow_empty_layers"])
    hpl = evidence.heads_per_layer
    clusters = [
        {
            "members": [_where(int(g), hpl) for g in clustering.members(c)],
            "medoid": _where(int(clustering.medoids[c]), hpl),
            "representative": _where(reps[c], hpl),
        }
        for c in range(clustering.k)
    ]
    pairs = class_pairs(len(evidence.classes))
    details: dict[str, Any] = {
        "k": k,
        "knee": evidence.knee.to_dict(),
        "sweep_stopped_at": evidence.sweep.stopped_at,
        "space": opts["space"],
        "tsne_perplexity": tsne_perplexity(evidence.num_heads) if opts["space"] == "tsne" else None,
        "embedding": evidence.points.tolist() if opts["space"] == "tsne" else None,
        "clusters": clusters,
        "rescued_layers": rescued,
        "classes": evidence.classes,
        "class_counts": evidence.class_counts,
        "class_pairs": [list(p) for p in pairs],
        "profile_dim": int(evidence.profiles.shape[1]),
    }
    if evidence.stopped is not None:
        details["examples_used"] = int(evidence.stopped["rows_used"])
        details["stopped"] = evidence.stopped
    params = {key: opts[key] for key in DEFAULTS if key != "k"}
    params["k"] = opts["k"]
    return Selection(
        method="cahp",
        kept_heads=kept,
        num_heads_total=evidence.num_heads,
        heads_per_layer=int(max(hpl)),
        seed=evidence.seed,
        knee=int(evidence.knee.k),
        mss_curve=evidence.sweep.curve(),
        scores=split_by_layer_scores(evidence.salience, hpl),
        details=details,
        params=params,
        timings=dict(evidence.timings),
    )


def k_for_budget(evidence: CahpEvidence, budget: int, ctx: MethodContext | None = None) -> int:
    """The largest k whose selection (guard included) keeps at most ``budget`` heads."""
    opts = cahp_options({**evidence.options, **(ctx.options if ctx is not None else {})})
    for k in range(min(int(budget), evidence.num_heads), 0, -1):
        _, _, kept, _ = _cut(evidence, k, opts["representative"], opts["allow_empty_layers"])
        if sum(len(layer) for layer in kept) <= budget:
            return k
    raise CahpError(
        f"no CAHP selection keeps at most {budget} heads with one head per layer kept; "
        "raise the budget or pass --allow-empty-layers"
    )


def select(ctx: MethodContext) -> Selection:
    """CAHP end to end: evidence, then the cut at k* (or at ``options['k']``, or at the budget)."""
    forced = ctx.options.get("k")
    if forced is not None and ctx.budget is not None:
        raise CahpError("give either a k for CAHP or a head budget, not both")
    evidence = collect_evidence(ctx)
    if forced is not None:
        k, why = int(forced), "forced"
    elif ctx.budget is not None:
        k, why = k_for_budget(evidence, ctx.budget, ctx), "budget"
    else:
        k, why = evidence.knee.k, "knee"
    selection = select_at(evidence, k, ctx)
    selection.details["k_from"] = why
    if ctx.budget is not None:
        selection.details["budget"] = int(ctx.budget)
    return selection


__all__ = ["DEFAULTS", "CahpEvidence", "cahp_options", "collect_evidence", "k_for_budget", "select", "select_at"]
