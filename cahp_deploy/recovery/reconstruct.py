"""Layer-wise least-squares reconstruction: refit a pruned model's output projections against dense.

No training, no labels: on a few thousand calibration rows, each layer's attention output projection
(kept heads' context -> hidden) and FFN output projection (kept neurons -> hidden) are refit, weight
and bias, by ridge regression so that their output reproduces the dense model's at the same place.
The idea is Kwon et al. (2022), "A Fast Post-Training Pruning Framework for Transformers" (mask
tuning by layer-wise reconstruction), applied to the whole output projection rather than to one
scale per head. Why it is worth having next to the SGD fine-tune: every SGD recovery tried moved a
pruned model *away* from dense on new rows, while this moves it toward dense (minilm-sst5, 48 of 72
heads kept: validation rows where exactly one of pruned and dense is right 256 -> 83, argmax
agreement 71.7% -> 90.6%, test 499 -> 165; ``experiments/results/reconstruct/probe.md``).

One block, the two places refit (shapes per token; ``k`` kept heads of size ``d``, ``m`` kept neurons)::

    x ──► kept heads ──► context (k·d) ──► [attention output W_o, b_o] ──► o ──► + x ──► LN ──► a
    a ──► FFN in ──► act ──► neurons (m) ──► [FFN output W_f, b_f] ──────► f ──► + a ──► LN ──► next

Sites are refit from the bottom up, each on the pruned model's *own* input, which already carries the
refits below it, so a layer also learns to undo what the layers below still get wrong. The target
``Y`` of a site is (``target``):

* ``"dense"``: the dense model's projection output on the dense model's own activations;
* ``"pruned_input"``: the dense layer's projection output on the pruned model's input at that layer
  (what the dense weights would do with the pruned model's stream);
* ``"residual"`` (default): ``"dense"`` plus the gap of the residual stream,
  ``Y = o_dense + x_dense - x_pruned``, so that the sum entering the LayerNorm (``x + o``)
  reproduces dense, not only the projection.

Why ``"residual"``: on minilm-sst5 (48 heads) it left the fewest rows discordant with dense, 83 of
1,101 validation rows against 100 (``"pruned_input"``) and 118 (``"dense"``), and it is the only
target under which refitting the *full* FFNs helps (with ``"dense"`` it hurt: the FFN is asked for
the dense stream's output from the pruned stream; with ``"residual"`` it closes the stream's gap).

Only real tokens count (padding positions are dropped from the normal equations). The normal
equations ``[X 1]ᵀ[X 1]`` and ``[X 1]ᵀY`` are accumulated over batches in float64; the solve is ridge
regression *toward the current weights* ``W0`` (the bias is not penalised)::

    min  ||Y - X Wᵀ - b||²  +  λ ||W - W0||²,      λ = r · trace(XᵀX) / dim(X)

Why toward ``W0`` and not toward 0: the objective at the solution is at most its value at ``W0``, so
the calibration error can never rise (``r -> inf`` gives back the pruned weights), and a strong
ridge falls back to what pruning left rather than to a shrunken projection. ``ridge="auto"`` fits on
80% of the calibration rows and picks ``r`` from :data:`RIDGE_GRID` by the reconstruction error on
the other 20% (the two sets of normal equations are accumulated in the same pass, so the choice is
free); when no ``r`` beats the current weights there, the site is left unchanged. The chosen ``r``
is then refit on all rows. On minilm-sst5 auto, r = 1e-2 and r = 1e-4 for every site were within a
few discordant rows of each other (r = 1 was worse); auto mostly chose 1e-2 for the attention
projections and 0.1-1 for the FFN ones, which no single fixed r matches.

A layer that keeps no head has no projection, only the bias that stands in for its attention
(:mod:`cahp_deploy.pruning.empty_attention`); that bias is refit to the mean target. An FFN with no
neuron keeps one inert unit: its zero weights stay zero (``X = 0``, the ridge pins them to ``W0``)
and its bias is refit. Shapes never change, so the model saves, reloads (``load_pruned``) and exports
to ONNX as before.

Cost: each site runs only its own layer of the dense and the pruned model over the calibration rows:
the blocks below replay what they returned (recorded once per layer, after that layer's refits) and
a forward hook stops the pass at the site, so a refit costs about three full forward passes of each
model plus the float64 normal equations (the FFN's, (neurons+1)², dominate on MiniLM). Memory: the
two recorded streams, (rows x padded length x hidden) float32 each, about 80 MB apiece for 2,000
SST-5 rows on MiniLM.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cahp_deploy import arch
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.modeling import KEPT_HEADS_FIELD
from cahp_deploy.signals import model_inputs

log = logging.getLogger(__name__)

#: what each site's output is fit to (see the module docstring)
TARGETS = ("dense", "pruned_input", "residual")
#: which FFN output projections are refit: every layer's, only those whose neurons were pruned, none
FFN_MODES = ("all", "pruned", "none")
#: ``ridge="auto"`` chooses r (lambda = r * trace(XᵀX)/dim) from these, by held-out reconstruction error
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: share of the calibration rows held out to choose r under ``ridge="auto"``
HELD_OUT_FRACTION = 0.2
DEFAULT_TARGET = "residual"
DEFAULT_FFN = "all"


# --------------------------------------------------------------------------------------------------
# Pure math on the normal equations (torch float64, no model)
# --------------------------------------------------------------------------------------------------

@dataclass
class NormalEquations:
    """Sufficient statistics of one least-squares problem ``Y ≈ [X 1] Wa`` over real tokens.

    ``xtx`` is ``[X 1]ᵀ[X 1]``, (dim+1, dim+1); ``xty`` is ``[X 1]ᵀ Y``, (dim+1, H); ``yty`` is
    ``sum(Y²)``; ``y_sum`` (H,) and ``count`` give the target's mean. All float64. ``Wa`` stacks the
    weight's transpose over the bias: ``Wa = [Wᵀ; b]``, (dim+1, H).
    """

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: float
    y_sum: torch.Tensor
    count: int

    @classmethod
    def zeros(cls, dim: int, hidden: int, device: torch.device | str = "cpu") -> NormalEquations:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(dim + 1, dim + 1, **f64), torch.zeros(dim + 1, hidden, **f64), 0.0,
                   torch.zeros(hidden, **f64), 0)

    @property
    def dim(self) -> int:
        return self.xtx.shape[0] - 1

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens: ``x`` (T, dim), ``y`` (T, H), any float dtype (cast to float64)."""
        if x.shape[0] == 0:
            return
        y = y.to(torch.float64)
        xa = torch.cat([x.to(torch.float64), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += xa.T @ xa
        self.xty += xa.T @ y
        self.yty += float((y * y).sum())
        self.y_sum += y.sum(dim=0)
        self.count += int(x.shape[0])

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty,
                               self.y_sum + other.y_sum, self.count + other.count)

    def error(self, wa: torch.Tensor) -> float:
        """``||Y - [X 1] Wa||²`` over the accumulated tokens, from the statistics alone."""
        wa = wa.to(self.xty)
        value = self.yty - 2.0 * float((wa * self.xty).sum()) + float((wa * (self.xtx @ wa)).sum())
        return max(value, 0.0)  # rounding can leave a tiny negative where the fit is exact

    def spread(self) -> float:
        """``||Y - mean(Y)||²``: the error of the best constant, the scale of :meth:`relative_error`."""
        if self.count == 0:
            return 0.0
        return max(self.yty - float((self.y_sum * self.y_sum).sum()) / self.count, 0.0)

    def relative_error(self, wa: torch.Tensor) -> float:
        """``||Y - Ŷ||² / ||Y - mean(Y)||²`` (1 - R²); 0 where the target does not vary at all."""
        spread = self.spread()
        return self.error(wa) / spread if spread > 0 else 0.0


def ridge_lambda(normal: NormalEquations, r: float) -> float:
    """``r · trace(XᵀX) / dim``: r relative to the mean eigenvalue of XᵀX (``r`` itself if X is all 0)."""
    d = normal.dim
    if d == 0:
        return 0.0
    trace = float(torch.diagonal(normal.xtx)[:d].sum())
    return r * trace / d if trace > 0 else float(r)


def ridge_solve(normal: NormalEquations, wa0: torch.Tensor, r: float) -> torch.Tensor:
    """``argmin ||Y - [X 1] Wa||² + λ ||W - W0||²`` with ``λ = ridge_lambda(normal, r)``; bias free.

    ``wa0`` is the current ``[W0ᵀ; b0]``, (dim+1, H). Setting the gradient to zero gives
    ``(XᵀX + λP) Wa = XᵀY + λP Wa0`` with ``P = diag(1, ..., 1, 0)`` (the bias row unpenalised).
    With no token at all the current weights are returned.
    """
    if normal.count == 0:
        return wa0.to(torch.float64).clone()
    wa0 = wa0.to(normal.xty)
    lam = ridge_lambda(normal, r)
    penalty = torch.ones(normal.dim + 1, dtype=torch.float64, device=normal.xtx.device)
    penalty[-1] = 0.0
    lhs = normal.xtx + lam * torch.diag(penalty)
    rhs = normal.xty + lam * penalty[:, None] * wa0
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (r = 0 on collinear X): the minimum-norm least-squares solution
        return torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(rhs)


@dataclass(frozen=True)
class RidgeChoice:
    """What :func:`choose_ridge` decided: ``r`` (None: keep the current weights) and the held-out
    relative errors of the current weights and of every ``r`` tried."""

    r: float | None
    held_out_before: float
    held_out_by_r: dict[float, float]


def choose_ridge(fit: NormalEquations, held_out: NormalEquations, wa0: torch.Tensor,
                 grid: Sequence[float] = RIDGE_GRID) -> RidgeChoice:
    """The ``r`` of ``grid`` whose fit on ``fit`` reconstructs ``held_out`` best, or None when none
    beats the current weights ``wa0`` there by more than rounding (ties go to the current weights)."""
    before = held_out.relative_error(wa0)
    by_r = {float(r): held_out.relative_error(ridge_solve(fit, wa0, r)) for r in grid}
    best = min(by_r, key=lambda r: (by_r[r], -r))  # equal errors: the stronger ridge
    gain = before - by_r[best]  # below rounding noise is no gain: keep what pruning left
    return RidgeChoice(best if gain > 1e-9 * before + 1e-12 else None, before, by_r)


# --------------------------------------------------------------------------------------------------
# Reading activations off the two models
# --------------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook once everything a site needs has been read: the rest of the forward is skipped."""


@dataclass(frozen=True)
class _Site:
    layer: int
    kind: str  # "attention" | "ffn"


def _first_arg(args: tuple, where: str) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        # transformers UPGRADE POINT: 4.57 calls every block and projection with the hidden states
        # as the first positional argument; a version passing them by keyword lands here.
        raise CahpError(f"{where} was not called with its hidden states as the first positional argument; "
                        "this transformers version is not supported by reconstruct")
    return args[0]


def _residual_module(block: nn.Module, spec: arch.ArchSpec, site: _Site) -> nn.Module:
    """The module whose *input* is the stream the site's output is added to (the residual)."""
    return block if site.kind == "attention" else arch.get_path(block, spec.ffn_in)


def _site_output_module(block: nn.Module, spec: arch.ArchSpec, site: _Site) -> nn.Module:
    return arch.get_path(block, spec.output if site.kind == "attention" else spec.ffn_out)


def _run_until_stop(model: nn.Module, enc: dict) -> None:
    try:
        model(**model_inputs(model, enc))
    except _Stop:
        return
    raise CahpError("the forward pass ended without reaching the layer being reconstructed")


class _Replay(nn.Module):
    """Stands in for every block below the layer being refit: returns, for the current batch, what the
    block right below that layer returned when the stream was recorded (:func:`_record_stream`).

    Why: a site needs only its own layer's computation, yet a forward pass runs every block below it;
    replaying the recorded stream makes refitting L layers cost O(L) block evaluations, not O(L²).
    Whatever the encoder reads from a block's output (``[0]`` for BERT-like blocks, ``[-1]`` for
    DistilBERT's), it reads it from the very object the real block returned, so no output convention
    is assumed here. The replaced blocks ignore their inputs.
    """

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs = outputs
        self.batch = 0

    def forward(self, *args, **kwargs):
        return self.outputs[self.batch]


@contextlib.contextmanager
def _replaying(model: nn.Module, layer: int, outputs: list | None) -> Iterator[_Replay | None]:
    """Blocks ``0..layer-1`` of ``model`` replaced by one :class:`_Replay` of ``outputs`` (None: no
    replay, the model runs from its embeddings); the real blocks are put back on exit."""
    if layer == 0 or outputs is None:
        yield None
        return
    blocks = arch.layers(model)
    saved = [blocks[i] for i in range(layer)]
    replay = _Replay(outputs)
    try:
        for i in range(layer):
            blocks[i] = replay
        yield replay
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


def _record_stream(model: nn.Module, layer: int, outputs: list | None, batches, device) -> list:
    """What block ``layer`` returns for every batch (blocks below replayed from ``outputs``)."""
    recorded: list = []
    block = arch.layers(model)[layer]

    def hook(module, args, output):
        recorded.append(output)
        raise _Stop

    with _replaying(model, layer, outputs) as replay:
        handle = block.register_forward_hook(hook)
        try:
            for b, (_, enc) in enumerate(batches):
                if replay is not None:
                    replay.batch = b
                _run_until_stop(model, {k: v.to(device) for k, v in enc.items()})
        finally:
            handle.remove()
    return recorded


def _pruned_pass(model: nn.Module, spec: arch.ArchSpec, site: _Site, has_input: bool, want_residual: bool,
                 enc: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(X, residual) of the pruned model at ``site`` for one batch: the projection's input (None where
    the layer keeps no head) and the stream it is added to (when asked for)."""
    block = arch.layers(model)[site.layer]
    got: dict[str, torch.Tensor] = {}
    handles = []

    def residual_hook(module, args):
        got["residual"] = _first_arg(args, f"layer {site.layer}'s {site.kind} input")
        if not has_input:
            raise _Stop

    def input_hook(module, args):
        got["x"] = _first_arg(args, f"layer {site.layer}'s {site.kind} output projection")
        raise _Stop

    try:
        if want_residual or not has_input:
            handles.append(_residual_module(block, spec, site).register_forward_pre_hook(residual_hook))
        if has_input:
            handles.append(_site_output_module(block, spec, site).register_forward_pre_hook(input_hook))
        _run_until_stop(model, enc)
    finally:
        for h in handles:
            h.remove()
    return got.get("x"), got.get("residual")


def _dense_pass(model: nn.Module, spec: arch.ArchSpec, site: _Site, substitute: torch.Tensor | None,
                want_residual: bool, enc: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Y, residual) of the dense model at ``site`` for one batch: the projection's output and, when
    asked, its residual stream. ``substitute`` replaces the layer's input (the ``pruned_input`` target)."""
    block = arch.layers(model)[site.layer]
    got: dict[str, torch.Tensor] = {}

    def residual_hook(module, args):
        x = _first_arg(args, f"dense layer {site.layer}'s {site.kind} input")
        if substitute is not None:
            if substitute.shape != x.shape:
                raise CahpError(f"layer {site.layer}: the pruned model's stream has shape {tuple(substitute.shape)}, "
                                f"the dense one {tuple(x.shape)}; reconstruct a model pruned from this dense model")
            return (substitute, *args[1:])
        got["residual"] = x
        return None

    def output_hook(module, args, output):
        got["y"] = output
        raise _Stop

    handles = []
    try:
        if substitute is not None or want_residual:
            handles.append(_residual_module(block, spec, site).register_forward_pre_hook(residual_hook))
        handles.append(_site_output_module(block, spec, site).register_forward_hook(output_hook))
        _run_until_stop(model, enc)
    finally:
        for h in handles:
            h.remove()
    return got["y"], got.get("residual")


# --------------------------------------------------------------------------------------------------
# The pruned model's parameters at a site
# --------------------------------------------------------------------------------------------------

def _site_parameters(model: nn.Module, spec: arch.ArchSpec, site: _Site) -> tuple[nn.Parameter | None, nn.Parameter]:
    """(weight (H, dim) or None, bias (H,)) of the pruned model at ``site``."""
    block = arch.layers(model)[site.layer]
    if site.kind == "attention" and arch.heads_per_layer(model)[site.layer] == 0:
        return None, arch.get_path(block, spec.attention_block).bias  # EmptyAttention*: the bias alone
    linear = _site_output_module(block, spec, site)
    if linear.bias is None:
        raise CahpError(f"layer {site.layer}'s {site.kind} output projection has no bias; reconstruct needs one")
    return linear.weight, linear.bias


def _stacked(weight: nn.Parameter | None, bias: nn.Parameter) -> torch.Tensor:
    """``[Wᵀ; b]`` in float64, (dim+1, H)."""
    b = bias.detach().to(torch.float64)[None, :]
    return b if weight is None else torch.cat([weight.detach().to(torch.float64).T, b], dim=0)


def _write(weight: nn.Parameter | None, bias: nn.Parameter, wa: torch.Tensor) -> None:
    with torch.no_grad():
        if weight is not None:
            weight.copy_(wa[:-1].T.to(weight.dtype))
        bias.copy_(wa[-1].to(bias.dtype))


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------

def _check_inputs(pruned: nn.Module, dense: nn.Module, rows: LabelledData, max_length: int, batch_size: int,
                  ridge: float | str, target: str, ffn: str) -> None:
    if target not in TARGETS:
        raise CahpError(f"reconstruct target must be one of {', '.join(TARGETS)}, got {target!r}")
    if ffn not in FFN_MODES:
        raise CahpError(f"reconstruct ffn must be one of {', '.join(FFN_MODES)}, got {ffn!r}")
    if isinstance(ridge, str):
        if ridge != "auto":
            raise CahpError(f"reconstruct ridge must be 'auto' or a number >= 0, got {ridge!r}")
    elif isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (math.isfinite(ridge) and ridge >= 0):
        raise CahpError(f"reconstruct ridge must be 'auto' or a finite number >= 0, got {ridge!r}")
    if batch_size < 1:
        raise CahpError(f"batch size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise CahpError(f"max length must be at least 2 tokens, got {max_length}")
    if len(rows) < (2 if ridge == "auto" else 1):
        raise CahpError(f"reconstruct needs calibration rows (at least 2 with ridge='auto'), got {len(rows)}")
    if pruned is dense:
        raise CahpError("reconstruct got the same model as pruned and dense; pass the dense model it was pruned from")
    spec_p, spec_d = arch.spec_for(pruned), arch.spec_for(dense)
    if spec_p is not spec_d or pruned.config.model_type != dense.config.model_type:
        raise CahpError(f"the pruned model is a {pruned.config.model_type}, the dense one a {dense.config.model_type}; "
                        "pass the dense model it was pruned from")
    if getattr(pruned.config, KEPT_HEADS_FIELD, None) is None:
        raise CahpError(f"the pruned model's config has no {KEPT_HEADS_FIELD}: it is not a model pruned by cahp-deploy")
    if getattr(dense.config, KEPT_HEADS_FIELD, None) is not None:
        raise CahpError(f"the dense model's config has {KEPT_HEADS_FIELD}: it is pruned; pass the dense source model")
    sizes = (("layers", arch.num_layers), ("heads per layer", arch.num_heads), ("hidden size", arch.hidden_size),
             ("FFN neurons per layer", arch.intermediate_size))
    for what, get in sizes:
        if get(pruned.config) != get(dense.config):
            raise CahpError(f"the pruned model has {get(pruned.config)} {what}, the dense one {get(dense.config)}; "
                            "pass the dense model it was pruned from")
    dev_p, dev_d = next(pruned.parameters()).device, next(dense.parameters()).device
    if dev_p != dev_d:
        raise CahpError(f"the pruned model is on {dev_p}, the dense one on {dev_d}; put both on one device")


def _plan(pruned: nn.Module, dense: nn.Module, ffn: str) -> list[tuple[_Site, str | None]]:
    """Every site bottom-up with the reason it is skipped (None: refit).

    A site is skipped while its layer and every layer below are untouched by pruning: its input and
    weights equal dense, so the fit would return its own weights.
    """
    heads, neurons = arch.heads_per_layer(pruned), arch.neurons_per_layer(pruned)
    full_heads, full_neurons = arch.num_heads(dense.config), arch.intermediate_size(dense.config)
    plan: list[tuple[_Site, str | None]] = []
    changed = False
    for layer in range(arch.num_layers(dense.config)):
        if heads[layer] < full_heads or changed:
            plan.append((_Site(layer, "attention"), None))
            changed = True
        else:
            plan.append((_Site(layer, "attention"), "identical to dense (no head pruned here or below)"))
        ffn_pruned = neurons[layer] < full_neurons
        if ffn == "none" or (ffn == "pruned" and not ffn_pruned):
            why = f"ffn={ffn!r}"
        elif not (ffn_pruned or changed):
            why = "identical to dense (nothing pruned here or below)"
        else:
            why = None
        plan.append((_Site(layer, "ffn"), why))
        changed = changed or ffn_pruned or why is None
    return plan


def _accumulate(pruned: nn.Module, dense: nn.Module, spec: arch.ArchSpec, site: _Site, batches, held_out_rows,
                target: str, hidden: int, replays: tuple[_Replay | None, _Replay | None],
                progress, task) -> tuple[NormalEquations, NormalEquations]:
    """The normal equations of ``site`` over the calibration batches: (fit rows, held-out rows).

    ``replays`` are the (pruned, dense) stand-ins for the blocks below ``site.layer`` (or None)."""
    weight, _ = _site_parameters(pruned, spec, site)
    dim = 0 if weight is None else weight.shape[1]
    device = next(pruned.parameters()).device
    fit, held = NormalEquations.zeros(dim, hidden, device), NormalEquations.zeros(dim, hidden, device)
    want_pruned_residual = target in ("pruned_input", "residual")
    for b, (idx, enc) in enumerate(batches):
        for replay in replays:
            if replay is not None:
                replay.batch = b
        enc = {k: v.to(device) for k, v in enc.items()}
        mask = enc["attention_mask"].bool()
        x, x_p = None, None
        if dim > 0 or want_pruned_residual:
            x, x_p = _pruned_pass(pruned, spec, site, dim > 0, want_pruned_residual, enc)
        substitute = x_p if target == "pruned_input" else None
        y, x_d = _dense_pass(dense, spec, site, substitute, target == "residual", enc)
        y = y.to(torch.float64)
        if target == "residual":
            y = y + x_d.to(torch.float64) - x_p.to(torch.float64)
        if x is None:
            x = y.new_zeros(*y.shape[:2], 0)
        is_held = torch.as_tensor(held_out_rows[idx], device=device)[:, None]
        for normal, rows_mask in ((fit, mask & ~is_held), (held, mask & is_held)):
            normal.add(x[rows_mask], y[rows_mask])
        if task is not None:
            progress.advance(task, len(idx))
    return fit, held


def _refit_site(fit: NormalEquations, held: NormalEquations, wa0: torch.Tensor,
                ridge: float | str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The new ``[Wᵀ; b]`` of one site and what was decided."""
    total = fit + held
    info: dict[str, Any] = {}
    if total.dim == 0:  # a bias alone (zero-head layer): its fit is the mean target, no ridge to choose
        ridge = "auto" if ridge == "auto" else 0.0
    if ridge == "auto":
        choice = choose_ridge(fit, held, wa0, grid=RIDGE_GRID if total.dim else (0.0,))
        info["ridge_grid_held_out_error"] = {str(r): e for r, e in choice.held_out_by_r.items()}
        info["held_out_relative_error_before"] = choice.held_out_before
        r = choice.r
    else:
        r = float(ridge)
    if r is None:
        why = "unchanged (no ridge beat the pruned weights on held-out rows)"
        return wa0, {**info, "ridge": None, "lambda": None, "refit": why}
    wa = ridge_solve(total, wa0, r)
    if total.error(wa) > total.error(wa0):  # cannot happen in exact arithmetic (see the module docstring)
        return wa0, {**info, "ridge": r, "lambda": ridge_lambda(total, r), "refit": "unchanged (the fit was worse)"}
    if ridge == "auto":
        info["held_out_relative_error_chosen"] = choice.held_out_by_r[r]
    if total.dim == 0:
        return wa, {**info, "ridge": None, "lambda": None, "refit": "bias"}
    return wa, {**info, "ridge": r, "lambda": ridge_lambda(total, r), "refit": "weight+bias"}


def reconstruct(
    pruned: nn.Module,
    dense: nn.Module,
    tokenizer,
    rows: LabelledData,
    *,
    max_length: int = 128,
    batch_size: int = 32,
    ridge: float | str = "auto",
    target: str = DEFAULT_TARGET,
    ffn: str = DEFAULT_FFN,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Refit ``pruned``'s output projections against ``dense`` on ``rows``, layer by layer; in place.

    Parameters
    ----------
    pruned : a classifier pruned by cahp-deploy (``config.cahp_kept_heads``), e.g. from
        :func:`cahp_deploy.modeling.load_classifier`; ragged heads, zero-head layers and pruned FFNs
        are fine. Only weights and biases change, never shapes.
    dense : the dense classifier it was pruned from (same architecture and sizes, same device).
    tokenizer : the models' tokenizer.
    rows : calibration rows; labels are not used (a few thousand rows of the training split).
    max_length, batch_size : tokenisation and batching (length-bucketed, :func:`cahp_deploy.data.iter_batches`).
    ridge : ``"auto"`` (default: per site, r from :data:`RIDGE_GRID` by the reconstruction error on
        20% of ``rows`` held out, then refit on all; a site no r improves there is left unchanged), or
        a fixed r >= 0. ``lambda = r * trace(XᵀX) / dim``, toward the current weights.
    target : one of :data:`TARGETS` (see the module docstring); default ``"residual"``.
    ffn : which FFN output projections to refit: ``"all"`` (default), ``"pruned"`` (only layers whose
        neurons were cut), ``"none"``. Attention output projections are refit in every layer from
        the first pruned one up.
    seed : which rows are held out under ``ridge="auto"``.
    progress : an optional ``rich.progress.Progress``; one task for the whole refit.

    Returns
    -------
    A JSON-able record: the settings, the number of rows and real tokens, the total seconds, and per
    site (bottom-up, attention then FFN of each layer) ``layer``, ``site``, ``kept`` (heads or
    neurons), ``refit`` (what was written, or why nothing was), ``relative_error_before`` /
    ``relative_error_after`` (``||Y - Ŷ||² / ||Y - mean(Y)||²`` on all calibration rows), ``ridge``
    (r), ``lambda`` and ``seconds``; under ``ridge="auto"`` also the held-out errors of every r tried.
    """
    _check_inputs(pruned, dense, rows, max_length, batch_size, ridge, target, ffn)
    start = time.perf_counter()
    spec = arch.spec_for(pruned)
    hidden = arch.hidden_size(dense.config)
    heads, neurons = arch.heads_per_layer(pruned), arch.neurons_per_layer(pruned)
    held_out_rows = np.zeros(len(rows), dtype=bool)
    if ridge == "auto":
        n_held = min(len(rows) - 1, max(1, round(HELD_OUT_FRACTION * len(rows))))
        held_out_rows[np.random.default_rng(seed).choice(len(rows), size=n_held, replace=False)] = True
    batches = [(idx, enc) for idx, enc, _ in
               iter_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length)]
    tokens = int(sum(int(enc["attention_mask"].sum()) for _, enc in batches))
    plan = _plan(pruned, dense, ffn)
    task = None
    if progress is not None:
        task = progress.add_task("reconstructing", total=len(rows) * sum(why is None for _, why in plan))

    modes = (pruned.training, dense.training)
    pruned.eval()
    dense.eval()
    sites: list[dict[str, Any]] = []
    device = next(pruned.parameters()).device
    last = max((site.layer for site, why in plan if why is None), default=-1)
    streams: tuple[list | None, list | None] = (None, None)  # (pruned, dense) outputs of the block below
    try:
        for site, why in plan:
            if site.kind == "attention" and site.layer > 0 and site.layer <= last:
                with torch.inference_mode():  # what the (now final) block below returns, for the replay
                    streams = tuple(_record_stream(m, site.layer - 1, old, batches, device)
                                    for m, old in zip((pruned, dense), streams))
            kept = heads[site.layer] if site.kind == "attention" else neurons[site.layer]
            entry: dict[str, Any] = {"layer": site.layer, "site": site.kind, "kept": kept}
            if why is not None:
                sites.append({**entry, "refit": f"skipped: {why}"})
                continue
            t = time.perf_counter()
            weight, bias = _site_parameters(pruned, spec, site)
            wa0 = _stacked(weight, bias)
            with torch.inference_mode(), _replaying(pruned, site.layer, streams[0]) as replay_p, \
                    _replaying(dense, site.layer, streams[1]) as replay_d:
                fit, held = _accumulate(pruned, dense, spec, site, batches, held_out_rows, target, hidden,
                                        (replay_p, replay_d), progress, task)
            wa, info = _refit_site(fit, held, wa0.to(fit.xty), ridge)
            total = fit + held
            before, after = total.relative_error(wa0), total.relative_error(wa)
            if info["refit"] in ("weight+bias", "bias"):
                _write(weight, bias, wa)
            entry.update(info)
            entry.update(relative_error_before=before, relative_error_after=after, tokens=total.count,
                         seconds=time.perf_counter() - t)
            sites.append(entry)
            log.info("layer %d %s: relative error %.4f -> %.4f (%s, r=%s)", site.layer, site.kind, before, after,
                     info["refit"], info["ridge"])
    finally:
        pruned.train(modes[0])
        dense.train(modes[1])
    return {
        "method": "layer-wise ridge reconstruction (Kwon et al. 2022)",
        "target": target,
        "ridge": ridge,
        "ridge_grid": list(RIDGE_GRID) if ridge == "auto" else None,
        "held_out_fraction": HELD_OUT_FRACTION if ridge == "auto" else None,
        "ffn": ffn,
        "seed": seed,
        "max_length": max_length,
        "batch_size": batch_size,
        "rows": len(rows),
        "rows_held_out": int(held_out_rows.sum()),
        "tokens": tokens,
        "calibration": rows.provenance(),
        "sites": sites,
        "seconds": time.perf_counter() - start,
    }


__all__ = ["FFN_MODES", "NormalEquations", "RIDGE_GRID", "RidgeChoice", "TARGETS", "choose_ridge", "reconstruct",
           "ridge_lambda", "ridge_solve"]
