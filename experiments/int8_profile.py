"""Per-op time of artifacts' INT8 graphs (ONNX Runtime's profiler, 1 thread, b32 x 128, 6 runs).

    python experiments/int8_profile.py DENSE_ARTIFACT PRUNED_ARTIFACT OUT.json

Shows where an INT8 graph spends its time (e.g. fused ``QAttention`` vs fp32 attention MatMuls);
results in ``experiments/results/int8_source/``.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

RUNS = 6


def profile(path: Path, prefix: str) -> dict[str, float]:
    """ms per run, summed by op type."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in s.get_inputs():
        if "input_ids" in i.name:
            feeds[i.name] = rng.integers(100, 20000, (32, 128)).astype(np.int64)
        else:
            feeds[i.name] = (np.ones if "mask" in i.name else np.zeros)((32, 128), dtype=np.int64)
    for _ in range(RUNS):
        s.run(None, feeds)
    by: collections.Counter = collections.Counter()
    for e in json.load(open(s.end_profiling())):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"]
    return {k: v / RUNS / 1000 for k, v in by.most_common()}


def main(dense: str, pruned: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: profile(Path(art) / "model_int8.onnx", f"{tmp}/{name}") for name, art in
               (("dense", dense), ("pruned", pruned))}
    for name, ops in res.items():
        print(name, f"total {sum(ops.values()):.1f} ms/run", [(k, round(v, 1)) for k, v in list(ops.items())[:10]])
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
