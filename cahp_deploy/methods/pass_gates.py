"""PASS: pruning attention heads with almost-sure sparsity targets (Ding, Jawahar & Lakshmanan 2024).

Hard-concrete gates per head (as in ``l0``), but instead of an L0 penalty of fixed weight the gates
are driven toward a target that holds *almost surely*: with N heads and budget K, exactly N - K gates
surely closed (P(z = 0) -> 1) and K surely open (P(z = 1) -> 1). The regularizer is

    R = c_t * ( |(N - K) - Σ_h P(z_h = 0)| + |K - Σ_h P(z_h = 1)| + Σ_h P(0 < z_h < 1) )

and the task loss decides *which* gates take which side. The coefficient c_t starts at 1e-5 and,
after a warm-up, grows 1000x per ``climb window`` for as long as the gates are not exactly at the
target (log_alpha <= -5 for closed, >= 5 for open). At a few points the logits are clipped to
[-5, 5] and each closed gate is reopened with probability proportional to its head's confidence
(mean maximum attention weight, Voita et al. 2019), giving pruned heads a second chance.

The schedule is the PASS trainer's (warm-up 1000 steps, climb 1000, reopen every 1000) compressed,
as the CAHP authors' SST-5 runs did, to fractions of the run: warm-up 10%, climb window 45%, reopen
every 15% until 95% (fractions of steps, or of the time budget when that runs out first; see
:class:`~.gate_training.Schedule`). The concentrator (PASSCONC) is off. The K largest gate logits are kept:
exactly K heads.

Options (``ctx.options``): ``lr`` (0.5, PASS's pruning learning rate) and the shared options of
:class:`~.gate_training.TrainOptions`.
"""

from __future__ import annotations

import time

import torch

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.methods import gate_training as gt
from cahp_deploy.methods.base import MethodContext
from cahp_deploy.selection.result import Selection

DEFAULT_LR = 0.5
COEFF_INIT = 1e-5
CLIP = 5.0  # |log_alpha| beyond which a gate counts as almost surely closed / open
WARMUP, CLIMB, REOPEN_EVERY, REOPEN_UNTIL = 0.10, 0.45, 0.15, 0.95


class _Confidence:
    """Per-head mean of the maximum attention weight, accumulated by hooks between reopenings."""

    def __init__(self, model, n_layers: int, n_heads: int):
        self.sums = torch.zeros(n_layers, n_heads)
        self.modules = [arch.attention_probs_module(model, layer) for layer in range(n_layers)]
        self.handles = []

    def __enter__(self):
        for layer, module in enumerate(self.modules):
            def hook(module, args, output, layer=layer):
                self.sums[layer] += output.detach().amax(dim=-1).mean(dim=(0, 2))
            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def normalized(self) -> torch.Tensor:
        top = self.sums.max()
        return self.sums / top if top > 0 else torch.ones_like(self.sums)


def select(ctx: MethodContext) -> Selection:
    if ctx.budget is None:
        raise CahpError("--method pass needs a budget: give --heads, --keep-ratio or --budget-from")
    o = ctx.options
    opts = gt.TrainOptions.read(o, lr=DEFAULT_LR)
    n_layers, n_heads = gt.head_grid(ctx.model)
    total, k = n_layers * n_heads, int(ctx.budget)
    batches = gt.training_batches(ctx.model, ctx.tokenizer, ctx.data, opts.batch_size, opts.max_length,
                                  opts.max_examples, ctx.seed)
    # multiples of the reopen interval past the warm-up: 0.15, 0.30, ..., 0.90 of the run
    reopen_at = [REOPEN_EVERY * i for i in range(1, 100) if WARMUP < REOPEN_EVERY * i < REOPEN_UNTIL]

    gen = gt.generator(ctx.seed)
    gates = gt.HardConcrete((n_layers, n_heads), gen)
    state = {"coeff": COEFF_INIT, "climbed": 0.0, "last": 0.0, "reopened": 0, "reopenings": 0}

    def penalty(fraction: float) -> torch.Tensor:
        p0, p1 = gates.p_closed(), gates.p_one()
        pnb = (1.0 - p0 - p1).clamp_min(0.0)
        return state["coeff"] * ((total - k - p0.sum()).abs() + (k - p1.sum()).abs() + pnb.sum())

    def after_step(fraction: float) -> None:
        with torch.no_grad():
            la = gates.log_alpha
            at_target = int((la <= -CLIP).sum()) == total - k and int((la >= CLIP).sum()) == k
            if fraction > WARMUP and not at_target:  # the coefficient climbs only while off target
                state["climbed"] += fraction - max(state["last"], WARMUP)
                state["coeff"] = COEFF_INIT * 1000 ** (state["climbed"] / CLIMB)
            state["last"] = fraction
            if state["reopenings"] < len(reopen_at) and fraction >= reopen_at[state["reopenings"]]:
                state["reopenings"] += 1
                la.clamp_(-CLIP, CLIP)
                closed = la <= -CLIP
                chance = torch.rand(la.shape, generator=gen) < confidence.normalized()
                reopen = closed & chance
                la[reopen] = CLIP
                state["reopened"] += int(reopen.sum())
                confidence.sums.zero_()

    t = time.perf_counter()
    with _Confidence(ctx.model, n_layers, n_heads) as confidence:
        log = gt.train_gates(ctx.model, batches, gate_params=[gates.log_alpha], sample=lambda f: gates.sample(),
                             penalty=penalty, opts=opts, seed=ctx.seed, seconds=opts.time_budget,
                             progress=ctx.progress, description="PASS gates", after_step=after_step)
    seconds = time.perf_counter() - t
    la = gates.log_alpha.detach()
    scores = la.numpy()
    return Selection(
        method="pass",
        kept_heads=gt.keep(scores, k, o),
        num_heads_total=total,
        heads_per_layer=n_heads,
        seed=ctx.seed,
        scores=scores.tolist(),
        details={"budget": k, "almost_surely_closed": int((la <= -CLIP).sum()),
                 "almost_surely_open": int((la >= CLIP).sum()), "final_coefficient": state["coeff"],
                 "reopened_gates": state["reopened"], "reopenings": state["reopenings"], "training": log.to_dict(),
                 "stopped_by_time_budget": log.stopped_by_time_budget},
        params={**opts.to_dict(), "allow_empty_layers": gt.option(o, "allow_empty_layers", False, bool)},
        timings={"training": seconds},
    )
