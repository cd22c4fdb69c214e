"""Which units a least-squares refit can stand in for: structured Optimal Brain Surgeon (pure numpy).

The ladder refits every pruned layer's output projection against dense (:mod:`cahp_deploy.recovery.
reconstruct`). So the unit to remove is not the one whose output matters least, but the one whose output
the *remaining* units, refit, reproduce best. For a linear map ``y = [x 1] Wa`` (``Wa`` stacks the
weight over the bias, inputs ``x`` of width m) with input Gram ``G = [X 1]ᵀ[X 1]`` over calibration
tokens, removing input group g and refitting the rest by least squares raises the squared output
error by exactly (Hassibi & Stork 1993; structured form as in Frantar & Alistarh's OBC / Kurtic et
al.'s ZipLM)::

    cost_g = trace(Wa_gᵀ [G⁻¹]_gg⁻¹ Wa_g),   then   Wa -= G⁻¹[:, g] [G⁻¹]_gg⁻¹ Wa_g,
                                               G⁻¹ -= G⁻¹[:, g] [G⁻¹]_gg⁻¹ G⁻¹[g, :]

Removing greedily, cheapest first, gives a nested order with each removal's marginal cost. A group is
one FFN neuron (one input column of the FFN output projection) or one head (its ``head_dim`` columns
of the attention output projection). The bias row is never removed: it absorbs the mean of what was
removed. ``G`` is damped by ``damp`` times its mean diagonal (a few thousand tokens do not pin down
a 1,537-wide Gram).

Also here: :func:`collect_grams`, the input Gram of every output projection and the variance of the
stream each one writes into (one forward pass of the dense model). An error of squared size e at a
token becomes ~e / variance after the LayerNorm that follows, so dividing by it puts the costs of
different layers in common units.

Measured (``results/reconstruct/surgeon.md``, issue #26): on MNLI, at the same kept-neuron counts and
the same refit, this order keeps *less* agreement with dense than CAHP's complementary neurons or
gradient salience, merged across layers or only within each layer, so the package does not use it.
Kept here, with :func:`check`, so the measurement can be rerun.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cahp_deploy import arch
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.hf_classifier import model_inputs

#: damping of the Gram: lambda = DAMP * mean(diag(G)) (OBC / SparseGPT use 1%)
DAMP = 0.01


@dataclass(frozen=True)
class SurgeonOrder:
    """Groups in removal order and the marginal squared-error cost of each removal (same order)."""

    order: list[int]
    costs: np.ndarray


def _damping(gram: np.ndarray, damp: float) -> float:
    """lambda = damp * mean(diag(G)) (damp itself for an all-zero Gram)."""
    diag = np.diag(gram)
    return damp * float(diag.mean()) if diag.size and diag.mean() > 0 else damp


def _damped_inverse(gram: np.ndarray, damp: float) -> np.ndarray:
    g = np.array(gram, dtype=np.float64, copy=True)
    g[np.diag_indices_from(g)] += _damping(gram, damp)
    return np.linalg.inv(g)


def _check(gram: np.ndarray, weight: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, int]:
    gram, weight = np.asarray(gram, dtype=np.float64), np.asarray(weight, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"the Gram must be square, got shape {gram.shape}")
    if weight.ndim != 2 or weight.shape[0] != gram.shape[0]:
        raise ValueError(f"the weight must have {gram.shape[0]} rows (inputs + bias), got shape {weight.shape}")
    m = gram.shape[0] - 1
    if group < 1 or m % group:
        raise ValueError(f"{m} inputs do not split into groups of {group}")
    return gram, weight, m // group


def removal_order(gram: np.ndarray, weight: np.ndarray, group: int = 1, keep: int = 0,
                  damp: float = DAMP) -> SurgeonOrder:
    """Greedy OBS removal of input groups, cheapest first, each followed by the least-squares update.

    ``gram``: ``[X 1]ᵀ[X 1]``, (m+1, m+1), the last row/column the constant input; ``weight``: ``Wa``,
    (m+1, out), the last row the bias. Removes groups until ``keep`` remain; returns those removed, in
    order, with their marginal costs (squared output error summed over the Gram's tokens).
    """
    gram, wa, groups = _check(gram, weight, group)
    wa = wa.copy()  # updated in place below
    hinv = _damped_inverse(gram, damp)
    alive = np.ones(groups, dtype=bool)
    order: list[int] = []
    costs: list[float] = []
    index = np.arange(groups * group).reshape(groups, group)
    while alive.sum() > keep:
        live = np.flatnonzero(alive)
        if group == 1:
            d = np.diag(hinv)[live]
            cost = (wa[live] ** 2).sum(axis=1) / d
        else:
            cost = np.empty(live.size)
            for i, g in enumerate(live):
                rows = index[g]
                cost[i] = float(np.sum(wa[rows] * np.linalg.solve(hinv[np.ix_(rows, rows)], wa[rows])))
        pick = int(live[int(np.argmin(cost))])
        rows = index[pick]
        block = np.linalg.inv(hinv[np.ix_(rows, rows)])
        col = hinv[:, rows]
        wa -= col @ (block @ wa[rows])
        hinv -= col @ block @ col.T
        wa[rows] = 0.0
        hinv[rows, :] = 0.0
        hinv[:, rows] = 0.0
        alive[pick] = False
        order.append(pick)
        costs.append(float(cost[live == pick][0]))
    return SurgeonOrder(order, np.asarray(costs))


def refit_weight(gram: np.ndarray, weight: np.ndarray, kept: Sequence[int], group: int = 1,
                 damp: float = DAMP) -> np.ndarray:
    """``Wa`` refit on the kept groups (and the bias) to reproduce ``[X 1] Wa``: rows of removed groups
    are zero. The same solution :func:`removal_order`'s updates reach after removing the others."""
    gram, wa, groups = _check(gram, weight, group)
    rows = np.concatenate([np.arange(g * group, (g + 1) * group) for g in sorted(kept)] + [[gram.shape[0] - 1]])
    rows = rows.astype(np.int64)
    g = gram[np.ix_(rows, rows)].copy()
    lam = _damping(gram, damp)
    g[np.diag_indices_from(g)] += lam
    out = np.zeros_like(wa)
    out[rows] = np.linalg.solve(g, gram[rows] @ wa + lam * wa[rows])
    return out


def merged_order(per_site: Sequence[SurgeonOrder], offsets: Sequence[int], scale: Sequence[float]) -> list[int]:
    """One global removal order from per-site orders: always the unit whose next removal is cheapest.

    ``offsets[i]`` is site i's first global unit id; ``scale[i]`` puts its costs in common units (the
    ladder divides by the variance of the stream its LayerNorm normalises). A site's marginal costs are
    made non-decreasing first (running maximum), so each site is consumed in its own order.
    """
    heads = []
    for i, site in enumerate(per_site):
        running = np.maximum.accumulate(np.asarray(site.costs, dtype=np.float64)) * float(scale[i]) \
            if len(site.costs) else np.zeros(0)
        heads.extend((float(c), i, j) for j, c in enumerate(running))
    heads.sort(key=lambda t: (t[0], t[1], t[2]))
    return [int(offsets[i]) + per_site[i].order[j] for _, i, j in heads]


SITES = ("attention", "ffn")


@dataclass
class SiteGram:
    """One output projection's calibration statistics: ``gram`` (m+1, m+1), ``weight`` ``[Wᵀ; b]``
    (m+1, hidden), ``stream_variance`` and the number of real ``tokens``."""

    layer: int
    site: str
    gram: np.ndarray
    weight: np.ndarray
    stream_variance: float
    tokens: int


def _stacked(linear: nn.Linear) -> np.ndarray:
    w = linear.weight.detach().to(torch.float64).T
    b = linear.bias.detach().to(torch.float64) if linear.bias is not None else torch.zeros(w.shape[1], dtype=torch.float64)
    return torch.cat([w, b[None, :]], dim=0).cpu().numpy()


def collect_grams(model: nn.Module, tokenizer, rows: LabelledData, *, max_length: int,
                  batch_size: int = 32) -> list[SiteGram]:
    """Per layer, attention then FFN: the :class:`SiteGram` of its output projection, from one pass."""
    spec = arch.spec_for(model)
    device = next(model.parameters()).device
    blocks = arch.layers(model)
    sums: dict[tuple[int, str], dict] = {}
    state: dict = {}

    def record_residual(layer: int, site: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise CahpError(f"layer {layer}'s {site} input is not its first positional argument; "
                                "this transformers version is not supported here")
            state[(layer, site, "residual")] = args[0]
        return hook

    def record_input(layer: int, site: str):
        def hook(module, args):
            x = args[0][state["mask"]].to(torch.float64)
            xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            acc = sums.setdefault((layer, site), {"gram": 0.0, "var": 0.0, "tokens": 0})
            acc["gram"] = acc["gram"] + xa.T @ xa
            acc["tokens"] += int(x.shape[0])
        return hook

    def record_output(layer: int, site: str):
        def hook(module, args, output):
            total = (output + state[(layer, site, "residual")])[state["mask"]].to(torch.float64)
            sums[(layer, site)]["var"] += float(total.var(dim=1, unbiased=False).sum())
        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            ffn_in = arch.get_path(block, spec.ffn_in)
            handles.append(block.register_forward_pre_hook(record_residual(i, "attention")))
            handles.append(ffn_in.register_forward_pre_hook(record_residual(i, "ffn")))
            for site, path in (("attention", spec.output), ("ffn", spec.ffn_out)):
                proj = arch.get_path(block, path)
                handles.append(proj.register_forward_pre_hook(record_input(i, site)))
                handles.append(proj.register_forward_hook(record_output(i, site)))
        mode = model.training
        model.eval()
        with torch.inference_mode():
            for _, enc, _ in iter_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length):
                enc = {k: v.to(device) for k, v in enc.items()}
                state["mask"] = enc["attention_mask"].bool()
                model(**model_inputs(model, enc))
        model.train(mode)
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, block in enumerate(blocks):
        for site, path in (("attention", spec.output), ("ffn", spec.ffn_out)):
            acc = sums.get((i, site))
            if acc is None or acc["tokens"] == 0:
                raise CahpError(f"no calibration token reached layer {i}'s {site} output projection")
            out.append(SiteGram(i, site, acc["gram"].cpu().numpy(), _stacked(arch.get_path(block, path)),
                                acc["var"] / acc["tokens"], acc["tokens"]))
    return out


def check(seed: int = 0) -> None:
    """Each marginal cost equals the refit's true error increment (the exactness the probe rests on)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + rng.normal(size=12)
    xa = np.c_[x, np.ones(300)]
    wa = rng.normal(size=(13, 4))
    for group in (1, 3):
        result, removed, before = removal_order(xa.T @ xa, wa, group=group, keep=1, damp=1e-10), [], 0.0
        for g, cost in zip(result.order, result.costs):
            removed.append(g)
            kept = [k for k in range(12 // group) if k not in removed]
            after = float(((xa @ refit_weight(xa.T @ xa, wa, kept, group=group, damp=1e-10) - xa @ wa) ** 2).sum())
            assert abs(after - before - cost) <= 1e-5 * max(1.0, cost), (after - before, cost)
            before = after
