"""Which neurons should the ladder remove when every rung is refit: ranked by salience, or by what the refit cannot recover?

Issue #26. At the same kept-neuron counts (all heads kept), compares the ladder's neuron orders:
``cahp`` (persistence over CAHP's complementary-neuron cuts), ``gradient`` (salience), ``surgeon``
(structured Optimal Brain Surgeon on each FFN output projection's input Gram, costs scaled by the
variance of the stream its LayerNorm normalises, merged across layers cheapest first; ``surgeon.py``)
and ``hybrid-cahp`` / ``hybrid-gradient`` (that order's per-layer counts, the surgeon's choice inside
each layer). ``schedule:PATH:K`` takes rung K of a committed ladder (heads and neurons) as it is. Each
cut is pruned and refit against dense (the search's recovery), then scored against dense on HELD rows
that no decision uses (agreement, discordant rows). Appends to ``results/reconstruct/surgeon_MODEL.jsonl``.

    python experiments/surgeon_probe.py MODEL DATA EVIDENCE_PKL MAX_LENGTH HELD_SPLIT HELD_FROM HELD_TO NEURONS[,..] ORDERS[,..]

``EVIDENCE_PKL``: ``{"evidence": ...}`` as a budget run's ``search/evidence.pkl`` holds it. Environment:
``REFIT_ROWS`` (calibration rows of the refit, default 2000), ``HEAD_REFIT=r`` (then also refit the
classifier's last linear map to dense's logits, ridge r).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cahp_deploy import evaluation, pruning
from cahp_deploy.data import load_labelled
from cahp_deploy.modeling import load_classifier
from cahp_deploy.recovery.refit import refit
from cahp_deploy.recovery.stage import sample_examples
from cahp_deploy.run.candidates import _rung_selection
from cahp_deploy.run.progressive import CALIBRATION_ROWS, Rung, neuron_order
from cahp_deploy.selection.removal_order import layer_of_units, next_units, per_layer
from surgeon import check, collect_grams, merged_order, removal_order


_SURGEON: dict = {}


def surgeon_orders(model_dir: str, train, max_length: int):
    """Per FFN layer: the surgeon's order, and the layer's stream variance (cached per process)."""
    if model_dir not in _SURGEON:
        net, tok = load_classifier(model_dir, attn_implementation=None)
        grams = [g for g in collect_grams(net, tok, sample_examples(train, CALIBRATION_ROWS, 42), max_length=max_length)
                 if g.site == "ffn"]
        _SURGEON[model_dir] = ([removal_order(g.gram, g.weight, keep=1) for g in grams], grams)
    return _SURGEON[model_dir]


def surgeon_neuron_order(model_dir: str, train, max_length: int) -> list[int]:
    orders, grams = surgeon_orders(model_dir, train, max_length)
    inter = grams[0].gram.shape[0] - 1
    return merged_order(orders, [i * inter for i in range(len(grams))], [1 / g.stream_variance for g in grams])


def hybrid_removed(model_dir, train, max_length, allocation_order, npl, count) -> list[int]:
    """The allocation order's per-layer removal counts at ``count`` kept neurons, each layer's removed
    neurons chosen by the surgeon (nested, since both are)."""
    base = next_units(allocation_order, set(), sum(npl) - count, layer_of_units(npl), min_per_layer=1)
    per = np.bincount(np.asarray(layer_of_units(npl))[base], minlength=len(npl))
    orders, _ = surgeon_orders(model_dir, train, max_length)
    return [layer * npl[0] + u for layer, o in enumerate(orders) for u in o.order[: per[layer]]]


def head_refit(net, dense_dir, tok, rows, max_length, r) -> None:
    """Probe: refit the classifier's last linear map so the pruned model's logits match dense's (ridge r)."""
    dense, _ = load_classifier(dense_dir, attn_implementation=None, with_tokenizer=False)
    target = torch.as_tensor(evaluation.logits(dense, tok, rows, max_length=max_length), dtype=torch.float64)
    seen = []
    handle = net.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    got = evaluation.logits(net, tok, rows, max_length=max_length)
    handle.remove()
    # evaluation.logits buckets rows by length: put the pooled outputs back in row order via the logits
    from cahp_deploy.data import iter_batches
    order = np.concatenate([idx for idx, _, _ in iter_batches(tok, rows, batch_size=32, max_length=max_length)])
    x = torch.cat(seen).to(torch.float64)
    xs = torch.empty_like(x)
    xs[torch.as_tensor(order)] = x
    xa = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    w0 = torch.cat([net.classifier.weight.detach().double().T, net.classifier.bias.detach().double()[None]], 0)
    assert np.allclose((xa @ w0).numpy(), got, atol=1e-3), "row order mismatch"
    lam = r * float(torch.diagonal(xa.T @ xa)[:-1].mean())
    pen = torch.ones(xa.shape[1], dtype=torch.float64); pen[-1] = 0
    wa = torch.linalg.solve(xa.T @ xa + lam * torch.diag(pen), xa.T @ target + lam * pen[:, None] * w0)
    with torch.no_grad():
        net.classifier.weight.copy_(wa[:-1].T.float())
        net.classifier.bias.copy_(wa[-1].float())


def main(model, data, evidence_pkl, max_length, held_split, lo, hi, counts, orders) -> None:
    torch.set_num_threads(2)
    check()
    max_length = int(max_length)
    evidence = pickle.load(open(evidence_pkl, "rb"))["evidence"]
    train = load_labelled(data, "train")
    held = load_labelled(data, held_split).subset(np.arange(int(lo), int(hi)))
    npl = [int(n) for n in evidence.ffn.neurons_per_layer]
    hpl = list(evidence.heads_per_layer)
    dense_pred = None
    net, tok = load_classifier(model, attn_implementation=None)
    dense_pred = evaluation.logits(net, tok, held, max_length=max_length).argmax(axis=1)
    del net
    work = Path(tempfile.mkdtemp(prefix="surgeon-"))
    out = Path(__file__).parent / "results" / "reconstruct" / f"surgeon_{Path(model).name}.jsonl"
    for name in orders.split(","):
        t = time.perf_counter()
        if name.startswith("schedule:"):  # a committed ladder's rung, heads and neurons as it kept them
            path, k = name.split(":")[1:]
            rungs = {r["k"]: r for r in json.loads(Path(path).read_text())["rungs"]}
            order = None
        elif name == "surgeon":
            order = surgeon_neuron_order(model, train, max_length)
        else:
            order = neuron_order(evidence, name.removeprefix("hybrid-"), 42)
        order_s = time.perf_counter() - t
        for count in (int(c) for c in counts.split(",")):
            start = time.perf_counter()
            if order is None:
                kept = rungs[int(k)]["kept_neurons"]
                heads = rungs[int(k)]["kept_heads"]
            elif name.startswith("hybrid-"):
                removed = hybrid_removed(model, train, max_length, order, npl, count)
            else:
                removed = next_units(order, set(), sum(npl) - count, layer_of_units(npl), min_per_layer=1)
            if order is not None:
                kept = per_layer(set(range(sum(npl))) - set(removed), npl)
                heads = per_layer(range(sum(hpl)), hpl)
            rung = Rung(0, 0.0, heads, kept, 0.0, "neurons", 0.0)
            sel = _rung_selection(evidence, rung)
            tag = f"{name}-{count}".replace("/", "_").replace(":", "_")
            sel.to_json(work / f"{tag}.json")
            pruned = pruning.prune(model, work / f"{tag}.json", work / f"{tag}-pruned")
            refit(pruned, model, train, work / f"{tag}-refit", max_length=max_length, seed=42,
                  max_examples=int(os.environ.get("REFIT_ROWS", "2000")))
            net, tok = load_classifier(work / f"{tag}-refit", attn_implementation=None)
            if os.environ.get("HEAD_REFIT"):
                head_refit(net, model, tok, sample_examples(train, int(os.environ.get("REFIT_ROWS", "2000")), 42),
                           max_length, float(os.environ["HEAD_REFIT"]))
            pred = evaluation.logits(net, tok, held, max_length=max_length).argmax(axis=1)
            labels = np.asarray(held.labels)
            row = {"order": name, "heads": sum(map(len, heads)), "neurons": sum(map(len, kept)), "refit_rows": int(os.environ.get("REFIT_ROWS", "2000")), "head_refit": os.environ.get("HEAD_REFIT"), "per_layer": [len(k) for k in kept],
                   "held": f"{held_split}[{lo}:{hi}]", "agreement": round(100 * float((pred == dense_pred).mean()), 2),
                   "discordant": int((pred != dense_pred).sum()),
                   "only_dense_right": int(((dense_pred == labels) & (pred != labels)).sum()),
                   "only_it_right": int(((dense_pred != labels) & (pred == labels)).sum()),
                   "accuracy": round(100 * float((pred == labels).mean()), 2),
                   "dense_accuracy": round(100 * float((dense_pred == labels).mean()), 2),
                   "order_seconds": round(order_s, 1), "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
