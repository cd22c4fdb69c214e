"""Which fusion candidate should INT8 quantize? Each candidate of ``export/optimize.py``, every weight
MatMul INT8, timed interleaved (as export times its candidates), for a dense and a pruned artifact.

    python experiments/int8_source.py ARTIFACT_DIR [ARTIFACT_DIR ...] --budget 40 --threads 1 [--json OUT]

Why: the INT8 graph is quantized from the fp32 candidate the fp32 timing chose. ORT quantizes a fused
``Attention`` node into ``QAttention``; an unfused graph keeps the attention MatMuls, Softmax and
Transposes in fp32. A fp32 timing with a few noisy rounds can choose either, and the INT8 graph inherits it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx

from cahp_deploy.export.int8.quantize import quantize_int8
from cahp_deploy.export.manifest import load_manifest
from cahp_deploy.export.optimize import CANDIDATES, UNFUSED, build_candidate, time_graphs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--budget", type=float, default=40.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for art in args.artifacts:
            art = Path(art)
            manifest = load_manifest(art)
            plain = art / "model.onnx"
            paths = {}
            for name in [UNFUSED, *CANDIDATES]:
                src = plain
                if name != UNFUSED:
                    src = Path(tmp) / f"{art.name}_{name}.onnx"
                    onnx.save(build_candidate(plain, name, "bert"), str(src))
                dst = Path(tmp) / f"{art.name}_{name}_int8.onnx"
                quantize_int8(src, dst, per_channel=False)
                paths[f"{name} int8"] = dst
            paths["shipped int8"] = art / "model_int8.onnx"
            timings = time_graphs(paths, shapes=((1, 128), (32, 128)), vocab=30000, budget_s=args.budget)
            out[str(art)] = {"fp32 choice": manifest["variants"]["optimized"]["choice"], "timings_ms": timings}
            print(art, json.dumps(out[str(art)], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
