"""ONNX Runtime transformer optimization: fused attention per layer, checked node by node, chosen by measurement.

Why not simply ``optimize_model`` with every fusion on: on CPU (ORT 1.32) the fully fused graph is
*slower* than the plain export, for dense and pruned MiniLM alike. Per-op profiles (ORT profiler,
1 thread, b32 x 128, ragged MiniLM 30/72 heads) put the loss in one kernel::

    op (summed over layers)             plain export      all fusions
    Add + LayerNormalization            ~20 ms            -
    SkipLayerNormalization              -                 ~87 ms   <- 4x slower than what it replaces
    Q/K/V MatMuls+Softmax+Transpose     ~100 ms           -
    Attention (fused)                   -                 ~77 ms   <- a win, also with 3 or 5 heads

A micro-benchmark of one (32, 128, 384) residual+norm confirms it: SkipLayerNormalization 7.3 ms vs
Add+Add+LayerNormalization 1.6 ms. The float CPU kernel of SkipLayerNormalization is a scalar loop
(one-pass variance, a division per element, no MLAS), while LayerNormalization is vectorised.
Neither the fused Attention kernel (odd head counts, packed QKV weight) nor BiasGelu or
EmbedLayerNormalization lose measurably.

Turning the fusion off in the Python optimizer is not enough: ORT's *session* runs its own
``SkipLayerNormFusion`` at load time (level 2, the default of every ``InferenceSession``), and once
attention is fused the residual Adds have the static shapes that fusion needs, so it fuses them
right back. The candidate below therefore rewrites the residual ``Add`` that feeds each
``LayerNormalization`` into an equivalent ``Sum``, which that runtime fusion does not match::

    MatMul ─► Add(bias) ─┐                         MatMul ─► Add(bias) ─┐
                         Add ◄── skip      ==>                         Sum ◄── skip
                         │                                             │
                  LayerNormalization                            LayerNormalization

Candidates (:data:`CANDIDATES`): ``ort_default`` (every fusion, what CUDA wants),
``no_skip_layernorm`` (every fusion but SkipLayerNormalization), ``unfused`` (the plain export,
which ORT's session still optimizes on load). With ``measure`` the fastest candidate that is not
slower than ``unfused`` at b1 x 128 and b32 x 128 (interleaved runs, medians, ORT's default thread
count as a deployment gets it) is kept, so the optimized artifact is never slower than the
unoptimized one on the machine that made it. Without
measurement (tests, ``measure=False``) the CPU default is ``no_skip_layernorm``.

Head counts: ORT reads each layer's head count from the Q reshape's constant shape and falls back
to one global value when it cannot, which gives a *wrong* but runnable node when a pruned layer's
width happens to be divisible by that value. :func:`check_attention_heads` maps every fused node to
its layer and compares ``num_heads`` and the packed QKV width with the layer's kept head count.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import re
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from cahp_deploy import onnx_runtime
from cahp_deploy.arch import clamp_shapes

log = logging.getLogger(__name__)

UNFUSED = "unfused"

#: candidate name -> (FusionOptions overrides, rewrite residual Add -> Sum to block ORT's runtime SkipLayerNormFusion)
CANDIDATES: dict[str, tuple[dict[str, bool], bool]] = {
    "ort_default": ({}, False),
    "no_skip_layernorm": ({"enable_skip_layer_norm": False, "enable_bias_skip_layer_norm": False}, True),
}
#: the choice when timing is skipped, per provider (from the measurements in the module docstring)
DEFAULT_CHOICE = {"cpu": "no_skip_layernorm", "cuda": "ort_default"}
#: (batch, sequence) shapes timed to choose a candidate (sequences capped by the model's positions)
TIMING_SHAPES: tuple[tuple[int, int], ...] = ((1, 128), (32, 128))

_ATTENTION_OPS = ("Attention", "MultiHeadAttention")
_LAYER_IN_NAME = re.compile(r"layers?[._/](\d+)[._/]")
# ORT's fusion logs a warning per pruned layer ("Input hidden size (96) is not same as weight matrix
# dimension of q,k,v (384)") because a pruned layer's attention width differs from the model width.
# That is expected here, and the head counts are checked below, so these loggers are quieted.
_NOISY_LOGGERS = ("fusion_attention", "onnxruntime.transformers.fusion_attention", "fusion_base", "onnx_model")


class FusionCheckError(Exception):
    """A fused graph that does not match the model (wrong head count, missing layer)."""


@contextlib.contextmanager
def _quiet_ort_fusion() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def block_runtime_skip_layernorm(model: onnx.ModelProto) -> int:
    """Rewrite each residual ``Add`` feeding a ``LayerNormalization`` into ``Sum``; return how many.

    ``Sum`` with two inputs computes exactly ``Add`` (same broadcasting), but ORT's session-level
    ``SkipLayerNormFusion`` only matches ``Add``, so the slow fused kernel stays out.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.Counter(i for n in graph.node for i in n.input)
    graph_outputs = {o.name for o in graph.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        add = producer.get(node.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        if consumers[add.output[0]] != 1 or add.output[0] in graph_outputs:
            continue
        add.op_type = "Sum"
        changed += 1
    return changed


def build_candidate(src: Path, name: str, onnx_model_type: str, use_gpu: bool = False) -> onnx.ModelProto:
    """Run ORT's transformer optimizer on ``src`` with candidate ``name``'s fusion options."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    overrides, block_sln = CANDIDATES[name]
    options = FusionOptions(onnx_model_type)
    for key, value in overrides.items():
        setattr(options, key, value)
    with _quiet_ort_fusion():
        # num_heads=0 / hidden_size=0: detect per layer from the graph; never a global value.
        optimized = optimize_model(
            str(src), model_type=onnx_model_type, num_heads=0, hidden_size=0,
            optimization_options=options, use_gpu=use_gpu,
        )
    optimized.topological_sort()
    model = optimized.model
    if block_sln:
        block_runtime_skip_layernorm(model)
    return model


# ----------------------------------------------------------------------------- head-count check


def _initializer_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in graph.initializer}


def _layer_hint(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], inits: set[str], depth: int = 4) -> int | None:
    """The layer index named by a parameter just downstream of ``node`` (its output projection's bias)."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for name in n.input:
                if name in inits and n is not node:
                    m = _LAYER_IN_NAME.search(name)
                    if m:
                        return int(m.group(1))
            for out in n.output:
                for c in consumers.get(out, ()):
                    if id(c) not in seen:
                        seen.add(id(c))
                        nxt.append(c)
        frontier = nxt
    return None


@dataclass
class FusedNode:
    layer: int
    node: str
    op_type: str
    num_heads_found: int
    num_heads_expected: int
    width: int | None
    corrected: bool = False

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "node": self.node, "op_type": self.op_type,
            "num_heads": self.num_heads_expected, "num_heads_found": self.num_heads_found,
            "width": self.width, "corrected": self.corrected,
        }


def check_attention_heads(
    model: onnx.ModelProto, heads_per_layer: Sequence[int], head_dim: int, correct: bool = True
) -> list[FusedNode]:
    """Check every fused attention node against its layer's kept head count.

    Nodes are mapped to layers by graph order (the k-th fused node is the k-th layer that has heads)
    and cross-checked against the layer index in the names of the parameters right after it. The
    packed QKV weight must be ``3 * heads * head_dim`` wide. A ``num_heads`` attribute that disagrees
    with the layer (ORT's global fallback) is set right when ``correct`` (the packed weights do not
    depend on it), else it raises; any other disagreement raises :class:`FusionCheckError`.
    """
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type in _ATTENTION_OPS]
    layers = [i for i, h in enumerate(heads_per_layer) if h > 0]
    if len(nodes) != len(layers):
        raise FusionCheckError(
            f"{len(nodes)} fused attention nodes for {len(layers)} layers with heads (layers {layers})"
        )
    shapes = _initializer_shapes(graph)
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    found = []
    for node, layer in zip(nodes, layers):
        hint = _layer_hint(node, consumers, set(shapes))
        if hint is not None and hint != layer:
            raise FusionCheckError(f"fused node {node.name} sits in layer {hint}, graph order says layer {layer}")
        attr = next((a for a in node.attribute if a.name == "num_heads"), None)
        if attr is None:
            raise FusionCheckError(f"fused node {node.name} has no num_heads attribute")
        expected = int(heads_per_layer[layer])
        width = None
        if node.op_type == "Attention" and len(node.input) > 1 and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            width = int(dims[-1]) // 3 if len(dims) == 2 else None
            if width is not None and width != expected * head_dim:
                raise FusionCheckError(
                    f"fused node {node.name} (layer {layer}) packs Q/K/V {width} wide, expected {expected} heads x {head_dim}"
                )
        rec = FusedNode(layer, node.name, node.op_type, int(attr.i), expected, width)
        if attr.i != expected:
            if not correct:
                raise FusionCheckError(
                    f"fused node {node.name} (layer {layer}) has num_heads={attr.i}, the layer keeps {expected}"
                )
            log.warning("layer %d: ORT fused attention with num_heads=%d, the layer keeps %d; corrected", layer, attr.i, expected)
            attr.i = expected
            rec.corrected = True
        found.append(rec)
    return found


# ----------------------------------------------------------------------------- timing and choice


def timing_shapes(max_seq: int | None = None) -> tuple[tuple[int, int], ...]:
    """:data:`TIMING_SHAPES` with sequences capped at ``max_seq``: a 64-position model cannot run 128 tokens."""
    return TIMING_SHAPES if max_seq is None else clamp_shapes(TIMING_SHAPES, max_seq)


def _feed(input_names: Sequence[str], batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(5, max(6, vocab), (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }
    return {k: v for k, v in feed.items() if k in input_names}


def time_graphs(
    paths: dict[str, Path],
    shapes: Sequence[tuple[int, int]] = TIMING_SHAPES,
    vocab: int = 1000,
    budget_s: float = 6.0,
    provider: str = "cpu",
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """Median ms per run of each graph at each (batch, seq), runs interleaved (order reversed every round).

    Interleaving spreads load from other processes over all candidates alike; the round count per
    shape is set from one warm-up so the whole measurement stays near ``budget_s``. ``threads``: ORT
    intra-op threads (None: ORT's default).
    """
    sessions = {k: onnx_runtime.session(p, provider, threads=threads) for k, p in paths.items()}
    names = list(paths)
    per_shape = budget_s / max(1, len(shapes))
    result: dict[str, dict[str, float]] = {k: {} for k in names}
    for batch, seq in shapes:
        feeds = {k: _feed([i.name for i in s.get_inputs()], batch, seq, vocab) for k, s in sessions.items()}
        t0 = time.perf_counter()
        for k in names:  # warm-up (allocations, prepacking)
            sessions[k].run(None, feeds[k])
        one_round = (time.perf_counter() - t0) or 1e-3
        rounds = int(min(25, max(3, per_shape // one_round)))
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(rounds):
            for k in names if r % 2 == 0 else reversed(names):
                s = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times[k].append((time.perf_counter() - s) * 1000)
        for k in names:
            result[k][f"b{batch}x{seq}"] = round(statistics.median(times[k]), 3)
        log.info("timed b%dx%d over %d rounds: %s", batch, seq, rounds, {k: result[k][f'b{batch}x{seq}'] for k in names})
    return result


def choose(timings: dict[str, dict[str, float]], baseline: str = UNFUSED) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest geometric-mean time ratio to ``baseline`` among those not slower
    than it at any shape (``baseline`` itself always qualifies); returns (name, {name: gmean ratio})."""
    base = timings[baseline]
    score = {}
    for name, t in timings.items():
        ratios = [t[s] / base[s] for s in base]
        score[name] = round(math.exp(sum(math.log(r) for r in ratios) / len(ratios)), 4)
        if name != baseline and max(ratios) > 1.0:
            score[name] = math.inf
    best = min(score, key=lambda n: (score[n], n != baseline))
    return best, {k: (v if math.isfinite(v) else None) for k, v in score.items()}


def choose_int8_source(candidates: dict[str, Path], chosen: str, scratch: Path, *, measure: bool,
                       provider: str = "cpu", vocab_size: int = 1000, max_seq: int | None = None,
                       budget_s: float = 6.0) -> tuple[str, dict]:
    """Which fusion candidate INT8 quantizes: the one whose INT8 graph (every weight MatMul INT8) runs
    fastest, timed like the fp32 candidates. Returns (name, the record for the manifest).

    Why not the fp32 choice: ORT quantizes a fused ``Attention`` into ``QAttention``, while an unfused
    graph keeps the attention MatMuls, Softmax and Transposes in fp32, so the fp32 ranking says little
    about the INT8 one, and the few rounds of the fp32 timing can pick either way. Measured on
    minilm-mnli (b32x128, interleaved; ``experiments/int8_source.py``): the pruned model's INT8 graph
    took 224 ms from the fused candidate and 276 ms from the unfused one its fp32 timing had chosen.
    Without timing (or off the CPU) the fp32 choice stays the source.
    """
    from cahp_deploy.export.int8.quantize import quantize_int8

    if not measure or provider != "cpu" or len(candidates) < 2:
        why = "the fp32 choice (INT8 sources not timed: " + (
            "one candidate" if len(candidates) < 2 else "measure=False" if not measure else f"provider {provider}") + ")"
        return chosen, {"source": chosen, "measured": False, "reason": why}
    quantized = {}
    for name, path in candidates.items():
        quantized[name] = scratch / f"{name}_int8_probe.onnx"
        quantize_int8(path, quantized[name], per_channel=False)
    shapes = timing_shapes(max_seq)
    timings = time_graphs(quantized, shapes=shapes, vocab=vocab_size, budget_s=budget_s)
    base = chosen if chosen in timings else UNFUSED
    best, scores = choose(timings, baseline=base)
    return best, {"source": best, "measured": True, "timings_ms": timings, "score_vs_fp32_choice": scores,
                  "reason": f"fastest INT8 graph (every weight MatMul INT8) not slower than the fp32 choice's "
                            f"({base}) at any timed shape", "timing_shapes": [f"b{b}x{s}" for b, s in shapes]}


@dataclass
class OptimizeResult:
    choice: str
    path: Path
    record: dict = field(default_factory=dict)
    candidates: dict[str, Path] = field(default_factory=dict)  # name -> graph file (scratch)


def optimize(
    plain: Path,
    out: Path,
    scratch: Path,
    *,
    onnx_model_type: str,
    heads_per_layer: Sequence[int],
    head_dim: int,
    vocab_size: int,
    measure: bool = True,
    provider: str = "cpu",
    budget_s: float = 6.0,
    max_seq: int | None = None,
) -> OptimizeResult:
    """Build the candidates from ``plain``, check their fused heads, pick one, write it to ``out``.

    ``scratch`` holds the candidate graphs (the caller deletes it). The returned ``record`` is what
    the manifest stores under ``variants.optimized``: the choice, why, every candidate's fused-node
    check and, when measured, the timings. ``max_seq`` (the model's usable positions) caps the
    timed sequence length.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {UNFUSED: plain}
    checks: dict[str, dict] = {UNFUSED: {"fused_attention_nodes": 0}}
    rejected: dict[str, str] = {}
    for name in CANDIDATES:
        model = build_candidate(plain, name, onnx_model_type, use_gpu=provider == "cuda")
        ops = collections.Counter(n.op_type for n in model.graph.node)
        try:
            nodes = check_attention_heads(model, heads_per_layer, head_dim, correct=True)
        except FusionCheckError as e:
            log.warning("optimization candidate %s rejected: %s", name, e)
            rejected[name] = str(e)
            continue
        p = scratch / f"{name}.onnx"
        onnx.save(model, str(p))
        paths[name] = p
        checks[name] = {
            "fused_attention_nodes": len(nodes),
            "attention": [n.to_dict() for n in nodes],
            "corrected_layers": [n.layer for n in nodes if n.corrected],
            "op_counts": dict(sorted(ops.items())),
        }
    record: dict = {"candidates": checks, "rejected": rejected, "provider": provider}
    if measure and provider == "cpu" and len(paths) > 1:
        shapes = timing_shapes(max_seq)
        timings = time_graphs(paths, shapes=shapes, vocab=vocab_size, budget_s=budget_s)
        choice, scores = choose(timings)
        record.update(measured=True, timings_ms=timings, score_vs_unfused=scores,
                      reason="fastest candidate not slower than the unfused graph at any timed shape",
                      timing_shapes=[f"b{b}x{s}" for b, s in shapes])
    else:
        choice = DEFAULT_CHOICE.get(provider, "ort_default")
        if len(paths) == 1:
            why = "every fused candidate was rejected by the head-count check"
        elif not measure:
            why = f"timing skipped (measure=False); default for {provider}"
        else:
            why = f"no timing on provider {provider}; default for {provider}"
        if choice not in paths:
            choice = UNFUSED
        record.update(measured=False, reason=why)
    record["choice"] = choice
    shutil.copyfile(paths[choice], out)
    chosen = checks[choice]
    record["fused_attention_nodes"] = chosen["fused_attention_nodes"]
    record["attention"] = chosen.get("attention", [])
    return OptimizeResult(choice=choice, path=out, record=record, candidates=paths)
