"""AttAttr baseline (Hao et al. 2021): keep the k heads with the largest attention attribution.

The score of a head is its integrated-gradients attribution of the predicted-class logit with respect
to its attention map, reduced per example (``--attattr-reduce mass``: the attribution's sum, the
default; ``max``: its largest entry, the statistic of the paper and of the CAHP authors' script) and
averaged over ``--attattr-examples`` examples (default 200, as both used). See
:mod:`cahp_deploy.signals.attention_attribution` for the maths and the hook.

Options (``ctx.options``): ``ig_steps`` (m, 20), ``attattr_examples`` (200), ``attattr_reduce``,
``attattr_batch_size`` (examples per IG batch, 4: each becomes m rows), ``max_length`` (128),
``time_budget`` (seconds, 600; 0 = none: examples stop being added once it has passed),
``allow_empty_layers``.
"""

from __future__ import annotations

import time

from cahp_deploy.data import iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.methods.gate_training import DEFAULT_TIME_BUDGET, head_grid, keep, option, subset
from cahp_deploy.selection.result import Selection
from cahp_deploy.signals import model_inputs
from cahp_deploy.signals.attention_attribution import DEFAULT_STEPS, REDUCTIONS, attention_attribution

DEFAULT_EXAMPLES = 200
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_LENGTH = 128


def select(ctx: MethodContext) -> Selection:
    if ctx.budget is None:
        raise CahpError("--method attattr needs a budget: give --heads, --keep-ratio or --budget-from")
    o = ctx.options
    steps = option(o, "ig_steps", DEFAULT_STEPS, int, low=1)
    examples = option(o, "attattr_examples", DEFAULT_EXAMPLES, int, low=1)
    reduce = option(o, "attattr_reduce", "mass", str, choices=REDUCTIONS)
    batch_size = option(o, "attattr_batch_size", DEFAULT_BATCH_SIZE, int, low=1)
    max_length = option(o, "max_length", DEFAULT_MAX_LENGTH, int, low=8)
    budget = option(o, "time_budget", DEFAULT_TIME_BUDGET, float)
    n_layers, n_heads = head_grid(ctx.model)

    rows = subset(ctx.data, examples, ctx.seed)
    batches = [model_inputs(ctx.model, enc) for _, enc, _ in
               iter_batches(ctx.tokenizer, rows, batch_size=batch_size, max_length=max_length)]
    t = time.perf_counter()
    scores, used, stopped = attention_attribution(
        ctx.model, batches, steps=steps, reduce=reduce, deadline_seconds=budget if budget > 0 else None,
        progress=ctx.progress, total_batches=len(batches),
    )
    seconds = time.perf_counter() - t
    if used == 0:
        raise CahpError(f"--time-budget {budget} s ran out before the first attribution batch; raise it")
    return Selection(
        method="attattr",
        kept_heads=keep(scores, ctx.budget, o),
        num_heads_total=n_layers * n_heads,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=scores.tolist(),
        details={"budget": int(ctx.budget), "examples_used": used, "stopped_by_time_budget": stopped},
        params={"ig_steps": steps, "attattr_examples": examples, "attattr_reduce": reduce,
                "attattr_batch_size": batch_size, "max_length": max_length, "time_budget": budget,
                "allow_empty_layers": option(o, "allow_empty_layers", False, bool)},
        timings={"attribution": seconds},
    )
