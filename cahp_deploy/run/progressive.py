"""The progressive ladder: rungs ~``step`` of the dense MACs apart, heads and FFN neurons removed together, nested.

Fixed before any decision row is seen (it reads only CAHP's evidence and calibration rows of the
selection split), so the budget search can test it in sequence (:mod:`cahp_deploy.run.budget_search`).

How a rung is made from the one above it:

1. **Orders.** Heads are removed in CAHP's order: ascending persistence over CAHP's cuts at every k
   from N-1 down to 1, ties by salience (:func:`cahp_deploy.selection.removal_order.nested_order`).
   Neurons are removed in the FFN ranking's order (``ffn_method``): ascending gradient salience for
   ``gradient``; ascending persistence over CAHP's complementary-neuron cuts at keep shares
   0.9 .. 0.1 for ``cahp``. Both orders are fixed once, so every rung keeps a subset of the rung above.
2. **Interleaving, cheapest first.** To remove the next ``step`` of dense MACs there are three
   candidate moves: only the next heads, only the next neurons, or half of the MACs from each. Each
   move is applied as a mask (exactly what pruning computes) to the dense model, and the move whose
   logits stay closest to dense (mean KL divergence on the calibration rows) is taken. A head costs
   ~64 neurons' MACs in MiniLM; the measure decides, per rung, which of them is cheaper in accuracy.
3. **Aligned widths.** Each layer keeps a multiple of ``neuron_multiple`` FFN neurons (16 by default):
   the count the order gives, rounded to the nearest multiple, keeping the layer's most important
   ones. ONNX Runtime's INT8 GEMM on this CPU runs a 1,439-wide FFN slower than a 1,440-wide one;
   on minilm-mnli's 75% rung the FFN's INT8 time fell 7% (98.7 -> 91.8 ms, 1 thread, b32x128) at the
   same neuron count (``experiments/results/align/``). The rounding never grows a width as the order
   shrinks it, so the rungs stay nested.
4. The rung's model is pruned from dense with the rung's kept sets (a subset of the rung above) and
   refit against dense by least squares; the refit is a closed-form solve per layer, so starting from
   the rung above's refit would give the same solution up to the ridge's anchor.

The schedule is written to ``OUT/search/schedule.json`` and reused while its inputs are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy.atomic import atomic_file
from cahp_deploy.hashing import sha256_json
from cahp_deploy.selection.removal_order import (aligned_kept, layer_of_units, mac_targets, nested_order,
                                                  next_units, per_layer)

log = logging.getLogger(__name__)

SCHEDULE_FILE = "schedule.json"
#: each rung removes about this share of the dense MACs (seq 128)
DEFAULT_MAC_STEP = 0.05
#: the ladder goes down to rungs keeping this share of the dense MACs (a 2x MAC ceiling)
DEFAULT_MAC_FLOOR = 0.5
#: calibration rows for choosing each rung's move (a seeded sample of the selection split)
CALIBRATION_ROWS = 512
#: each layer's kept FFN width is a multiple of this (1: any width)
NEURON_MULTIPLE = 16
MOVES = ("heads", "neurons", "both")


@dataclass
class Rung:
    """One rung: the share of dense MACs it was aimed at and what it keeps."""

    k: int  # the rung's id in the search: percent of dense MACs targeted (100, 95, ...)
    target: float
    kept_heads: list[list[int]]
    kept_neurons: list[list[int]]
    macs_kept: float
    move: str | None
    kl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_order(evidence) -> list[int]:
    """Global head ids in removal order: CAHP's cuts at every k, least persistent first."""
    from cahp_deploy.methods.cahp import select_at

    n = evidence.num_heads
    offsets = np.concatenate([[0], np.cumsum(evidence.heads_per_layer)])
    cuts = []
    for k in range(n - 1, 0, -1):
        sel = select_at(evidence, k)
        cuts.append([int(offsets[layer]) + h for layer, heads in enumerate(sel.kept_heads) for h in heads])
    return nested_order(cuts, n, evidence.salience)


def neuron_order(evidence, method: str, seed: int, degree: int = 6) -> list[int]:
    """Global neuron ids in removal order from the FFN statistics of CAHP's evidence pass."""
    from cahp_deploy.methods.ffn import select_neurons
    from cahp_deploy.selection.neurons import resolve_neuron_budget

    stats = evidence.ffn
    layers, inter = len(stats.neurons_per_layer), int(stats.neurons_per_layer[0])
    salience = np.asarray(stats.salience, dtype=np.float64)
    if method == "gradient":
        return nested_order([], layers * inter, salience)
    cuts = []
    for share in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
        budget = resolve_neuron_budget(layers * inter, layers, keep_ratio=share)
        kept, _ = select_neurons(stats, method, budget, layers, inter, seed, degree=degree)
        cuts.append([layer * inter + n for layer, ns in enumerate(kept) for n in ns])
    return nested_order(cuts, layers * inter, salience)


def _macs(config, heads: list[list[int]], neurons: list[list[int]]) -> int:
    from cahp_deploy.pruning.costs import macs_per_sequence

    return macs_per_sequence(config, [len(h) for h in heads], neurons_per_layer=[len(n) for n in neurons])["total"]


def _logits(model, tokenizer, rows, max_length: int, heads: list[list[int]], neurons: list[list[int]]) -> np.ndarray:
    """Logits of ``model`` with every head and neuron outside the kept sets gated off (what pruning computes)."""
    from cahp_deploy import evaluation
    from cahp_deploy.gates import head_mask, neuron_mask

    with contextlib.ExitStack() as stack:
        stack.enter_context(head_mask(model, heads))
        stack.enter_context(neuron_mask(model, neurons))
        return evaluation.logits(model, tokenizer, rows, max_length=max_length)


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) over rows, in nats."""
    from scipy.special import log_softmax

    p = log_softmax(np.asarray(reference, np.float64), axis=1)
    q = log_softmax(np.asarray(logits, np.float64), axis=1)
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def build(model, tokenizer, calibration, evidence, *, ffn_method: str, step: float, floor: float, max_length: int,
          seed: int, neuron_multiple: int = NEURON_MULTIPLE, say=lambda s: None) -> list[Rung]:
    """The whole ladder, from dense (every unit) down to ``floor`` of the dense MACs."""
    from cahp_deploy import arch, evaluation
    from cahp_deploy.pruning.costs import layer_macs

    config = model.config
    hpl = list(evidence.heads_per_layer)
    npl = [int(n) for n in evidence.ffn.neurons_per_layer]
    h_layer, n_layer = layer_of_units(hpl), layer_of_units(npl)
    h_order, n_order = head_order(evidence), neuron_order(evidence, ffn_method, seed)
    d, hidden = arch.head_dim(config), arch.hidden_size(config)
    head_mac = sum(layer_macs(1, d, hidden, 0)) - sum(layer_macs(0, d, hidden, 0))
    neuron_mac = sum(layer_macs(0, d, hidden, 1)) - sum(layer_macs(0, d, hidden, 0))
    dense_macs = _macs(config, per_layer(range(sum(hpl)), hpl), per_layer(range(sum(npl)), npl))
    reference = evaluation.logits(model, tokenizer, calibration, max_length=max_length)
    removed_h: set[int] = set()
    removed_n: set[int] = set()
    rungs = [Rung(100, 1.0, per_layer(range(sum(hpl)), hpl), per_layer(range(sum(npl)), npl), 1.0, None, 0.0)]
    for target in mac_targets(step, floor)[1:]:
        kept_now = _macs(config, rungs[-1].kept_heads, rungs[-1].kept_neurons)
        need = max(0.0, kept_now - target * dense_macs)
        options = {
            "heads": (math.ceil(need / head_mac), 0),
            "neurons": (0, math.ceil(need / neuron_mac)),
            "both": (math.ceil(need / 2 / head_mac), math.ceil(need / 2 / neuron_mac)),
        }
        best = None
        for move, (nh, nn_) in options.items():
            # at least one head overall stays; an FFN keeps at least one neuron per layer
            hs = next_units(h_order, removed_h, nh, h_layer) if nh else []
            if nh and (len(hs) < nh or len(removed_h) + len(hs) >= len(h_layer)):
                continue
            ns = next_units(n_order, removed_n, nn_, n_layer, min_per_layer=1) if nn_ else []
            if nn_ and len(ns) < nn_:
                continue
            heads = per_layer(set(range(len(h_layer))) - removed_h - set(hs), hpl)
            neurons = aligned_kept(n_order, removed_n | set(ns), npl, neuron_multiple)
            kl = mean_kl(reference, _logits(model, tokenizer, calibration, max_length, heads, neurons))
            if best is None or kl < best[0]:
                best = (kl, move, hs, ns, heads, neurons)
        if best is None:
            break
        kl, move, hs, ns, heads, neurons = best
        removed_h.update(hs)
        removed_n.update(ns)
        rung = Rung(int(round(100 * target)), target, heads, neurons, _macs(config, heads, neurons) / dense_macs, move, kl)
        rungs.append(rung)
        say(f"search: ladder rung {rung.k}% of dense MACs: {sum(map(len, heads))} heads, {sum(map(len, neurons))} "
            f"neurons ({move} this step; KL to dense on calibration rows {kl:.4f})")
    return rungs


def load_or_build(settings, evidence, root: Path) -> list[Rung]:
    """``root/schedule.json`` when it was made from these inputs, else build it (and write it)."""
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.recovery.stage import sample_examples

    key = sha256_json({"evidence": settings.evidence_key(), "ffn_method": settings.ffn_method,
                       "step": settings.mac_step, "floor": settings.mac_floor, "max_length": int(settings.max_length),
                       "rows": CALIBRATION_ROWS, "neuron_multiple": settings.neuron_multiple, "version": 2})
    path = root / SCHEDULE_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return [Rung(**r) for r in record["rungs"]]
        except (json.JSONDecodeError, TypeError, KeyError):
            log.warning("ignoring unreadable %s", path)
    start = time.perf_counter()
    settings.say(f"search: building the progressive ladder (every {settings.mac_step:.0%} of dense MACs, down to "
                 f"{settings.mac_floor:.0%}; each step's move chosen on {CALIBRATION_ROWS} calibration rows)")
    model, tokenizer = load_classifier(settings.model, attn_implementation=None)
    calibration = sample_examples(settings.select_data, CALIBRATION_ROWS, settings.seed)
    rungs = build(model, tokenizer, calibration, evidence, ffn_method=settings.ffn_method, step=settings.mac_step,
                  floor=settings.mac_floor, max_length=settings.max_length, seed=settings.seed,
                  neuron_multiple=settings.neuron_multiple, say=settings.say)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps({"key": key, "seconds": time.perf_counter() - start,
                                   "neuron_multiple": settings.neuron_multiple,
                                   "rungs": [r.to_dict() for r in rungs]}, indent=1) + "\n")
    return rungs


__all__ = ["DEFAULT_MAC_FLOOR", "DEFAULT_MAC_STEP", "MOVES", "NEURON_MULTIPLE", "SCHEDULE_FILE", "Rung", "build",
           "head_order", "load_or_build", "mean_kl", "neuron_order"]
