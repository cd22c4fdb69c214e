"""Michel et al. (2019) baseline: keep the k heads with the highest gradient salience.

Salience is the same |d loss / d g_h| that CAHP uses to pick representatives
(:mod:`cahp_deploy.signals.salience`); k comes from the budget. Unless ``allow_empty_layers`` is set,
every layer first keeps its most salient head (the same guard as CAHP, so budgets compare fairly).
"""

from __future__ import annotations

import time

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.selection.result import Selection
from cahp_deploy.selection.topk import keep_top_k


def select(ctx: MethodContext) -> Selection:
    from cahp_deploy.signals.salience import DEFAULT_BATCH_SIZE, DEFAULT_FRACTION, head_salience

    if ctx.budget is None:
        raise CahpError("--method gradient needs a budget: give --heads, --keep-ratio or --budget-from")
    fraction = float(ctx.options.get("salience_fraction") or DEFAULT_FRACTION)
    allow_empty = bool(ctx.options.get("allow_empty_layers", False))
    n_layers, n_heads = arch.dense_head_grid(ctx.model.config)
    t = time.perf_counter()
    salience = head_salience(ctx.model, ctx.tokenizer, ctx.data, fraction=fraction,
                             batch_size=int(ctx.options.get("salience_batch_size") or DEFAULT_BATCH_SIZE),
                             max_length=int(ctx.options.get("max_length") or 128), progress=ctx.progress)
    seconds = time.perf_counter() - t
    grid = salience.reshape(n_layers, n_heads)
    kept = keep_top_k(grid, ctx.budget, min_per_layer=0 if allow_empty else 1)
    return Selection(
        method="gradient",
        kept_heads=kept,
        num_heads_total=n_layers * n_heads,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=grid.tolist(),
        details={"budget": int(ctx.budget)},
        params={"salience_fraction": fraction, "allow_empty_layers": allow_empty},
        timings={"salience": seconds},
    )
