"""Michel et al. (2019) baseline: keep the k heads with the highest gradient salience.

Salience is the same |d loss / d g_h| that CAHP uses to pick representatives
(:mod:`cahp_deploy.signals.salience`); k comes from the budget. Unless ``allow_empty_layers`` is set,
every layer first keeps its most salient head (the same guard as CAHP, so budgets compare fairly).
"""

from __future__ import annotations

import time

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.methods.base import MethodContext, top_k_selection
from cahp_deploy.selection.result import Selection


def select(ctx: MethodContext) -> Selection:
    from cahp_deploy.signals.salience import DEFAULT_BATCH_SIZE, DEFAULT_FRACTION, head_salience

    if ctx.budget is None:
        raise CahpError("--method gradient needs a budget: give --heads, --keep-ratio or --budget-from")
    fraction = float(ctx.options.get("salience_fraction") or DEFAULT_FRACTION)
    n_layers, n_heads = arch.dense_head_grid(ctx.model.config)
    t = time.perf_counter()
    salience = head_salience(ctx.model, ctx.tokenizer, ctx.data, fraction=fraction,
                             batch_size=int(ctx.options.get("salience_batch_size") or DEFAULT_BATCH_SIZE),
                             max_length=int(ctx.options.get("max_length") or 128), progress=ctx.progress)
    return top_k_selection("gradient", ctx, salience.reshape(n_layers, n_heads),
                           params={"salience_fraction": fraction}, timings={"salience": time.perf_counter() - t})
