"""Which head ordering keeps more accuracy at the same cut: CAHP's or `--method gradient`'s (issue #26)?

Takes a budget run's CAHP evidence (``OUT/search/evidence.pkl``, joint: FFN statistics included), cuts
it at ``k`` heads with the ladder's FFN share (CAHP's cut), and builds the same-size cut whose heads are
ranked by `--method gradient` (the same kept FFN neurons, so only the head ordering differs). Both are
pruned and refit against dense (the budget search's recovery), then scored on validation and test:
accuracy, agreement with dense, the discordant rows each way, the drop and its upper bound (95%, the
search's level). Writes ``experiments/results/reconstruct/ordering.md`` and ``.json``.

    python experiments/ordering_probe.py RUN_OUT MODEL DATA K [FFN_FLOOR] [cahp,gradient]

With ``cahp`` alone it is the rung table of one cut: none vs the refit, on validation and test.
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
from cahp_deploy.methods import stage as select_stage
from cahp_deploy.methods.cahp import select_at
from cahp_deploy.modeling import load_classifier
from cahp_deploy.paired import paired_drop
from cahp_deploy.recovery.refit import refit
from cahp_deploy.run.accuracy_budget import SearchSettings
from cahp_deploy.run.candidates import with_neurons
from cahp_deploy.run.budget_search import ffn_ratio
from cahp_deploy.selection.result import Selection

SEARCH_CONFIDENCE = 0.95


def predictions(model_dir: Path, data, max_length: int) -> np.ndarray:
    net, tok = load_classifier(model_dir, attn_implementation=None)
    return evaluation.logits(net, tok, data, max_length=max_length).argmax(axis=1)


def scores(pred: np.ndarray, dense_pred: np.ndarray, labels: np.ndarray) -> dict:
    d = paired_drop(dense_pred == labels, pred == labels, SEARCH_CONFIDENCE)
    return {"accuracy": round(100 * float((pred == labels).mean()), 2),
            "agreement": round(100 * float((pred == dense_pred).mean()), 2),
            "only_dense_right": d.ref_only, "only_it_right": d.new_only,
            "drop": round(d.drop, 2), "upper_95": round(d.upper, 2)}


def main(run_out: str, model: str, data: str, k: int, floor: float = 0.5, orderings: str = "cahp,gradient") -> None:
    torch.set_num_threads(1)
    with open(Path(run_out) / "search" / "evidence.pkl", "rb") as f:
        evidence = pickle.load(f)["evidence"]
    splits = {s: load_labelled(data, s) for s in ("validation", "test")}
    train = load_labelled(data, "train")
    max_length = 66 if "sst5" in data else 254  # the run's serving length (its longest row)
    settings = SearchSettings(model=model, data=data, model_sha256="", select_data=train, eval_data=splits["validation"],
                              recover_split="train", columns={}, seed=42, cahp_options={}, recover=None,
                              eval_max_examples=None, max_drop=1.0, ffn_keep_ratio=floor, max_length=max_length)
    share = ffn_ratio(k, evidence.knee.k, evidence.num_heads, floor)
    cahp = select_at(evidence, k)
    with_neurons(cahp, settings, evidence, share)
    heads = sum(len(h) for h in cahp.kept_heads)
    work = Path(tempfile.mkdtemp(prefix="ordering-"))
    cuts = {"cahp": cahp}
    if "gradient" in orderings.split(","):
        select_stage.select(model, data, work / "gradient.json", method="gradient", heads=heads, split="train", seed=42)
        gradient = Selection.from_json(work / "gradient.json")
        gradient.kept_neurons, gradient.neurons_per_layer, gradient.ffn = cahp.kept_neurons, cahp.neurons_per_layer, cahp.ffn
        cuts["gradient"] = gradient
    dense_pred = {s: predictions(Path(model), d, max_length) for s, d in splits.items()}
    rows = {}
    for name, sel in cuts.items():
        start = time.perf_counter()
        sel.to_json(work / f"{name}.sel.json")
        pruned = pruning.prune(model, work / f"{name}.sel.json", work / f"{name}-pruned")
        costs = json.loads((pruned / "pruning.json").read_text())
        refit(pruned, model, train, work / f"{name}-refit", max_length=max_length, seed=42)
        rows[name] = {
            "heads": heads, "neurons": int(sum(len(n) for n in sel.kept_neurons)),
            "macs_removed": round(1 - costs["macs_seq128"]["total_after"] / costs["macs_seq128"]["total_before"], 4),
            **{f"{s}_before": scores(predictions(pruned, d, max_length), dense_pred[s], np.asarray(d.labels))
               for s, d in splits.items()},
            **{s: scores(predictions(work / f"{name}-refit", d, max_length), dense_pred[s], np.asarray(d.labels))
               for s, d in splits.items()},
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(name, json.dumps(rows[name]), flush=True)
    out = Path(__file__).parent / "results" / "reconstruct"
    out.mkdir(parents=True, exist_ok=True)
    stem = "ordering" if len(cuts) > 1 else f"rung_k{k:03d}"
    (out / f"{stem}.json").write_text(json.dumps({"k": k, "ffn_share": share, "rows": rows}, indent=2) + "\n")
    title = "Head ordering at the same cut: CAHP vs gradient" if len(cuts) > 1 else "One rung, none vs the refit: CAHP cut"
    lines = [f"# {title} ({Path(data).name}, k={k}, FFN share {share:.3f})", "",
             f"`python experiments/ordering_probe.py RUN_OUT {Path(model).name} {Path(data).name} {k} {floor}`. Both cuts keep "
             f"{heads} heads and the same FFN neurons (CAHP's complementary neurons at the ladder's share); both are "
             "refit against dense on 2,000 train rows. Drop = dense minus the cut, points; upper bound at 95% (the "
             "search's level).", "",
             "| ordering | MACs removed | split | before refit: acc / agreement / discordant | after refit: acc | "
             "agreement | only dense right / only it right | drop (upper) |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        for s in splits:
            b, a = r[f"{s}_before"], r[s]
            lines.append(f"| {name} | {r['macs_removed']:.0%} | {s} | {b['accuracy']:.2f} / {b['agreement']:.1f}% / "
                         f"{b['only_dense_right'] + b['only_it_right']} | {a['accuracy']:.2f} | {a['agreement']:.1f}% | "
                         f"{a['only_dense_right']} / {a['only_it_right']} | {a['drop']:+.2f} ({a['upper_95']:+.2f}) |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *(float(x) for x in sys.argv[5:6]), *sys.argv[6:7])
