"""Which cuts keep the dense model's answers per MAC removed: heads, FFN neurons, or both (issue #26)?

Takes a budget run's CAHP evidence (``OUT/search/evidence.pkl``, joint: FFN statistics included) and
builds each cut ``HEADS:FFN_SHARE:FFN_METHOD`` (CAHP's selection at HEADS clusters; FFN neurons at that
keep share ranked by ``cahp`` or ``gradient``), prunes it, refits it against dense (the search's
recovery) and scores it on the decision rows (the first ``ROWS`` of ``SPLIT``): agreement with dense,
discordant rows each way, drop and its upper bound (95%, the search's level), MACs removed.

    python experiments/cut_probe.py RUN_OUT MODEL DATA SPLIT ROWS MAX_LENGTH CUT [CUT ...]
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cahp_deploy import evaluation, pruning
from cahp_deploy.data import load_labelled
from cahp_deploy.methods.cahp import select_at
from cahp_deploy.modeling import load_classifier
from cahp_deploy.paired import paired_drop
from cahp_deploy.recovery.refit import refit
from cahp_deploy.run.accuracy_budget import SearchSettings
from cahp_deploy.run.candidates import with_neurons


def predictions(model_dir: Path, data, max_length: int) -> np.ndarray:
    net, tok = load_classifier(model_dir, attn_implementation=None)
    return evaluation.logits(net, tok, data, max_length=max_length).argmax(axis=1)


def main(run_out: str, model: str, data: str, split: str, rows: int, max_length: int, *cuts: str) -> None:
    torch.set_num_threads(1)
    with open(Path(run_out) / "search" / "evidence.pkl", "rb") as f:
        evidence = pickle.load(f)["evidence"]
    decision = load_labelled(data, split)
    decision = decision.subset(np.arange(min(rows, len(decision))))
    train = load_labelled(data, "train")
    labels = np.asarray(decision.labels)
    dense_pred = predictions(Path(model), decision, max_length)
    work = Path(tempfile.mkdtemp(prefix="cut-probe-"))
    for cut in cuts:
        heads, share, method = cut.split(":")
        settings = SearchSettings(model=model, data=data, model_sha256="", select_data=train, eval_data=decision,
                                  recover_split="train", columns={}, seed=42, cahp_options={}, recover=None,
                                  eval_max_examples=None, max_drop=1.0, ffn_keep_ratio=float(share),
                                  ffn_method=method, max_length=max_length)
        start = time.perf_counter()
        sel = select_at(evidence, int(heads))
        if float(share) < 1:
            with_neurons(sel, settings, evidence, float(share))
        sel.to_json(work / f"{cut}.json")
        pruned = pruning.prune(model, work / f"{cut}.json", work / f"{cut}-pruned")
        costs = json.loads((pruned / "pruning.json").read_text())
        before = predictions(pruned, decision, max_length)
        refit(pruned, model, train, work / f"{cut}-refit", max_length=max_length, seed=42)
        after = predictions(work / f"{cut}-refit", decision, max_length)
        d = paired_drop(dense_pred == labels, after == labels, 0.95)
        print(json.dumps({
            "cut": cut, "heads": int(costs["num_heads_kept"]), "neurons": costs.get("num_neurons_kept"),
            "macs_removed": round(1 - costs["macs_seq128"]["total_after"] / costs["macs_seq128"]["total_before"], 4),
            "agreement_before": round(float((before == dense_pred).mean()), 4),
            "agreement_after": round(float((after == dense_pred).mean()), 4),
            "only_dense_right": d.ref_only, "only_it_right": d.new_only,
            "drop": round(d.drop, 2), "upper_95": round(d.upper, 2),
            "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), *sys.argv[7:])
