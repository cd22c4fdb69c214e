"""What the trainable baselines (``l0``, ``dsp``, ``pass``) share: options, data, relaxed gates, one loop.

Each of them learns one number per head (a gate logit) by running the classifier with relaxed gates
multiplied into the heads' outputs (:class:`cahp_deploy.gates.HeadGates`) and minimizing the task loss
plus a method-specific penalty. They differ only in how a gate is sampled and in the penalty, so
each method module supplies a ``sample`` and a ``penalty`` callable and this module does the rest:

* :func:`training_batches` tokenizes a seeded subset of the data once (length-bucketed batches);
* :class:`HardConcrete` is the stretched, clipped concrete gate of Louizos et al. (2018), used by
  ``l0`` (Voita et al. 2019) and ``pass`` (Ding et al. 2024);
* :func:`train_gates` runs the seeded training loop with a progress bar and a wall-clock budget;
  schedules run on a :class:`Schedule` fraction, so a run cut short by time still anneals fully.

Model weights are frozen by default (the gates learn which heads the *given* model needs);
``train_weights`` trains a private copy jointly, as arXiv 2110.03252 does; the copy is thrown away
because ``select`` only decides heads, and ``recover`` fine-tunes the pruned model afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cahp_deploy import arch
from cahp_deploy.data import LabelledData, iter_batches
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import HeadGates
from cahp_deploy.selection.topk import keep_top_k
from cahp_deploy.signals import model_inputs

#: Defaults sized so each trainable method finishes well inside 15 minutes on 2 CPU cores for a
#: 6 x 12-head MiniLM (about 0.3-0.5 s per frozen-weight step at batch 32, max_length 64).
DEFAULT_STEPS = 300
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LENGTH = 64
DEFAULT_MAX_EXAMPLES = 4096
DEFAULT_TIME_BUDGET = 600.0  # seconds of training; the step plan shrinks to fit it (see Schedule)
DEFAULT_WEIGHTS_LR = 2e-5
GRAD_CLIP = 1.0  # max gradient norm, the HF Trainer default both reference implementations ran with


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


def option(options: dict[str, Any], name: str, default, kind: type, *, low=None, high=None,
           low_open: bool = False, choices: tuple | None = None):
    """Read ``options[name]`` (None or absent: ``default``), converted to ``kind`` and range-checked.

    The CLI passes None for every option the user left out, so None always means "the default".
    Errors name the CLI flag (``--name-with-dashes``), the bad value and what is allowed.
    """
    value = options.get(name)
    if value is None:
        return default
    flag = "--" + name.replace("_", "-")
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            else:
                value = bool(value)
        elif kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        else:
            value = kind(value)
    except (TypeError, ValueError):
        raise CahpError(f"{flag} must be a {kind.__name__}, got {options.get(name)!r}") from None
    if choices is not None and value not in choices:
        raise CahpError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if kind in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise CahpError(f"{flag} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise CahpError(f"{flag} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise CahpError(f"{flag} must be <= {high}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainOptions:
    """The options every trainable method takes (CLI names in parentheses).

    steps (--steps): optimizer steps; epochs (--epochs), when given, overrides it with
    ceil(epochs * batches per epoch). lr (--lr): learning rate of the gate logits (the default is the
    method's paper default). time_budget (--time-budget): seconds; 0 or less means no limit.
    train_weights (--train-weights): also train the model weights, lr weights_lr (--weights-lr).
    """

    steps: int
    epochs: float | None
    lr: float
    batch_size: int
    max_length: int
    max_examples: int
    time_budget: float | None
    train_weights: bool
    weights_lr: float

    @classmethod
    def read(cls, options: dict[str, Any], lr: float, steps: int = DEFAULT_STEPS) -> TrainOptions:
        budget = option(options, "time_budget", DEFAULT_TIME_BUDGET, float)
        return cls(
            steps=option(options, "steps", steps, int, low=1),
            epochs=option(options, "epochs", None, float, low=0.0, low_open=True),
            lr=option(options, "lr", lr, float, low=0.0, low_open=True),
            batch_size=option(options, "batch_size", DEFAULT_BATCH_SIZE, int, low=1),
            max_length=option(options, "max_length", DEFAULT_MAX_LENGTH, int, low=8),
            max_examples=option(options, "max_examples", DEFAULT_MAX_EXAMPLES, int, low=1),
            time_budget=budget if budget > 0 else None,
            train_weights=option(options, "train_weights", False, bool),
            weights_lr=option(options, "weights_lr", DEFAULT_WEIGHTS_LR, float, low=0.0, low_open=True),
        )

    def planned_steps(self, batches_per_epoch: int) -> int:
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def head_grid(model: nn.Module) -> tuple[int, int]:
    """(layers, heads) of the model, which must be dense: gates are trained on the full grid."""
    counts = arch.heads_per_layer(model)
    n_layers, n_heads = arch.dense_head_grid(model.config)
    if counts != [n_heads] * n_layers:
        raise CahpError("select needs the dense model; this one is already pruned (give the original model)")
    return n_layers, n_heads


def keep(scores: np.ndarray, k: int, options: dict[str, Any]) -> list[list[int]]:
    """Top-k of a (layers, heads) grid; each layer keeps its best head unless --allow-empty-layers.

    The guard is the one CAHP, gradient and random use, so every method is compared at equal budgets.
    """
    allow_empty = option(options, "allow_empty_layers", False, bool)
    return keep_top_k(scores, k, min_per_layer=0 if allow_empty else 1)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def subset(data: LabelledData, max_examples: int, seed: int) -> LabelledData:
    """A seeded random subset (in file order), because split files are often sorted by label."""
    if len(data) <= max_examples:
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=max_examples, replace=False))
    return data.subset(idx)


def training_batches(model: nn.Module, tokenizer, data: LabelledData, batch_size: int, max_length: int,
                     max_examples: int, seed: int) -> list[Batch]:
    """Tokenize a seeded subset once into length-bucketed batches of model inputs and labels."""
    rows = subset(data, max_examples, seed)
    out = []
    for _, enc, labels in iter_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length):
        out.append((model_inputs(model, enc), torch.as_tensor(labels, dtype=torch.long)))
    return out


def batch_stream(batches: list[Batch], seed: int) -> Iterator[Batch]:
    """Endless epochs over ``batches``, each epoch in a fresh seeded order."""
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(batches)):
            yield batches[i]


# ----------------------------------------------------------------------------------------------
# gates
# ----------------------------------------------------------------------------------------------


class HardConcrete:
    """Hard-concrete gates, one per head (Louizos, Welling & Kingma 2018, section 4).

    A gate is ``z = clip(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)``
    with u ~ U(0, 1): exactly 0 or 1 with positive probability, differentiable in ``log_alpha``
    in between. beta = 0.33 and (gamma, zeta) = (-0.1, 1.1) as Voita et al. (2019) and PASS used.

    ``log_alpha`` starts at log((1 - p) / p) plus N(0, 0.01) noise, p = ``drop_init`` (Louizos'
    ``droprate_init``); 0.5 starts every gate at an even chance of being open.
    """

    beta = 0.33
    gamma = -0.1
    zeta = 1.1

    def __init__(self, shape: tuple[int, int], generator: torch.Generator, drop_init: float = 0.5):
        mean = math.log(1.0 - drop_init) - math.log(drop_init)
        init = mean + 0.01 * torch.randn(shape, generator=generator)
        self.log_alpha = nn.Parameter(init)
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """One relaxed gate per head (the whole batch shares it, as in both reference implementations)."""
        u = torch.rand(self.log_alpha.shape, generator=self.generator).clamp(1e-6, 1.0 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The test-time gate: clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)."""
        s = torch.sigmoid(self.log_alpha.detach())
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def p_open(self) -> torch.Tensor:
        """P(z != 0): the expected L0 norm, summed over heads, is the L0 penalty."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def p_closed(self) -> torch.Tensor:
        """P(z == 0)."""
        return 1.0 - self.p_open()

    def p_one(self) -> torch.Tensor:
        """P(z == 1)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log((1.0 - self.gamma) / (self.zeta - 1.0)))


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


class Deadline:
    """Wall-clock budget shared by everything one ``select`` call trains (None: unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float | None:
        return None if self.seconds is None else max(0.0, self.seconds - self.elapsed())


class Schedule:
    """How far a run is, in [0, 1], against a step plan that shrinks to fit the time budget.

    Annealing (DSP's temperature, PASS's coefficient and reopenings) is written against this
    fraction. After each step the time per step so far projects the whole plan; when it would not
    fit in ``seconds``, the plan shrinks to the steps that do, so a run the budget cuts short still
    completes its schedule, compressed, instead of stopping half-annealed. A run that fits never
    looks at the clock, which keeps it an exact function of its seed.
    """

    WARM_STEPS = 3  # steps left out of the timing (the first ones pay one-off costs)
    MIN_TIMED = 5  # timed steps before the first projection

    def __init__(self, steps: int, seconds: float | None):
        self.steps = steps
        self.planned = steps
        self.seconds = seconds
        self.start = time.perf_counter()
        self._timed_from: float | None = None
        self._last = 0.0

    def out_of_time(self) -> bool:
        """The hard stop, should the projection be wrong (a sudden slowdown of a shared machine)."""
        return self.seconds is not None and time.perf_counter() - self.start >= self.seconds

    def fraction(self, step: int) -> float:
        """Monotone: a plan that grows back (the machine got faster) holds the fraction until caught up."""
        self._last = max(self._last, min(step / self.planned, 1.0))
        return self._last

    def after(self, steps_done: int) -> None:
        if self.seconds is None or steps_done < self.WARM_STEPS:
            return
        now = time.perf_counter()
        if self._timed_from is None:
            self._timed_from = now
            return
        timed = steps_done - self.WARM_STEPS
        if timed < self.MIN_TIMED:
            return
        per_step = (now - self._timed_from) / timed
        left = self.seconds - (now - self.start)
        self.planned = max(steps_done, min(self.steps, steps_done + int(left / per_step)))

    @property
    def shrunk(self) -> bool:
        return self.planned < self.steps


@dataclass
class TrainLog:
    """What one training run did: reported under ``details`` in selection.json."""

    steps_planned: int
    steps_done: int = 0
    steps_fitted: int = 0  # the plan after fitting it to the time budget
    seconds: float = 0.0
    stopped_by_time_budget: bool = False
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean task loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps_planned": self.steps_planned,
            "steps_fitted": self.steps_fitted,
            "steps_done": self.steps_done,
            "seconds": round(self.seconds, 3),
            "stopped_by_time_budget": self.stopped_by_time_budget,
            "loss_curve": [[s, round(v, 5)] for s, v in self.loss_curve],
        }


@contextlib.contextmanager
def model_for_training(model: nn.Module, train_weights: bool):
    """Yield ``(model, weights)``: the model frozen (weights ``[]``) or a trainable private copy.

    Freezing is undone on exit, so the caller's model is left exactly as it was.
    """
    if train_weights:
        net = copy.deepcopy(model)
        for p in net.parameters():
            p.requires_grad_(True)
        yield net, [p for p in net.parameters()]
        return
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model, []
    finally:
        for p, flag in zip(model.parameters(), saved, strict=True):
            p.requires_grad_(flag)


def train_gates(
    model: nn.Module,
    batches: list[Batch],
    *,
    gate_params: list[torch.Tensor],
    sample: Callable[[float], torch.Tensor],
    penalty: Callable[[float], torch.Tensor | float],
    opts: TrainOptions,
    seed: int,
    seconds: float | None,
    progress=None,
    description: str = "training gates",
    after_step: Callable[[float], None] | None = None,
    log_every: int = 25,
    require_progress: bool = True,
) -> TrainLog:
    """Minimize task loss + ``penalty(fraction)`` over the gate logits (and the weights if asked).

    ``sample(fraction)`` returns the relaxed gates, (layers, heads) for the whole batch or
    (batch, layers, heads) per example; ``fraction`` is the :class:`Schedule` position of the step.
    ``after_step(fraction)`` runs after each optimizer step (PASS clips and reopens gates there).
    Adam, gradient norm clipped to 1; the model stays in eval mode (no dropout), so a run that fits
    in ``seconds`` is a deterministic function of ``seed`` on a given machine. One that does not
    fit runs fewer steps over the same schedule (:class:`Schedule`), with a hard stop at
    ``seconds``; running out of time before the first step is a user error unless
    ``require_progress`` is False.
    """
    n_layers, _ = head_grid(model)
    stream = batch_stream(batches, seed)
    steps = opts.planned_steps(len(batches))
    log = TrainLog(steps_planned=steps)
    task = progress.add_task(description, total=steps) if progress is not None else None
    schedule = Schedule(steps, seconds)
    with model_for_training(model, opts.train_weights) as (net, weights):
        groups = [{"params": gate_params, "lr": opts.lr}]
        if weights:
            groups.append({"params": weights, "lr": opts.weights_lr})
        optimizer = torch.optim.Adam(groups)
        params = gate_params + weights
        running, count = 0.0, 0
        with HeadGates(net) as gates:
            step = 0
            while step < schedule.planned:
                if schedule.out_of_time():
                    break
                fraction = schedule.fraction(step)
                inputs, labels = next(stream)
                g = sample(fraction)
                gates.values = [g[..., layer, :] for layer in range(n_layers)]
                loss = F.cross_entropy(net(**inputs).logits, labels)
                total = loss + penalty(fraction)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                optimizer.step()
                step += 1
                schedule.after(step)
                if after_step is not None:
                    after_step(schedule.fraction(step))
                running += float(loss.detach())
                count += 1
                log.steps_done = step
                if step % log_every == 0:
                    log.loss_curve.append((step, running / count))
                    running, count = 0.0, 0
                if task is not None:
                    progress.update(task, advance=1)
    log.stopped_by_time_budget = log.steps_done < steps
    log.steps_fitted = schedule.planned
    if log.steps_done == 0 and require_progress:
        raise CahpError(f"--time-budget ran out ({seconds:.3g} s left) before the first training step; raise it")
    if count:
        log.loss_curve.append((log.steps_done, running / count))
    if task is not None and log.steps_done < steps:
        progress.update(task, total=log.steps_done, completed=log.steps_done)
    log.seconds = time.perf_counter() - schedule.start
    return log


def generator(seed: int) -> torch.Generator:
    """A private CPU generator: gate noise never touches (or depends on) torch's global RNG."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


__all__ = [
    "Deadline",
    "HardConcrete",
    "Schedule",
    "TrainLog",
    "TrainOptions",
    "batch_stream",
    "generator",
    "head_grid",
    "keep",
    "model_for_training",
    "option",
    "subset",
    "train_gates",
    "training_batches",
]
