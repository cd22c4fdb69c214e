"""Random baseline: keep k heads drawn uniformly at random from ``seed`` (numpy's PCG64).

Unless ``allow_empty_layers`` is set every layer keeps at least one head, as for CAHP and gradient.
"""

from __future__ import annotations

import numpy as np

from cahp_deploy import arch
from cahp_deploy.methods.base import MethodContext, top_k_selection
from cahp_deploy.selection.result import Selection


def select(ctx: MethodContext) -> Selection:
    n_layers, n_heads = arch.dense_head_grid(ctx.model.config)
    return top_k_selection("random", ctx, np.random.default_rng(ctx.seed).random((n_layers, n_heads)))
