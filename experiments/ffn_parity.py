"""Parity of a heads+FFN-pruned ONNX artifact against the *dense* PyTorch model with the same heads and
neurons zeroed by hooks (cahp_deploy.gates), on real rows. Usage:

    python experiments/ffn_parity.py DENSE_MODEL ARTIFACT_DIR --data DATA --split validation --rows 300

Prints one JSON line per variant: max |logit diff| and argmax agreement over the rows.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort
import torch

from cahp_deploy.data import iter_batches, load_labelled
from cahp_deploy.export.manifest import load_manifest, variant_path
from cahp_deploy.gates import head_mask, neuron_mask
from cahp_deploy.modeling import load_classifier
from cahp_deploy.signals import model_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--rows", type=int, default=300)
    a = ap.parse_args()
    m = load_manifest(a.artifact)
    net, tok = load_classifier(a.model)
    data = load_labelled(a.data, a.split).head(a.rows)
    sessions = {v: ort.InferenceSession(str(variant_path(a.artifact, v)), providers=["CPUExecutionProvider"])
                for v in ("fp32", "optimized") if v in m["variants"]}
    worst = {v: 0.0 for v in sessions}
    agree = {v: 0 for v in sessions}
    with torch.no_grad(), head_mask(net, m["kept_heads"]), neuron_mask(net, m["kept_neurons"]):
        for _, enc, _ in iter_batches(tok, data, batch_size=32, max_length=128):
            ref = net(**model_inputs(net, enc)).logits.numpy()
            for v, s in sessions.items():
                names = {i.name for i in s.get_inputs()}
                got = s.run(None, {k: t.numpy() for k, t in enc.items() if k in names})[0]
                worst[v] = max(worst[v], float(np.abs(got - ref).max()))
                agree[v] += int((got.argmax(-1) == ref.argmax(-1)).sum())
    for v in sessions:
        print(json.dumps({"variant": v, "rows": len(data), "max_abs_diff": worst[v],
                          "argmax_agreement": agree[v] / len(data)}))


if __name__ == "__main__":
    main()
