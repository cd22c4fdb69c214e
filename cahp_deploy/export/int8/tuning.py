"""Accuracy-aware INT8: quantize every weight MatMul; where that misses, smooth the most sensitive
inputs, and only then keep the most sensitive MatMuls in fp32.

Why: dynamic INT8 of a whole small classifier changes many predictions while accuracy barely moves;
a gate (:mod:`int8_gate`: by default the accuracy drop's upper bound, which grows with the discordant
rows) can need some of that error gone. Small margins flip easily, and the error is concentrated in the
early FFN MatMuls (per-tensor uint8 activation scales computed over a whole batch do not suit their
outlier-heavy inputs). The figures: DESIGN.md, "Measurements behind the code".

So, as Intel Neural Compressor's fallback tuning and ORT users do it, INT8 becomes a search:

1. Candidates: ``MatMul``, fused ``Attention`` and ``Gemm`` nodes with a constant weight, what ORT's
   dynamic quantizer turns into ``MatMulInteger`` / ``QAttention`` (it rewrites ``Gemm``, the pooler
   and classifier, into MatMul + Add first). The embeddings stay fp32 (table lookups, no MACs to
   gain, and a cost in agreement).
2. Quantize every candidate, per-tensor and per-channel, and keep the weight-scale granularity with
   the higher agreement on the tuning set (lower logit MSE on a tie), unless the caller chose one.
3. If that misses the gate's target on the tuning rows (:meth:`~cahp_deploy.export.int8.gate.Int8Gate.target`:
   by default the paired accuracy drop vs fp32 within the budget; after a miss on the gate rows also a
   logit-MSE ceiling, :meth:`~cahp_deploy.export.int8.gate.Int8Gate.error_ceiling`): leave-one-in
   sensitivity. For each candidate, the graph with only that node INT8; its sensitivity is the logit
   MSE vs fp32 on ~128 tuning rows. Logit MSE rather than agreement: a few hundred examples flip in
   steps of 0.2-0.8 %, too coarse to rank 20+ nodes. Leave-one-in rather than leave-one-out: dropping
   one node from the fully quantized graph barely moves its MSE (the other nodes' errors dominate),
   while one node alone against fp32 gives a clean ranking, early FFN first.
4. a. Bisection over the ranked list for the fewest ``k`` whose inputs, smoothed (SmoothQuant,
   :mod:`~cahp_deploy.export.int8.smoothing`, alpha :data:`SEARCH_SMOOTH_ALPHA`), meet the target
   with *every* node still INT8: one elementwise ``Mul`` per smoothed input (~1.3 % of the INT8 graph's
   time at one thread) instead of ~8 % per node kept fp32 (MiniLM-MNLI's pruned model;
   ``experiments/int8_fallback_probe.py``).
   b. Only if smoothing every node misses: bisection for the fewest ``k`` kept in fp32, on the fully
   smoothed graph (without smoothing, ``smooth_alpha=None``, on the plain one). Both are near-monotone
   in ``k``; every probe is in the trace.
5. ``k == n`` (every candidate back in fp32): INT8 would be the fp32 model, a :class:`CahpError`.

Cost: ``n + 2 log2(n) + 4`` evaluations at most (``n`` of them on ~128 rows; each smoothing probe
also re-runs the quantizer). Mixes are
assembled in memory from the fp32 graph and its fully quantized twin (:class:`Mixer`: each node's
quantized subgraph swapped in), so the search never re-runs the quantizer; the shipped file is then
made by ORT's ``quantize_dynamic`` with ``nodes_to_exclude`` and evaluated once more.

Caveat recorded with the result: dynamic activation scales are per tensor *per batch*, so the figures
hold for the batching they were measured with (length-bucketed batches of 32).
"""

from __future__ import annotations

import collections
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from cahp_deploy import onnx_runtime
from cahp_deploy.errors import CahpError
from cahp_deploy.export.config import TUNING_EXAMPLES
from cahp_deploy.export.int8 import quantize as quant
from cahp_deploy.export.int8.gate import ACCURACY, MARGIN_STANDARD_ERRORS, Int8Gate, score
from cahp_deploy.export.parity import Feed, ort_logits
from cahp_deploy.onnx_runtime import ThreadSettings

log = logging.getLogger(__name__)

#: ONNX Runtime intra-op threads for the tuning sessions (what a small CPU box has; keeps timings comparable)
TUNING_THREADS = 2
#: about this many of them rank the nodes (the ranking signal is strong; bisection uses all)
SENSITIVITY_EXAMPLES = 128
_LAYER = re.compile(r"layers?[._/](\d+)[._/]")
#: fp32 op types the search considers (ORT's quantizer handles Gemm as MatMul + Add)
CANDIDATE_OPS = ("MatMul", "Attention", "Gemm")
#: SmoothQuant alpha of the search's first lever after a gate miss (0.75 measured best; experiments/results/int8)
SEARCH_SMOOTH_ALPHA = 0.75
#: ops that only appear in a node's subgraph once ORT quantized it
_INTEGER_OPS = ("MatMulInteger", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm")


# ----------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class QuantNode:
    """One weight MatMul that INT8 can quantize.

    ``macs`` counts multiply-adds at sequence length 128 (as ``pruning.json``'s ``macs_seq128``): K x N
    per token for MatMul / Attention, K x N once per sequence for Gemm (2-D: the pooler and
    classifier act on the pooled vector). ``quantizer_name`` is the node's name when ORT's quantizer
    sees it: it rewrites ``Gemm`` into ``<name>_MatMul`` + ``<name>_Add`` first.
    """

    name: str
    op_type: str
    layer: int | None
    role: str
    weight: str
    macs: int
    quantizer_name: str

    def to_dict(self) -> dict:
        out = {"name": self.name, "op_type": self.op_type, "layer": self.layer, "role": self.role, "macs_seq128": self.macs}
        if self.quantizer_name != self.name:
            out["quantizer_name"] = self.quantizer_name
        return out


def _layer_and_role(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> tuple[int | None, str]:
    """Layer index and sub-module from the node's name (``/bert/encoder/layer.0/intermediate/dense/MatMul``),
    else from the first downstream node that names its layer (a fused ``Attention_k`` node feeds its
    layer's ``attention/output/dense`` MatMul); ``None`` outside the layers (pooler, classifier)."""
    m = _LAYER.search(node.name)
    if m:
        role = node.name[m.end():].removesuffix("/MatMul").strip("/") or node.op_type
        return int(m.group(1)), role
    if node.op_type != "Attention":
        return None, node.name.strip("/").removesuffix("/Gemm").removesuffix("/MatMul") or node.op_type
    frontier, seen = [node], set()
    for _ in range(4):
        nxt = []
        for n in frontier:
            for out in n.output:
                for c in consumers.get(out, ()):
                    hit = _LAYER.search(c.name) or next((h for h in map(_LAYER.search, c.input) if h), None)
                    if hit:
                        return int(hit.group(1)), "attention (fused QKV)"
                    if id(c) not in seen:
                        seen.add(id(c))
                        nxt.append(c)
        frontier = nxt
    return None, "attention (fused QKV)"


def _plain_gemm(node: onnx.NodeProto) -> bool:
    """A Gemm ORT's quantizer turns into MatMul + Add (alpha = beta = 1, A not transposed)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and attrs.get("transA", 0) == 0


def quantizable_nodes(model: onnx.ModelProto, seq: int = 128) -> list[QuantNode]:
    """The MatMul / fused Attention / Gemm nodes with a constant 2-D weight, in graph order."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    out = []
    for n in model.graph.node:
        if n.op_type not in CANDIDATE_OPS or len(n.input) < 2 or not n.name:
            continue
        if n.op_type == "Gemm" and not _plain_gemm(n):
            continue
        dims = shapes.get(n.input[1])
        if dims is None or len(dims) != 2 or 0 in dims:
            continue
        layer, role = _layer_and_role(n, consumers)
        per_seq = int(dims[0]) * int(dims[1])
        macs = per_seq if n.op_type == "Gemm" else per_seq * seq
        qname = f"{n.name}_MatMul" if n.op_type == "Gemm" else n.name
        out.append(QuantNode(n.name, n.op_type, layer, role, n.input[1], macs, qname))
    return out


def not_quantized(model: onnx.ModelProto, skipped: Sequence[str] = ()) -> list[dict]:
    """Weight ops INT8 leaves in fp32 whatever the search does, and why (recorded in the manifest)."""
    inits = {t.name for t in model.graph.initializer}
    table_input = {"EmbedLayerNormalization": 2, "Gather": 0}  # which input is the embedding table
    why = "embedding table lookup: no MACs to gain (and on MiniLM/SST-5 alone -1.6 % agreement)"
    out = [{"name": n.name, "op_type": n.op_type, "why": why} for n in model.graph.node
           if n.op_type in table_input and len(n.input) > table_input[n.op_type] and n.input[table_input[n.op_type]] in inits]
    by_name = {n.name: n for n in model.graph.node}
    out += [{"name": s, "op_type": by_name[s].op_type, "why": "ONNX Runtime's dynamic quantizer leaves it fp32"} for s in skipped]
    return out


# ----------------------------------------------------------------------------- mixing fp32 and int8 in memory


class Mixer:
    """Builds "the fp32 graph with nodes S quantized" for any S, from the graph and its fully quantized twin.

    ORT's dynamic quantizer rewrites each node on its own and keeps its output names::

        x ──► MatMul(W) ──► y        ==>   x ──► DynamicQuantizeLinear ──► MatMulInteger(W_q) ──► Cast ──► Mul(scales) ──► y

    so a node's quantized subgraph is everything in the quantized graph that produces its outputs from
    tensors the fp32 graph already has. Swapping subgraphs in gives the same graph as quantizing with
    ``nodes_to_exclude`` (checked in the tests), without re-running the quantizer for every probe.
    """

    def __init__(self, fp32: onnx.ModelProto, quantized: onnx.ModelProto, names: Sequence[str]):
        self.fp32, self.quantized = fp32, quantized
        g = fp32.graph
        available = {i.name for i in g.input} | {t.name for t in g.initializer}
        produced = {o: n.name for n in g.node for o in n.output}
        q_producer = {o: n for n in quantized.graph.node for o in n.output}
        q_order = {id(n): k for k, n in enumerate(quantized.graph.node)}
        by_name = {n.name: n for n in g.node}
        self.subgraphs: dict[str, list[onnx.NodeProto]] = {}
        self.unquantized: list[str] = []
        for name in names:
            node = by_name[name]
            stack, seen, sub = list(node.output), set(), []
            while stack:
                t = stack.pop()
                if not t or t in available or produced.get(t, name) != name:
                    continue  # a tensor the fp32 graph has from elsewhere: the subgraph's boundary
                q = q_producer.get(t)
                if q is None or id(q) in seen:
                    continue  # an initializer of the quantized graph, or visited
                seen.add(id(q))
                sub.append(q)
                stack.extend(q.input)
            if not any(q.op_type in _INTEGER_OPS for q in sub):
                self.unquantized.append(name)  # ORT left it alone (e.g. a weight it cannot handle)
                continue
            self.subgraphs[name] = sorted(sub, key=lambda n: q_order[id(n)])
        self._inits = {t.name: t for t in quantized.graph.initializer} | {t.name: t for t in g.initializer}
        opsets = {o.domain: o.version for o in fp32.opset_import}
        for o in quantized.opset_import:
            opsets[o.domain] = max(o.version, opsets.get(o.domain, 0))
        self._opsets = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]

    def build(self, excluded: Collection[str]) -> onnx.ModelProto:
        """The model with every candidate but ``excluded`` quantized."""
        excluded = set(excluded)
        nodes, emitted = [], set()
        for n in self.fp32.graph.node:
            if n.name in self.subgraphs and n.name not in excluded:
                for q in self.subgraphs[n.name]:
                    if q.name not in emitted:  # a DynamicQuantizeLinear shared by two nodes comes once
                        emitted.add(q.name)
                        nodes.append(q)
            else:
                nodes.append(n)
        used = {i for n in nodes for i in n.input}
        g = self.fp32.graph
        graph = onnx.helper.make_graph(
            nodes, g.name, list(g.input), list(g.output),
            initializer=[t for name, t in self._inits.items() if name in used],
        )
        return onnx.helper.make_model(graph, opset_imports=self._opsets, ir_version=self.quantized.ir_version)


# ----------------------------------------------------------------------------- evaluation


def session(model: onnx.ModelProto | Path, threads: int = TUNING_THREADS):
    """A CPU session with ``threads`` intra-op threads and ORT's default graph optimizations (the
    fusions a deployment gets, e.g. DynamicQuantizeLinear + MatMulInteger -> one kernel)."""
    return onnx_runtime.session(model, settings=ThreadSettings(intra_op_num_threads=threads, inter_op_num_threads=1, quiet=True))


@dataclass
class Int8Result:
    """What the search decided and why: ``record`` goes to the manifest's ``variants.int8.tuning``."""

    per_channel: bool
    excluded: list[QuantNode]
    candidates: list[QuantNode]
    record: dict = field(default_factory=dict)
    smoothing: dict | None = None  # the search smoothed its most sensitive nodes (their names, alpha, calibration)


def _sensitivity_batches(feeds: Sequence[Feed], examples: int) -> list[int]:
    """Every k-th batch, so about ``examples`` rows spread over all lengths (batches are length-bucketed)."""
    total = sum(len(next(iter(f.values()))) for f in feeds)
    stride = max(1, round(total / max(1, examples)))
    return list(range(0, len(feeds), stride))


class _Search:
    """The tuning set, the fp32 reference logits on it, and every probe's figures (the trace)."""

    def __init__(self, src: Path, feeds: Sequence[Feed], labels: np.ndarray | None, gate: Int8Gate, threads: int):
        self.src, self.feeds, self.threads, self.gate = src, list(feeds), threads, gate
        self.fp32 = onnx.load(str(src))
        self.candidates = quantizable_nodes(self.fp32)
        s = session(src, threads)
        self.reference = [ort_logits(s, [f]) for f in self.feeds]
        sizes = np.cumsum([0] + [len(r) for r in self.reference])
        self.labels = None if labels is None else [np.asarray(labels)[a:b] for a, b in zip(sizes[:-1], sizes[1:])]
        self.trace: list[dict] = []

    def evaluate(self, model: onnx.ModelProto | Path, batches: Sequence[int] | None = None) -> dict:
        idx = range(len(self.feeds)) if batches is None else batches
        s = session(model, self.threads)
        got = ort_logits(s, [self.feeds[i] for i in idx])
        labels = None if self.labels is None else np.concatenate([self.labels[i] for i in idx])
        return score(got, np.concatenate([self.reference[i] for i in idx]), labels, self.gate.confidence)

    def probe(self, model: Callable[[], onnx.ModelProto | Path], step: str, record: dict,
              batches: Sequence[int] | None = None) -> dict:
        """Build (``model()``), evaluate, and append the step to the trace with its seconds."""
        t0 = time.perf_counter()
        res = self.evaluate(model(), batches)
        self.trace.append({"step": step, **record, **res, "seconds": round(time.perf_counter() - t0, 2)})
        return res


def _fp32_fraction(excluded: Sequence[QuantNode], candidates: Sequence[QuantNode]) -> float:
    total = sum(c.macs for c in candidates)
    return round(sum(c.macs for c in excluded) / total, 4) if total else 0.0


def _target_note(gate: Int8Gate, margin: float | None) -> str:
    if gate.kind == ACCURACY:
        return ("the upper bound a zero drop would get on the gate rows, with the tuning rows' share of discordant "
                "rows, <= max drop" + (f" - margin {margin}" if margin else "") + "; the gate rows then judge the real drop")
    return (f"agreement >= gate + {MARGIN_STANDARD_ERRORS:g} binomial standard errors of the tuning estimate"
            if margin is None else f"agreement >= gate + margin {margin}")


def _granularity_name(per_channel: bool) -> str:
    return "per_channel" if per_channel else "per_tensor"


def _quantize_all(search: "_Search", src: Path, scratch: Path, num_candidates: int, per_channel: bool | None,
                  say) -> tuple[dict[str, dict], dict[bool, onnx.ModelProto]]:
    """Steps 1-2: every candidate quantized, per-tensor and/or per-channel (``per_channel`` None: both),
    each measured on the tuning rows: ({granularity: its probe}, {per_channel: the quantized graph})."""
    granularity: dict[str, dict] = {}
    quantized: dict[bool, onnx.ModelProto] = {}
    for pc in ([False, True] if per_channel is None else [bool(per_channel)]):
        say(f"int8: quantizing all {num_candidates} MatMuls {'per-channel' if pc else 'per-tensor'}")
        path = scratch / f"all_{_granularity_name(pc)}.onnx"

        def quantize_all(pc=pc, path=path) -> onnx.ModelProto:
            quant.quantize_int8(src, path, per_channel=pc)
            quantized[pc] = onnx.load(str(path))
            return quantized[pc]

        granularity[_granularity_name(pc)] = search.probe(
            quantize_all, f"all quantized, {'per-channel' if pc else 'per-tensor'}", {"num_fp32": 0})
    return granularity, quantized


def _sensitivity(search: "_Search", mixer: "Mixer", cands: list[QuantNode], subset, say) -> list[dict]:
    """Step 3, leave-one-in sensitivity: only this node INT8, logit MSE vs fp32 on ``subset``; the
    candidates, most sensitive first."""
    names = [c.name for c in cands]
    ranked = []
    for k, c in enumerate(cands, 1):
        say(f"int8: sensitivity {k}/{len(cands)}")
        res = search.probe(lambda c=c: mixer.build([n for n in names if n != c.name]), "sensitivity: only this node int8",
                           {"int8_nodes": [c.name], "num_fp32": len(cands) - 1}, subset)
        ranked.append({**c.to_dict(), "logit_mse_alone": res["logit_mse"], "agreement_alone": res["agreement"]})
    ranked.sort(key=lambda r: (-r["logit_mse_alone"], r["macs_seq128"]))
    return ranked


def _fewest(total: int, meets_at: Callable[[int], bool]) -> int:
    """Bisection over ranking prefixes: the smallest ``k`` in 1..``total`` with ``meets_at(k)``, where ``k = 0``
    is known to miss and ``total`` is taken to meet (it is never probed here)."""
    lo, hi = 0, total
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets_at(mid) else (mid, hi)
    return hi


def _bisect(search: "_Search", mixer: "Mixer", order: list[str], meets: Callable[[dict], bool], what: str, say) -> list[str]:
    """Step 4b: bisection for the shortest prefix of the ranking ``order`` that, kept fp32, ``meets`` the target."""

    def meets_at(k: int) -> bool:
        say(f"int8: bisection, {k} of {len(order)} nodes in fp32")
        return meets(search.probe(lambda: mixer.build(order[:k]), f"bisection: {k} most sensitive in fp32",
                                  {"fp32_nodes": order[:k], "num_fp32": k}))

    hi = _fewest(len(order), meets_at)  # len(order): everything fp32
    if hi == len(order):
        raise CahpError(
            f"INT8 cannot meet its gate ({what}) unless all {len(order)} quantizable MatMuls stay fp32; INT8 would be "
            "the fp32 model: ship model_optimized.onnx, or loosen the gate knowingly; nothing was written"
        )
    return order[:hi]


class _Smoother:
    """Step 4a: "the ``n`` most sensitive nodes smoothed (SmoothQuant), every node INT8", for any ``n``.

    Smoothing moves an input's outlier channels into the weights, exactly in fp32, at the cost of one
    elementwise ``Mul`` per smoothed input, so unlike fp32 fallback it keeps every MAC in INT8. On
    MiniLM-MNLI's pruned model (70 % rung) the sensitive nodes are the early FFN MatMuls; measured
    (``experiments/int8_fallback_probe.py``): gate-row drop vs fp32 +0.76 all INT8, +0.10 with the 3 most
    sensitive smoothed; each smoothed input costs ~1.3 % of the INT8 graph's time at one thread, each
    node kept fp32 instead ~8 %.
    """

    def __init__(self, search: "_Search", order: list[str], alpha: float, per_channel: bool, scratch: Path):
        from cahp_deploy.export.int8 import smoothing

        self.search, self.order, self.alpha, self.per_channel, self.scratch = search, order, alpha, per_channel, scratch
        self.absmax = smoothing.input_absmax(search.fp32, search.feeds, search.threads)
        self.smoothable = set(smoothing.smoothable_nodes(search.fp32))
        self.built: dict[int, tuple[Path, Path, dict]] = {}

    def nodes(self, n: int) -> list[str]:
        return [name for name in self.order[:n] if name in self.smoothable]

    def build(self, n: int) -> tuple[Path, Path, dict]:
        """(the smoothed fp32 graph, its every-node INT8 twin, the smoothing record), written once per ``n``."""
        from cahp_deploy.export.int8 import smoothing

        if n not in self.built:
            graph, record = smoothing.smooth(self.search.fp32, [], self.alpha, only=self.nodes(n), absmax=self.absmax)
            fp32, int8 = self.scratch / f"smoothed_{n}.onnx", self.scratch / f"smoothed_{n}_int8.onnx"
            onnx.save(graph, str(fp32))
            quant.quantize_int8(fp32, int8, per_channel=self.per_channel)
            self.built[n] = (fp32, int8, record)
        return self.built[n]

    def probe(self, n: int) -> dict:
        return self.search.probe(lambda: self.build(n)[1], f"smoothing: {n} most sensitive smoothed, every node int8",
                                 {"smoothed_nodes": self.nodes(n), "num_fp32": 0})

    def fewest(self, meets: Callable[[dict], bool], say) -> int | None:
        """The fewest most sensitive nodes whose smoothing ``meets`` the target (bisection, the ranking's
        prefixes), or None when smoothing every one does not."""
        total = len(self.order)
        say(f"int8: smoothing all {total} sensitive-ranked nodes")
        if not meets(self.probe(total)):
            return None

        def meets_at(k: int) -> bool:
            say(f"int8: smoothing the {k} most sensitive nodes")
            return meets(self.probe(k))

        return _fewest(total, meets_at)

    def record(self, n: int) -> dict:
        fp32, _, record = self.build(n)
        exact = self.search.evaluate(fp32)  # smoothing is exact in fp32 up to rounding: say how exact
        return {**record, "chosen_by": "the INT8 search, after the gate rows missed (fewest most sensitive nodes that meet "
                                       "the target, every node still INT8)",
                "fp32_vs_source": {"agreement": exact["agreement"], "logit_mse": exact["logit_mse"]}}


def _record(search: "_Search", mixer: "Mixer", cands: list[QuantNode], ex_nodes: list[QuantNode], chosen: bool, per_channel: bool | None,
            granularity: dict, gate: Int8Gate, target: float, margin: float | None, shipped: dict, ranked: list[dict],
            subset, search_nodes: bool, threads: int, started: float) -> dict:
    """The INT8 variant's ``tuning`` record in the manifest: what was measured and decided."""
    num_examples = sum(len(r) for r in search.reference)
    fp32_fraction = _fp32_fraction(ex_nodes, cands)
    return {
        "method": ("ORT dynamic INT8; leave-one-in sensitivity (logit MSE); bisection over the ranked nodes, smoothed "
                   "first, then kept fp32" if search_nodes
                   else "ORT dynamic INT8 of every candidate (no search)"),
        "weight_type": "int8 (symmetric)",
        "activation_type": "uint8 (dynamic, per tensor per batch)",
        "op_types": list(CANDIDATE_OPS),
        "per_channel": chosen,
        "per_channel_chosen_by": "measurement (higher tuning agreement)" if per_channel is None else "user",
        "granularity": granularity,
        "gate": gate.to_dict(),
        "target": round(target, 6),
        "target_note": _target_note(gate, margin),
        "tuning": shipped,
        "tuning_agreement": shipped["agreement"],
        "tuning_logit_mse": shipped["logit_mse"],
        "tuning_examples": num_examples,
        "tuning_reference": "the fp32 source graph in ONNX Runtime",
        "num_candidates": len(cands),
        "num_quantized": len(cands) - len(ex_nodes),
        "excluded_nodes": [c.to_dict() for c in ex_nodes],
        "fp32_mac_fraction": fp32_fraction,
        "int8_mac_fraction": round(1.0 - fp32_fraction, 4),
        "mac_fraction_note": "weight-MatMul multiply-adds left in fp32 over all quantizable ones, at sequence length 128 "
                             "(Gemm once per sequence); attention score products (QK^T, PV) are fp32 in every variant",
        "always_fp32": not_quantized(search.fp32, mixer.unquantized),
        "sensitivity": ranked,
        "sensitivity_examples": sum(len(search.reference[i]) for i in subset) if ranked else 0,
        "trace": search.trace,
        "batching": "length-bucketed batches of 32 (dynamic activation scales depend on the batch)",
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 2),
    }


def tune_int8(
    src: Path,
    dst: Path,
    feeds: Sequence[Feed],
    gate: Int8Gate,
    *,
    labels: np.ndarray | None = None,
    per_channel: bool | None = None,
    margin: float | None = None,
    max_logit_mse: float | None = None,
    smooth_alpha: float | None = SEARCH_SMOOTH_ALPHA,
    sensitivity_examples: int = SENSITIVITY_EXAMPLES,
    threads: int = TUNING_THREADS,
    say: Callable[[str], None] = lambda msg: None,
    search_nodes: bool = True,
) -> Int8Result:
    """Write ``dst``: ``src`` dynamically quantized, with the fewest most sensitive nodes smoothed, or
    else (every node smoothed) the fewest most sensitive kept fp32, that meet ``gate``'s target
    (:meth:`Int8Gate.target` with ``margin``; and a tuning-row logit MSE of at most ``max_logit_mse``,
    which :meth:`Int8Gate.error_ceiling` sets after a miss on the gate rows) on ``feeds`` (the tuning
    set), whose rows are labelled ``labels`` (in feed order; needed by the accuracy gate).

    ``per_channel`` None measures per-tensor and per-channel weight scales and keeps the better;
    True/False forces one. Sensitivity is measured on about ``sensitivity_examples`` of the tuning
    rows (every k-th batch), bisection and the shipped file on all of them. ``smooth_alpha`` None: the
    search never smooths (the source is smoothed already, or the graph must match quantization-aware
    training's rounding). ``say`` receives one-line progress messages. ``search_nodes`` False skips
    steps 3-4: every candidate INT8, whatever the tuning rows say (the gate rows judge it). Raises
    :class:`CahpError` when the graph has nothing to quantize, or when the target needs every
    candidate in fp32 (INT8 would then be the fp32 model).
    """
    started = time.perf_counter()
    if gate.needs_labels and labels is None:
        raise CahpError("the INT8 accuracy gate needs labelled tuning rows; give --data, or use --int8-min-agreement")
    search = _Search(Path(src), feeds, labels, gate, threads)
    cands = search.candidates
    if not cands:
        raise CahpError(f"{src} has no MatMul with a constant weight to quantize; INT8 would be the fp32 model, drop --quantize int8")
    num_examples = sum(len(r) for r in search.reference)
    target = gate.target(num_examples, margin)
    names = [c.name for c in cands]
    by_name = {c.name: c for c in cands}

    def meets(res: dict) -> bool:
        return gate.met(res, target) and (max_logit_mse is None or res["logit_mse"] <= max_logit_mse + 1e-12)

    what = f"{gate.describe()}; target on the tuning set {target:.4g}" + (
        "" if max_logit_mse is None else f", logit MSE <= {max_logit_mse:.4g}")
    smoothing = None
    with tempfile.TemporaryDirectory(prefix=".cahp-int8-", dir=Path(dst).parent) as scratch:
        # 1-2: everything quantized, per-tensor and/or per-channel
        granularity, quantized = _quantize_all(search, Path(src), Path(scratch), len(cands), per_channel, say)
        chosen = max(quantized, key=lambda pc: (granularity[_granularity_name(pc)]["agreement"],
                                                -granularity[_granularity_name(pc)]["logit_mse"]))
        mixer = Mixer(search.fp32, quantized[chosen], names)
        quantized.clear()  # the full-INT8 graphs are large; only the mixer needs one
        full = granularity[_granularity_name(chosen)]
        cands = [c for c in cands if c.name in mixer.subgraphs]  # what ORT did quantize

        ranked: list[dict] = []
        excluded: list[str] = []
        source = Path(src)
        subset = _sensitivity_batches(search.feeds, sensitivity_examples)
        if search_nodes and not meets(full):
            ranked = _sensitivity(search, mixer, cands, subset, say)  # 3: leave-one-in
            order = [r["name"] for r in ranked]
            smoothed = None
            if smooth_alpha is not None:  # 4a: smooth the fewest most sensitive, every node INT8
                smoother = _Smoother(search, order, smooth_alpha, chosen, Path(scratch))
                smoothed = smoother.fewest(meets, say)
                if smoothed is None:  # 4b on the graph with every node smoothed
                    smoothed = len(order)
                    fp32_graph, int8_graph, _ = smoother.build(smoothed)
                    mixer = Mixer(onnx.load(str(fp32_graph)), onnx.load(str(int8_graph)), names)
                    excluded = _bisect(search, mixer, order, meets, what, say)
                source = smoother.build(smoothed)[0]
                smoothing = smoother.record(smoothed)
            else:
                excluded = _bisect(search, mixer, order, meets, what, say)  # 4b

        # the shipped file: ORT's own quantizer with nodes_to_exclude, evaluated once more
        say(f"int8: writing {Path(dst).name} with {len(excluded)} of {len(cands)} nodes in fp32"
            + (f", {smoothing['nodes']} smoothed" if smoothing else ""))

        def write_shipped() -> Path:
            quant.quantize_int8(source, Path(dst), per_channel=chosen, nodes_to_exclude=[by_name[n].quantizer_name for n in excluded])
            return Path(dst)

        shipped = search.probe(write_shipped, "shipped file (quantize_dynamic, nodes_to_exclude)",
                               {"fp32_nodes": excluded, "num_fp32": len(excluded),
                                **({"smoothed_nodes": smoothing["node_names"]} if smoothing else {})})
    ex_nodes = [by_name[n] for n in excluded]
    record = _record(search, mixer, cands, ex_nodes, chosen, per_channel, granularity, gate, target, margin, shipped, ranked,
                     subset, search_nodes, threads, started)
    record["max_logit_mse"] = max_logit_mse
    record["smoothed_nodes"] = smoothing["node_names"] if smoothing else []
    log.info("int8: %d/%d nodes in fp32 (%.1f%% of MACs), %d smoothed, tuning %s", len(ex_nodes), len(cands),
             100 * record["fp32_mac_fraction"], len(record["smoothed_nodes"]), shipped)
    return Int8Result(per_channel=chosen, excluded=ex_nodes, candidates=cands, record=record, smoothing=smoothing)


__all__ = ["Int8Result", "Mixer", "QuantNode", "SEARCH_SMOOTH_ALPHA", "SENSITIVITY_EXAMPLES", "TUNING_EXAMPLES", "TUNING_THREADS",
           "not_quantized", "quantizable_nodes", "session", "tune_int8"]
