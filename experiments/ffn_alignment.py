"""Does an FFN width that is a multiple of 16 run faster in ONNX Runtime's dynamic INT8? (issue #26)

    python experiments/ffn_alignment.py widths 1400 1408 1439 1440 ...   # one INT8 FFN per width, timed
    python experiments/ffn_alignment.py selections SCHEDULE.json OUT_DIR  # rung 75 as scheduled / aligned
    python experiments/ffn_alignment.py components ART_DIR ...            # per-component time of INT8 graphs

``widths``: a 384 -> N -> 384 FFN (MatMul, Relu, MatMul) quantized by ``quantize_dynamic``, 1 thread,
b32 x 128, 40 interleaved rounds, median. ``selections`` writes two selection files for the schedule's
75% rung: its widths, and each width rounded to the nearest multiple of 16 (same total; for timing only:
the ids added are arbitrary). Prune and export them with the CLI (``--int8-min-agreement 0``: every
weight MatMul INT8) and time them with ``cahp-deploy bench``. ``components``: each artifact's fp32
graph fused with the ``no_skip_layernorm`` candidate (what ``run`` quantizes on this CPU), quantized
whole, profiled (1 thread, b32 x 128, 6 runs) and summed into attention / FFN / other by node name.
Results: ``experiments/results/align/``.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, BATCH, SEQ = 384, 32, 128


def _session(path: Path, profile_prefix: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ffn(width: int, path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((HIDDEN, width)).astype(np.float32) * 0.05, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((width, HIDDEN)).astype(np.float32) * 0.05, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    shape = [BATCH, SEQ, HIDDEN]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    quantized = path.with_name(path.stem + "_int8.onnx")
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
    return quantized


def widths(*args: str) -> None:
    ns = [int(a) for a in args]
    x = np.random.default_rng(1).standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {n: _session(_ffn(n, Path(tmp) / f"ffn{n}.onnx")) for n in ns}
        times: dict[int, list[float]] = {n: [] for n in ns}
        for _ in range(40):
            for n in ns:
                start = time.perf_counter()
                sessions[n].run(None, {"x": x})
                times[n].append(time.perf_counter() - start)
    for n in ns:
        print(f"{n:5d} {np.median(times[n]) * 1e3:6.2f} ms")


def selections(schedule: str, out: str, k: int = 75, multiple: int = 16) -> None:
    from cahp_deploy.selection.result import Selection

    rung = next(r for r in json.loads(Path(schedule).read_text())["rungs"] if r["k"] == k)
    dense = 1536
    aligned = []
    for kept in rung["kept_neurons"]:
        t = max(multiple, int(round(len(kept) / multiple)) * multiple)
        spare = [i for i in range(dense) if i not in set(kept)]
        aligned.append(sorted(kept)[:t] if t <= len(kept) else sorted(kept + spare[: t - len(kept)]))
    for name, neurons in (("raw", rung["kept_neurons"]), ("aligned", aligned)):
        Selection(method="schedule", kept_heads=rung["kept_heads"], num_heads_total=72, heads_per_layer=12,
                  kept_neurons=neurons, neurons_per_layer=dense).to_json(Path(out) / f"sel_{k}_{name}.json")
        print(name, [len(n) for n in neurons], sum(map(len, neurons)))


def _component(name: str, op: str) -> str:
    if op == "QAttention" or "attention" in name.lower():
        return "attention"
    if "intermediate" in name or ("output" in name and "dense" in name) or op in ("BiasGelu", "Gelu"):
        return "ffn"
    return "other"


def components(*artifacts: str) -> None:
    from cahp_deploy.export.int8.quantize import quantize_int8
    from cahp_deploy.export.optimize import build_candidate

    rng = np.random.default_rng(0)
    for art in artifacts:
        with tempfile.TemporaryDirectory() as tmp:
            fused, quantized = Path(tmp) / "fused.onnx", Path(tmp) / "int8.onnx"
            onnx.save(build_candidate(Path(art) / "model.onnx", "no_skip_layernorm", "bert"), str(fused))
            quantize_int8(fused, quantized)
            s = _session(quantized, f"{tmp}/profile")
            feeds = {i.name: (rng.integers(100, 20000, (BATCH, SEQ)) if "input_ids" in i.name else
                              (np.ones if "mask" in i.name else np.zeros)((BATCH, SEQ))).astype(np.int64)
                     for i in s.get_inputs()}
            for _ in range(6):
                s.run(None, feeds)
            by: collections.Counter = collections.Counter()
            for e in json.load(open(s.end_profiling())):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    by[_component(e["name"], e["args"]["op_name"])] += e["dur"] / 6000
        total = sum(by.values())
        print(art, f"total {total:.1f} ms/run", {c: f"{v:.1f} ({100 * v / total:.0f}%)" for c, v in by.most_common()})


if __name__ == "__main__":
    {"widths": widths, "selections": selections, "components": components}[sys.argv[1]](*sys.argv[2:])
