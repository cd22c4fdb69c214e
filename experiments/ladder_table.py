"""The recovery table of issue #26: rungs of a progressive ladder x recoveries, scored against dense.

Takes a budget run made with ``--ladder macs`` (its ``search/schedule.json``), rebuilds the chosen
rungs from dense with their kept sets and recovers each in several ways, then scores every model on
the decision rows (the first ``ROWS`` of ``SPLIT``): accuracy, agreement with dense, the discordant
rows each way, the drop and its 95% upper bound (the search's level), and wall time of the recovery.

    python experiments/ladder_table.py RUN_OUT MODEL DATA SPLIT ROWS MAX_LENGTH TEXT RUNGS RECOVERIES OUT_STEM

``TEXT`` is the unlabelled text for distillation (a dataset dir; its ``train`` split; a fifth, at most
1,000 rows, held out as the judge). ``RUNGS``: comma-separated rung ids (percent of dense MACs).
``--render STEM`` writes the markdown from a (partial) STEM.json. ``RECOVERIES``: comma-separated from ``none``, ``ls`` (least-squares refit), ``gold`` (fine-tune on 2,000
gold-labelled train rows, 3 epochs, as ``recover``'s default), ``logit`` (distillation, logits only,
from the pruned model), ``hidden`` (logit + hidden-state distillation from the pruned model), ``ls+logit``,
``ls+hidden`` (refit, then logit + hidden-state distillation).
Distilled models are scored whether or not the judge would keep them; ``judge`` says what it would do.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cahp_deploy import evaluation
from cahp_deploy.data import load_labelled, load_texts, without_rows_of
from cahp_deploy.modeling import load_classifier
from cahp_deploy.paired import paired_drop
from cahp_deploy.pruning.rewrite import prune_model
from cahp_deploy.recovery import RecoveryParams, finetune_in_place
from cahp_deploy.recovery.distill import DistillParams, agreement, distill_in_place, split_judge
from cahp_deploy.recovery.reconstruct import reconstruct
from cahp_deploy.recovery.stage import sample_examples


def score(model, tok, rows, dense_pred, labels, max_length) -> dict:
    pred = evaluation.logits(model, tok, rows, max_length=max_length).argmax(axis=1)
    d = paired_drop(dense_pred == labels, pred == labels, 0.95)
    return {"accuracy": round(100 * float((pred == labels).mean()), 2),
            "agreement": round(100 * float((pred == dense_pred).mean()), 2),
            "only_dense_right": d.ref_only, "only_it_right": d.new_only, "drop": round(d.drop, 2),
            "upper_95": round(d.upper, 2)}


def main(run_out, model, data, split, rows, max_length, text, rungs, recoveries, stem) -> None:
    torch.set_num_threads(2)
    max_length, rows = int(max_length), int(rows)
    schedule = {r["k"]: r for r in json.loads((Path(run_out) / "search" / "schedule.json").read_text())["rungs"]}
    decision = load_labelled(data, split)
    decision = decision.subset(np.arange(min(rows, len(decision))))
    labels = np.asarray(decision.labels)
    train = load_labelled(data, "train")
    calib = sample_examples(train, 2000, 42)
    dense, tok = load_classifier(model, attn_implementation=None)
    dense_pred = evaluation.logits(dense, tok, decision, max_length=max_length).argmax(axis=1)
    unseen = [decision] + [load_labelled(data, x) for x in ("test", "validation_mismatched")
                           if (Path(data) / f"{x}.jsonl").is_file()]
    text_rows, dropped = without_rows_of(load_texts(text, "train"), *unseen)  # never distil on rows we judge on
    text_train, judge = split_judge(text_rows, 42)
    text_train = sample_examples(text_train, int(os.environ.get("TEXT_ROWS", 20000)), 42)
    judge_ref = evaluation.logits(dense, tok, judge, max_length=max_length).argmax(axis=1)
    out = Path(__file__).parent / "results" / "reconstruct"
    results = []
    for k in [int(x) for x in rungs.split(",")]:
        r = schedule[k]
        pruned = prune_model(copy.deepcopy(dense), r["kept_heads"], r["kept_neurons"])
        refit = None
        for how in recoveries.split(","):
            start = time.perf_counter()
            net, extra = copy.deepcopy(pruned), {}
            if how.startswith("ls"):
                if refit is None:
                    refit = copy.deepcopy(pruned)
                    reconstruct(refit, dense, tok, calib, max_length=max_length, seed=42)
                    refit_seconds = time.perf_counter() - start
                net = copy.deepcopy(refit)
                extra["refit_seconds"] = round(refit_seconds, 1)
            if how == "gold":
                finetune_in_place(net, tok, sample_examples(train, 2000, 42), RecoveryParams(max_length=max_length))
            if how in ("logit", "hidden", "ls+logit", "ls+hidden"):
                before = agreement(net, tok, judge, judge_ref, max_length)
                rec = distill_in_place(net, dense, tok, text_train, max_length=max_length,
                                       params=DistillParams(hidden_weight=1.0 if how.endswith("hidden") else 0.0))
                after = agreement(net, tok, judge, judge_ref, max_length)
                extra.update(judge_before=round(100 * before, 2), judge_after=round(100 * after, 2),
                             judge_keeps=after > before, distill_seconds=round(rec["train_seconds"], 1))
            row = {"rung": k, "macs_removed": round(1 - r["macs_kept"], 4),
                   "heads": sum(map(len, r["kept_heads"])), "neurons": sum(map(len, r["kept_neurons"])),
                   "recovery": how, **score(net, tok, decision, dense_pred, labels, max_length),
                   "seconds": round(time.perf_counter() - start, 1), **extra}
            print(json.dumps(row), flush=True)
            results.append(row)
            (out / f"{stem}.json").write_text(json.dumps({"run": str(run_out), "split": split, "rows": len(decision),
                                                          "text": str(text), "text_rows": len(text_train), "text_dropped": dropped,
                                                          "judge_rows": len(judge), "results": results}, indent=1))
    render(stem)


def render(stem: str) -> None:
    """``results/reconstruct/STEM.md`` from ``STEM.json`` (also for a table stopped part way)."""
    out = Path(__file__).parent / "results" / "reconstruct"
    record = json.loads((out / f"{stem}.json").read_text())
    results, data = record["results"], record["run"]
    lines = [f"# Rungs x recoveries ({record['split']}, decision rows: {record['rows']})", "",
             f"`python experiments/ladder_table.py` on the progressive ladder of `{Path(data).name}`. Distillation text: "
             f"`{Path(record['text']).name}` ({record['text_rows']} rows; {record['judge_rows']} held out as the judge; "
             f"{record.get('text_dropped', 0)} dropped as evaluation rows). Drop = dense minus "
             "the model, points; upper bound at 95% (the search's level). Seconds = the recovery's wall time on "
             "the shared 2-core machine (3-6 jobs beside it). Distillation: 1 epoch, lr 5e-5, T 2; scored whether "
             "or not the judge keeps it.", "",
             "| rung (% MACs kept) | MACs removed | heads / neurons | recovery | accuracy | agreement | only dense right / "
             "only it right | drop (upper) | judge agreement before -> after (kept?) | seconds |",
             "|---:|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for x in results:
        judge_words = "—" if "judge_before" not in x else \
            f"{x['judge_before']:.1f}% -> {x['judge_after']:.1f}% ({'kept' if x['judge_keeps'] else 'undone'})"
        lines.append(f"| {x['rung']} | {x['macs_removed']:.0%} | {x['heads']} / {x['neurons']} | {x['recovery']} | "
                     f"{x['accuracy']:.2f} | {x['agreement']:.1f}% | {x['only_dense_right']} / {x['only_it_right']} | "
                     f"{x['drop']:+.2f} ({x['upper_95']:+.2f}) | {judge_words} | {x['seconds']:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "--render":
        render(sys.argv[2])
    else:
        main(*sys.argv[1:11])
