"""L0 gates (Voita et al. 2019; layer-wise joint training as in arXiv 2110.03252).

A hard-concrete gate per head (Louizos et al. 2018) multiplies the head's output; the gate logits
minimize ``task loss + lambda * sum_h P(gate_h != 0)`` (the expected L0 norm). After training, a head
is kept when its test-time gate is non-zero (Louizos' estimator), so:

* without a budget, ``--lambda`` decides how many heads survive;
* with a budget K, lambda is searched: a first run of ``--steps`` at ``--lambda``, then up to
  ``--lambda-trials`` - 1 rounds with lambda moved 4x up or down (geometric bisection once
  bracketed) until the surviving count is K. A round continues for ``--search-steps`` from the
  gates of the last round that kept too many heads (closed gates cannot reopen, so never from an
  over-pruned state; with none yet, it trains from scratch). The gates of the round closest to K
  are ranked and their K highest logits kept: exactly K heads.

Weights are frozen unless ``--train-weights``. Options (``ctx.options``): ``lambda`` (0.01; with a
budget, the first guess), ``lambda_trials`` (6), ``search_steps`` (60), plus the shared
``steps``/``epochs``/``lr`` (0.1)/``batch_size``/``max_length``/``max_examples``/``time_budget``/
``train_weights``/``weights_lr``/``allow_empty_layers`` of :class:`~.gate_training.TrainOptions`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from cahp_deploy.errors import CahpError
from cahp_deploy.methods import gate_training as gt
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.selection.result import Selection

DEFAULT_LAMBDA = 0.01
DEFAULT_LR = 0.1
DEFAULT_TRIALS = 6
DEFAULT_SEARCH_STEPS = 60


def train_l0(ctx: MethodContext, gates: gt.HardConcrete, batches, lam: float, opts: gt.TrainOptions,
             seconds: float | None, seed: int, description: str, first: bool = True) -> gt.TrainLog:
    """Train ``gates`` (in place) on task loss + lam * expected L0 norm, for at most ``seconds``."""
    return gt.train_gates(
        ctx.model, batches,
        gate_params=[gates.log_alpha],
        sample=lambda fraction: gates.sample(),
        penalty=lambda fraction: lam * gates.p_open().sum(),
        opts=opts, seed=seed, seconds=seconds, progress=ctx.progress, description=description,
        require_progress=first,
    )


def _surviving(gates: gt.HardConcrete) -> np.ndarray:
    return (gates.deterministic() > 0).numpy()


def _next_lambda(lam: float, lo: float | None, hi: float | None) -> float:
    if lo is None:
        return lam / 4.0
    if hi is None:
        return lam * 4.0
    return math.sqrt(lo * hi)


def _select_free(ctx: MethodContext, lam0: float, opts, batches, deadline, params: dict, n_layers: int, n_heads: int):
    """No budget: train the gates once at ``lam0``; keep the heads whose gates stay open."""
    o = ctx.options
    gates = gt.HardConcrete((n_layers, n_heads), gt.generator(ctx.seed))
    log = train_l0(ctx, gates, batches, lam0, opts, deadline.remaining(), ctx.seed, "L0 gates")
    alive = _surviving(gates)
    k = int(alive.sum())
    if k == 0:
        raise CahpError(f"--lambda {lam0} closed every head's gate; lower it, or give --heads K")
    scores = gates.log_alpha.detach().numpy()
    # Open gates have the largest logits, so top-k (plus one head per otherwise empty layer,
    # unless --allow-empty-layers) keeps exactly the surviving heads.
    empty_layers = int((alive.sum(axis=1) == 0).sum())
    allow_empty = params["allow_empty_layers"]
    kept = gt.keep(scores, k if allow_empty else k + empty_layers, o)
    details = {"lambda": lam0, "surviving_heads": k, "rescued_layers": 0 if allow_empty else empty_layers,
               "training": log.to_dict(), "stopped_by_time_budget": log.stopped_by_time_budget}
    return gates, scores, kept, details


def _select_budget(ctx: MethodContext, lam0: float, opts, batches, deadline, params: dict, n_layers: int,
                   n_heads: int):
    """A budget of heads: search lambda (warm-started trials) for the surviving count closest to it."""
    o = ctx.options
    trials_max = gt.option(o, "lambda_trials", DEFAULT_TRIALS, int, low=1)
    search_steps = gt.option(o, "search_steps", DEFAULT_SEARCH_STEPS, int, low=1)
    params.update(lambda_trials=trials_max, search_steps=search_steps)
    gates = gt.HardConcrete((n_layers, n_heads), gt.generator(ctx.seed))
    fresh = gates.log_alpha.detach().clone()
    lam, lo, hi = lam0, None, None
    trials, best, base = [], None, None
    for i in range(trials_max):
        # A trial warm-starts from the gates of the last trial that kept too many heads (the
        # strongest lambda still under target): raising lambda from there closes more gates. A
        # closed gate gets no task gradient and cannot reopen, so a trial never starts from an
        # over-pruned state: with none under target yet, it trains from scratch for --steps.
        # Time: half the budget for the first run, the rest shared by the rounds still possible.
        with torch.no_grad():
            gates.log_alpha.copy_(fresh if base is None else base)
        run_opts = opts if base is None else replace(opts, steps=search_steps, epochs=None)
        left = deadline.remaining()
        allotted = None if left is None else (left / 2 if i == 0 else left / (trials_max - i))
        log = train_l0(ctx, gates, batches, lam, run_opts, allotted, ctx.seed + i,
                       f"L0 gates (lambda {lam:.3g})", first=i == 0)
        count = int(_surviving(gates).sum())
        trials.append({"lambda": lam, "surviving_heads": count, "warm_start": base is not None,
                       "training": log.to_dict()})
        if best is None or abs(count - ctx.budget) < abs(best[1] - ctx.budget):
            best = (gates.log_alpha.detach().clone(), count, lam, i)
        if count == ctx.budget or deadline.expired() or log.steps_done == 0 or lam == 0.0:
            break
        if count > ctx.budget:
            lo = lam
            base = gates.log_alpha.detach().clone()
        else:
            hi = lam
        lam = _next_lambda(lam, lo, hi)
    log_alpha, count, lam, index = best
    with torch.no_grad():
        gates.log_alpha.copy_(log_alpha)
    scores = log_alpha.numpy()
    kept = gt.keep(scores, ctx.budget, o)
    details = {"budget": int(ctx.budget), "lambda": lam, "surviving_heads": count, "chosen_trial": index,
               "trials": trials,
               "stopped_by_time_budget": any(t["training"]["stopped_by_time_budget"] for t in trials)}
    return gates, scores, kept, details


def select(ctx: MethodContext) -> Selection:
    o = ctx.options
    lam0 = gt.option(o, "lambda", DEFAULT_LAMBDA, float, low=0.0)
    opts = gt.TrainOptions.read(o, lr=DEFAULT_LR)
    n_layers, n_heads = gt.head_grid(ctx.model)
    batches = gt.training_batches(ctx.model, ctx.tokenizer, ctx.data, opts.batch_size, opts.max_length,
                                  opts.max_examples, ctx.seed)
    deadline = gt.Deadline(opts.time_budget)
    params = {**opts.to_dict(), "lambda": lam0,
              "allow_empty_layers": gt.option(o, "allow_empty_layers", False, bool)}
    t = time.perf_counter()

    select_k = _select_free if ctx.budget is None else _select_budget
    gates, scores, kept, details = select_k(ctx, lam0, opts, batches, deadline, params, n_layers, n_heads)
    seconds = time.perf_counter() - t
    details["p_open"] = gates.p_open().detach().numpy().round(4).tolist()
    return Selection(
        method="l0",
        kept_heads=kept,
        num_heads_total=n_layers * n_heads,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=scores.tolist(),
        details=details,
        params=params,
        timings={"training": seconds},
    )
