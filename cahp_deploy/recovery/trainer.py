"""The recovery fine-tune itself, in memory: a model, data, and a few epochs of AdamW.

Why a separate in-memory function: ``recover`` (file to file) and the study (hundreds of candidate
head sets on one loaded dense model) share it; the study never writes a model to disk.

Defaults follow the CAHP reference pipeline's retraining (Hugging Face Trainer: AdamW, lr 2e-5,
weight decay 0.01, gradient clipping at 1.0, linear decay after a warmup of 10% of the steps,
3 epochs, seed 42). Two CPU-minded differences, both documented in ``recovery.json``:

* batches are length-bucketed (examples of similar length share a batch, batch order shuffled each
  epoch), so little compute is spent on padding;
* word embeddings are frozen by default (``freeze_embeddings``), as when the reference classifiers
  were trained: they hold half of MiniLM's parameters, and pruning heads does not change what a word
  means, so updating them only costs optimizer time.

Distillation (optional): with teacher logits ``t`` and student logits ``s`` the loss is::

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al., 2015).

Quantization-aware (``qat``): every Linear trains under the rounding the INT8 export will apply
(:mod:`cahp_deploy.recovery.qat`); the saved weights are the latent fp32 ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cahp_deploy import distributed
from cahp_deploy.data import LabelledData, iter_batches, token_lengths
from cahp_deploy.errors import CahpError
from cahp_deploy.recovery.qat import simulated_int8
from cahp_deploy.signals import model_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryParams:
    """Hyper-parameters of one recovery fine-tune (all recorded in recovery.json)."""

    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    alpha: float = 0.5
    seed: int = 42
    freeze_embeddings: bool = True
    time_budget: float | None = None
    qat: bool = False
    qat_per_channel: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise CahpError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise CahpError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise CahpError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise CahpError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if not self.temperature > 0:
            raise CahpError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise CahpError(f"--alpha (weight of the distillation loss) must be in [0, 1], got {self.alpha}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise CahpError(f"--time-budget must be a positive number of seconds, got {self.time_budget}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise CahpError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shuffled_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar-length rows, in a random order; random tie-breaks vary batch contents."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _embedding_parameters(model: nn.Module) -> set[int]:
    emb = model.get_input_embeddings()
    return {id(p) for p in emb.parameters()} if emb is not None else set()


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``; alpha=0 is plain CE."""
    ce = F.cross_entropy(student, labels)
    if alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def _optimizer(model: nn.Module, params: RecoveryParams, frozen: set, total_steps: int):
    """(the trainable parameters, AdamW with HF Trainer's decay groups, the warm-up then linear-decay schedule)."""
    warmup = int(params.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]  # biases and LayerNorm weights, as HF Trainer
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))
    return trainable, optimizer, scheduler


def _over_ranks(model: nn.Module, device) -> nn.Module:
    """``model`` itself in one process; under torchrun, wrapped in DDP."""
    if not distributed.is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _step(net: nn.Module, model: nn.Module, tokenizer, data: LabelledData, idx, params: RecoveryParams, device,
          teacher, alpha: float, trainable, optimizer, scheduler) -> float:
    """One optimizer step on the rows ``idx``; returns the batch's mean loss."""
    _, enc, labels = next(iter_batches(
        tokenizer, data.subset(idx), batch_size=len(idx), max_length=params.max_length, bucket=False
    ))
    enc = {k: v.to(device) for k, v in model_inputs(model, enc).items()}
    y = torch.as_tensor(labels, device=device)
    out = net(**enc).logits
    if teacher is not None:
        loss = distillation_loss(out, teacher[idx].to(device), y, params.temperature, alpha)
    else:
        loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def finetune_in_place(
    model: nn.Module,
    tokenizer,
    data: LabelledData,
    params: RecoveryParams = RecoveryParams(),
    teacher_logits: np.ndarray | None = None,
    progress=None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` in place; return per-epoch loss and seconds.

    ``teacher_logits`` (len(data), num_labels), when given, switches on distillation (see module
    docstring). The model is left in eval mode. Stops after the step that exceeds
    ``params.time_budget`` seconds, if set (``stopped_early`` then says so; the schedule was planned
    for all epochs, so the learning rate had not decayed to zero).
    """
    params.validate()
    if len(data) == 0:
        raise CahpError(f"no training examples in {data.source} [{data.split}]")
    if teacher_logits is not None and teacher_logits.shape[0] != len(data):
        raise ValueError(f"teacher logits have {teacher_logits.shape[0]} rows for {len(data)} examples")
    device = next(model.parameters()).device
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    lengths = token_lengths(tokenizer, data, params.max_length)
    # Data-parallel (torchrun): every rank draws the same shuffled batches (same seed) and takes every
    # world-th one, padded so all ranks run the same number of steps (DDP all-reduces each backward).
    steps_per_epoch = math.ceil(math.ceil(len(data) / params.batch_size) / distributed.world_size())
    total_steps = steps_per_epoch * params.epochs
    frozen = _embedding_parameters(model) if params.freeze_embeddings else set()
    trainable, optimizer, scheduler = _optimizer(model, params, frozen, total_steps)
    teacher = None if teacher_logits is None else torch.as_tensor(teacher_logits, dtype=torch.float32)
    alpha = params.alpha if teacher is not None else 0.0

    saved_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    net = _over_ranks(model, device)  # after freezing: DDP syncs the gradients of what requires grad
    epochs: list[dict[str, Any]] = []
    start = time.perf_counter()
    stopped_early = False
    steps = 0
    model.train()
    restore = contextlib.ExitStack()
    try:
        if params.qat:
            restore.enter_context(simulated_int8(model, params.qat_per_channel))
        for epoch in range(params.epochs):
            t0 = time.perf_counter()
            batches = distributed.shard_batches(_shuffled_buckets(lengths, params.batch_size, rng), pad=True)
            task = None
            if progress is not None:
                task = progress.add_task(f"recovery epoch {epoch + 1}/{params.epochs}", total=len(batches))
            loss_sum, seen = 0.0, 0
            for idx in batches:
                loss = _step(net, model, tokenizer, data, idx, params, device, teacher, alpha, trainable, optimizer,
                             scheduler)
                steps += 1
                loss_sum += loss * len(idx)
                seen += len(idx)
                if task is not None:
                    progress.advance(task)
                if params.time_budget is not None and distributed.any_rank(
                        time.perf_counter() - start > params.time_budget):  # all ranks stop at one step
                    stopped_early = True
                    break
            seconds = time.perf_counter() - t0
            loss_sum, seen = distributed.sum_over_ranks([np.array([loss_sum, seen], dtype=np.float64)])[0].tolist()
            seen = int(seen)
            epochs.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "seconds": seconds, "examples": seen})
            log.info("recovery epoch %d/%d: loss %.4f, %.1f s", epoch + 1, params.epochs, epochs[-1]["loss"], seconds)
            if stopped_early:
                break
    finally:
        restore.close()
        for p in model.parameters():
            p.requires_grad_(saved_grad.get(id(p), True))
        model.eval()
    return {
        "epochs": epochs,
        "epochs_completed": len(epochs) - (1 if stopped_early else 0),
        "stopped_early": stopped_early,
        "train_seconds": time.perf_counter() - start,
        "seconds_per_epoch": float(np.mean([e["seconds"] for e in epochs])) if epochs else 0.0,
        "steps": steps,
        "num_examples": len(data),
        "distilled": teacher is not None,
    }


__all__ = ["RecoveryParams", "distillation_loss", "finetune_in_place"]
