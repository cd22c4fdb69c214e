"""Does a refit that sees INT8's rounding keep the INT8 model closer to dense? (issue #26)

    python experiments/int8_refit_probe.py DENSE DATA RUNG_DIR JUDGE_DIR OUT.json

RUNG_DIR is a candidate of a run's search (``search/mNNN``: its ``selection.json``). The rung is pruned
from DENSE again and refit twice against dense on the run's calibration rows (2,000 of DATA's train, seed 0):
as ``run`` does (fp32 stream), and with the pruned model's Linears computing as ONNX Runtime's dynamic
INT8 will (``recovery.qat.simulated_int8``), so that each layer's refit also undoes the rounding error
the INT8 layers below it leave. Both are judged on JUDGE_DIR's train split (rows no decision saw and
dense never trained on) against dense fp32: argmax agreement and the rows only one of them gets right,
in fp32 and under simulated INT8 (dense INT8 alongside). Max length 254 (MNLI's).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAX_LENGTH = 254


def main(dense: str, data: str, rung: str, judge: str, out: str) -> None:
    from cahp_deploy import evaluation
    from cahp_deploy.data import load_labelled
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.pruning.stage import prune
    from cahp_deploy.recovery.qat import simulated_int8
    from cahp_deploy.recovery.reconstruct import reconstruct
    from cahp_deploy.recovery.stage import sample_examples

    calibration = sample_examples(load_labelled(data, "train"), 2000, 0)
    rows = load_labelled(judge, "train")
    labels = np.asarray(rows.labels)
    dense_model, tokenizer = load_classifier(dense, attn_implementation=None)

    def judged(model, int8: bool) -> np.ndarray:
        if not int8:
            return evaluation.logits(model, tokenizer, rows, max_length=MAX_LENGTH).argmax(1)
        with simulated_int8(model):
            return evaluation.logits(model, tokenizer, rows, max_length=MAX_LENGTH).argmax(1)

    reference = judged(dense_model, False)
    result: dict = {"rung": rung, "judge_rows": len(rows), "calibration_rows": len(calibration)}

    def score(name: str, pred: np.ndarray) -> None:
        right_d, right_m = reference == labels, pred == labels
        result[name] = {"agreement": float((pred == reference).mean()), "accuracy": float(right_m.mean()),
                        "only_dense_right": int((right_d & ~right_m).sum()),
                        "only_it_right": int((right_m & ~right_d).sum())}
        print(name, result[name], flush=True)

    score("dense int8", judged(dense_model, True))
    with tempfile.TemporaryDirectory() as tmp:
        pruned_dir = prune(dense, Path(rung) / "selection.json", Path(tmp) / "pruned")
        for how in ("fp32 stream", "int8 stream"):
            model, _ = load_classifier(pruned_dir, attn_implementation=None, with_tokenizer=False)
            start = time.perf_counter()
            if how == "int8 stream":
                with simulated_int8(model):
                    reconstruct(model, dense_model, tokenizer, calibration, max_length=MAX_LENGTH)
            else:
                reconstruct(model, dense_model, tokenizer, calibration, max_length=MAX_LENGTH)
            result[f"refit seconds ({how})"] = time.perf_counter() - start
            score(f"refit on {how}: fp32", judged(model, False))
            score(f"refit on {how}: int8", judged(model, True))
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:6])
