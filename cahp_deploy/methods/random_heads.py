"""Random baseline: keep k heads drawn uniformly at random from ``seed`` (numpy's PCG64).

Unless ``allow_empty_layers`` is set every layer keeps at least one head, as for CAHP and gradient.
"""

from __future__ import annotations

import numpy as np

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.selection.result import Selection
from cahp_deploy.selection.topk import keep_top_k


def select(ctx: MethodContext) -> Selection:
    if ctx.budget is None:
        raise CahpError("--method random needs a budget: give --heads, --keep-ratio or --budget-from")
    allow_empty = bool(ctx.options.get("allow_empty_layers", False))
    n_layers, n_heads = arch.dense_head_grid(ctx.model.config)
    scores = np.random.default_rng(ctx.seed).random((n_layers, n_heads))
    kept = keep_top_k(scores, ctx.budget, min_per_layer=0 if allow_empty else 1)
    return Selection(
        method="random",
        kept_heads=kept,
        num_heads_total=n_layers * n_heads,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=scores.tolist(),
        details={"budget": int(ctx.budget)},
        params={"allow_empty_layers": allow_empty},
    )
