"""Does training towards dense, after the least-squares refit, raise agreement with dense on unseen rows (issue #26)?

Takes refit model dirs (e.g. from ``experiments/cut_probe.py``) and, for each, distils towards dense
(:mod:`cahp_deploy.recovery.distill`: logit KL, with and without per-layer hidden-state matching) on
a text source, then scores on the decision rows (the first ``ROWS`` of ``SPLIT``): agreement, discordant
rows, drop and its 95% upper bound, wall time. ``judge`` rows (agreement only, never trained on) say
whether the training would be kept.

    python experiments/distill_probe.py MODEL DATA SPLIT ROWS MAX_LENGTH TRAIN_SOURCE JUDGE_SOURCE VARIANT REFIT_DIR [...]

A source is ``SPLIT[START:STOP]`` of DATA (e.g. ``train[0:10000]``, ``validation_matched[7000:9815]``) or
``PATH::SPLIT[START:STOP]`` for another dataset (text only is used). VARIANT: ``logit`` | ``logit+hidden``.
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import torch

from cahp_deploy import evaluation
from cahp_deploy.data import load_labelled
from cahp_deploy.modeling import load_classifier
from cahp_deploy.paired import paired_drop
from cahp_deploy.recovery.distill import DistillParams, agreement, distill_if_it_helps


def source(data: str, spec: str):
    path, _, rest = spec.rpartition("::")
    m = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", rest)
    rows = load_labelled(path or data, m.group(1))
    return rows.subset(np.arange(int(m.group(2)), min(int(m.group(3)), len(rows))))


def main(model: str, data: str, split: str, rows: int, max_length: int, train_spec: str, judge_spec: str,
         variant: str, *refit_dirs: str) -> None:
    torch.set_num_threads(2)
    decision = load_labelled(data, split)
    decision = decision.subset(np.arange(min(rows, len(decision))))
    labels = np.asarray(decision.labels)
    dense, tok = load_classifier(model, attn_implementation=None)
    dense_pred = evaluation.logits(dense, tok, decision, max_length=max_length).argmax(axis=1)
    train, judge = source(data, train_spec), source(data, judge_spec)
    params = DistillParams(hidden_weight=1.0 if variant == "logit+hidden" else 0.0)
    for d in refit_dirs:
        net, _ = load_classifier(d, attn_implementation=None)
        start = time.perf_counter()
        rec = distill_if_it_helps(net, dense, tok, train, judge, max_length=max_length, params=params)
        seconds = time.perf_counter() - start
        if not rec["kept"]:  # score the trained weights anyway: the probe wants to see them
            net, _ = load_classifier(d, attn_implementation=None)
            from cahp_deploy.recovery.distill import distill_in_place
            distill_in_place(net, dense, tok, train, max_length=max_length, params=params)
        pred = evaluation.logits(net, tok, decision, max_length=max_length).argmax(axis=1)
        dd = paired_drop(dense_pred == labels, pred == labels, 0.95)
        print(json.dumps({"model": d, "variant": variant, "train": train_spec, "judge": judge_spec,
                          "kept": rec["kept"], "judge_before": round(rec["agreement_before"], 4),
                          "judge_after": round(rec["agreement_after"], 4),
                          "decision_agreement": round(float((pred == dense_pred).mean()), 4),
                          "only_dense_right": dd.ref_only, "only_it_right": dd.new_only,
                          "drop": round(dd.drop, 2), "upper_95": round(dd.upper, 2), "seconds": round(seconds, 1),
                          "losses": rec["training"]["epochs"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:])
