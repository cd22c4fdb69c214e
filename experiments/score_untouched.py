"""Score a run's artifacts against its dense model on rows no run decision and no probe has seen (issue #26).

    python experiments/score_untouched.py RUN_OUT ROWS_DIR OUT.json [EXTRA_INT8_ONNX]

ROWS_DIR holds one labelled split, ``train.jsonl`` (for MNLI: ``tail -n +5001 validation_matched.jsonl``,
the 4,815 matched rows after the 5,000 the runs decide on; the probes in ``int8_fallback_probe.py`` read
only the first 5,000 and the mismatched split). Scores RUN_OUT's pruned INT8 and optimized graphs and
dense INT8 (and EXTRA_INT8_ONNX, e.g. an earlier run's pruned INT8 graph) against RUN_OUT's dense
optimized graph: accuracy, paired drop with its 90% interval and one-sided upper bound, discordant rows,
agreement. Length-bucketed batches of 32, as ``run`` scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(run_out: str, rows_dir: str, out: str, extra: str | None = None) -> None:
    from transformers import AutoTokenizer

    from cahp_deploy.bench import accuracy
    from cahp_deploy.data import load_labelled
    from cahp_deploy.onnx_runtime import session
    from cahp_deploy.paired import correct, paired_drop

    art = Path(run_out) / "artifacts"
    rows = load_labelled(rows_dir, "train")
    labels = np.asarray(rows.labels)
    max_length = int(json.loads((art / "pruned" / "manifest.json").read_text())["max_length"])
    batches = accuracy.encode(AutoTokenizer.from_pretrained(str(art / "dense")), rows, max_length)

    def predict(path: Path) -> np.ndarray:
        return accuracy.predict(session(path, threads=2), batches, len(rows))

    dense = predict(art / "dense" / "model_optimized.onnx")
    graphs = {"pruned int8 (the run's)": art / "pruned" / "model_int8.onnx",
              "pruned optimized fp32": art / "pruned" / "model_optimized.onnx",
              "dense int8": art / "dense" / "model_int8.onnx"}
    if extra:
        graphs["extra int8: " + extra] = Path(extra)
    result: dict = {"rows": len(rows), "rows_dir": rows_dir, "run": run_out, "reference": "dense optimized fp32 graph",
                    "dense_accuracy": round(float((dense == labels).mean()) * 100, 2)}
    for name, path in graphs.items():
        pred = predict(path)
        d = paired_drop(correct(dense, labels), correct(pred, labels), 0.9).to_dict()
        result[name] = {"accuracy": round(float((pred == labels).mean()) * 100, 2),
                        **{k: round(d[k], 3) for k in ("drop", "low", "high", "upper")},
                        "ref_only": d["ref_only"], "new_only": d["new_only"],
                        "agreement_with_dense": round(float((pred == dense).mean()), 4)}
        print(name, result[name], flush=True)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
