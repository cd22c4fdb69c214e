"""How much does a dynamic-INT8 graph's prediction for a row depend on the rows batched with it? (issue #26)

    python experiments/int8_batch_dependence.py DENSE RUN_OUT DATA SPLIT MAX_ROWS OUT.json

ONNX Runtime's dynamic quantization scales each MatMul's input by the min and max of the whole input
tensor, i.e. of every row (and padding position) in the batch, so the same row can get another label
in another batch. This runs ``RUN_OUT/artifacts/{dense,pruned}``'s INT8 graphs on the first MAX_ROWS rows
of DATA's SPLIT (DENSE: the run's dense model) in length-bucketed batches of 1, 8, 32 and 64 (what ``run`` scores with: 32), and in
batches of 32 drawn in file order (more padding), and counts the rows whose label changes against
batch 32 bucketed, and each setting's paired drop vs the dense PyTorch model (``run``'s reference).
The PyTorch simulation of the same rounding (``recovery.qat.simulated_int8``, the ladder's judge) of
the search's chosen model is scored alongside.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(dense_model: str, run_out: str, data: str, split: str, max_rows: str, out: str) -> None:
    from cahp_deploy import evaluation
    from cahp_deploy.bench import accuracy
    from cahp_deploy.data import load_labelled
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.onnx_runtime import session
    from cahp_deploy.paired import correct, paired_drop
    from cahp_deploy.recovery.qat import simulated_int8

    rows = load_labelled(data, split).head(int(max_rows))
    labels = np.asarray(rows.labels)
    manifest = json.loads((Path(run_out) / "artifacts" / "pruned" / "manifest.json").read_text())
    max_length = int(manifest["max_length"])
    dense, tok = load_classifier(dense_model, attn_implementation=None)
    search = json.loads((Path(run_out) / "search" / "search.json").read_text())
    torch_dirs = {"dense": Path(dense_model), "pruned": Path(run_out) / "search" / search["chosen_dir"] / "model"}
    reference = evaluation.logits(dense, tok, rows, max_length=max_length).argmax(1)
    ref_correct = correct(reference, labels)

    def score(pred: np.ndarray, base: np.ndarray | None) -> dict:
        drop = paired_drop(ref_correct, correct(pred, labels), 0.95).to_dict()
        return {"accuracy": float((pred == labels).mean()), "drop": drop["drop"], "upper": drop["upper"],
                "agreement_with_dense": float((pred == reference).mean()),
                "changed_vs_batch32": None if base is None else int((pred != base).sum())}

    result: dict = {"rows": len(rows), "split": split, "max_length": max_length}
    for name in ("dense", "pruned"):
        art = Path(run_out) / "artifacts" / name
        s = session(art / "model_int8.onnx", threads=2)
        base = accuracy.predict(s, accuracy.encode(tok, rows, max_length, 32), len(rows))
        res = {"bucketed b32": score(base, None)}
        for b in (1, 8, 64):
            res[f"bucketed b{b}"] = score(accuracy.predict(s, accuracy.encode(tok, rows, max_length, b), len(rows)), base)
        unbucketed = accuracy.encode(tok, rows, max_length, 32, bucket=False)
        res["file order b32"] = score(accuracy.predict(s, unbucketed, len(rows)), base)
        model, _ = load_classifier(torch_dirs[name], attn_implementation=None)
        with simulated_int8(model):
            res["pytorch simulated int8"] = score(evaluation.logits(model, tok, rows, max_length=max_length).argmax(1), base)
        res["pytorch fp32"] = score(evaluation.logits(model, tok, rows, max_length=max_length).argmax(1), base)
        result[name] = res
        for setting, r in res.items():
            print(name, setting, r, flush=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:7])
