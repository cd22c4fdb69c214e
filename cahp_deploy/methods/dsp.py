"""Differentiable Subset Pruning (Li, Cotterell & Sachan 2021, TACL): a relaxed top-K over head logits.

Every head has an importance logit w_h. Each step draws Gumbel noise and builds a soft K-hot mask by
K successive softmaxes, each discounting what earlier ones already picked (the Gumbel-soft-top-k
relaxation, DSP section 3.2)::

    r = w + Gumbel(0, 1)
    p_1 = softmax(r / tau)
    p_j = softmax((r + Σ_{i<j} log(1 - p_i)) / tau)      j = 2..K
    mask = Σ_j p_j                                       sums to K; K-hot as tau -> 0

The mask multiplies the heads' outputs, w follows the task loss, and tau anneals exponentially
from ``--dsp-init-temperature`` (1000) to ``--dsp-final-temperature`` (1e-8) over the run (the
schedule of the DSP code, compressed from its 25,000 steps; over the time budget instead when that
runs out first, see :class:`~.gate_training.Schedule`). K is the budget, so the final K largest w are kept: exactly K heads. The relaxation
runs in float64, as in the reference code, because 1 - p underflows at low temperatures.

Options (``ctx.options``): those two, plus ``lr`` (0.5, DSP's pruning learning rate) and the
shared options of :class:`~.gate_training.TrainOptions`.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from cahp_deploy.errors import CahpError
from cahp_deploy.methods import gate_training as gt
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.selection.result import Selection

DEFAULT_LR = 0.5
DEFAULT_INIT_TEMPERATURE = 1000.0
DEFAULT_FINAL_TEMPERATURE = 1e-8
_TINY = torch.finfo(torch.float64).tiny


def gumbel_soft_top_k(w: torch.Tensor, k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """A soft K-hot mask over the flat logits ``w`` (float64), see the module docstring."""
    u = torch.rand(w.shape, generator=generator, dtype=torch.float64).clamp_min(_TINY)
    r = w - torch.log(-torch.log(u))
    mask = torch.zeros_like(w)
    p = torch.zeros_like(w)
    for _ in range(k):
        r = r + torch.log((1.0 - p).clamp_min(_TINY))
        p = torch.softmax(r / temperature, dim=0)
        mask = mask + p
    return mask


def temperature(fraction: float, init: float, final: float) -> float:
    """Exponential annealing: ``init`` at the start of the run, ``final`` at its end (fraction 1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    return math.exp(math.log(init) - fraction * (math.log(init) - math.log(final)))


def select(ctx: MethodContext) -> Selection:
    if ctx.budget is None:
        raise CahpError("--method dsp needs a budget: give --heads, --keep-ratio or --budget-from")
    o = ctx.options
    opts = gt.TrainOptions.read(o, lr=DEFAULT_LR)
    t_init = gt.option(o, "dsp_init_temperature", DEFAULT_INIT_TEMPERATURE, float, low=0.0, low_open=True)
    t_final = gt.option(o, "dsp_final_temperature", DEFAULT_FINAL_TEMPERATURE, float, low=0.0, low_open=True)
    if t_final > t_init:
        raise CahpError(f"--dsp-final-temperature {t_final} must not exceed --dsp-init-temperature {t_init}")
    n_layers, n_heads = gt.head_grid(ctx.model)
    batches = gt.training_batches(ctx.model, ctx.tokenizer, ctx.data, opts.batch_size, opts.max_length,
                                  opts.max_examples, ctx.seed)
    k = int(ctx.budget)

    gen = gt.generator(ctx.seed)
    bound = math.sqrt(6.0 / (n_layers + n_heads))  # Xavier-uniform, as DSP initializes w
    w = nn.Parameter((torch.rand((n_layers * n_heads,), generator=gen, dtype=torch.float64) * 2 - 1) * bound)

    taus: list[float] = []

    def sample(fraction: float) -> torch.Tensor:
        taus.append(temperature(fraction, t_init, t_final))
        return gumbel_soft_top_k(w, k, taus[-1], gen).float().view(n_layers, n_heads)

    t = time.perf_counter()
    log = gt.train_gates(ctx.model, batches, gate_params=[w], sample=sample, penalty=lambda fraction: 0.0,
                         opts=opts, seed=ctx.seed, seconds=opts.time_budget,
                         progress=ctx.progress, description="DSP subset logits")
    seconds = time.perf_counter() - t
    scores = w.detach().view(n_layers, n_heads).numpy()
    return Selection(
        method="dsp",
        kept_heads=gt.keep(scores, k, o),
        num_heads_total=n_layers * n_heads,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=scores.tolist(),
        details={"budget": k, "last_temperature": taus[-1],
                 "training": log.to_dict(), "stopped_by_time_budget": log.stopped_by_time_budget},
        params={**opts.to_dict(), "dsp_init_temperature": t_init, "dsp_final_temperature": t_final,
                "allow_empty_layers": gt.option(o, "allow_empty_layers", False, bool)},
        timings={"training": seconds},
    )
