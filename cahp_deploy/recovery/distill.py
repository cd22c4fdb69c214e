"""Training whose target is the dense model, kept only where it raises agreement with dense on unseen rows.

After the least-squares refit (:mod:`cahp_deploy.recovery.reconstruct`), a pruned model may be
trained briefly to imitate dense. The loss on a batch of text (labels are never needed)::

    T^2 * KL(softmax(t / T) || softmax(s / T))                       logits, temperature T
    + hidden_weight * mean_l  MSE(h_l(s), h_l(t)) / var(h_l(t))       every layer's output, real tokens
    + label_weight * CE(s, y)                                          optional, labelled rows only

The hidden-state term is CoFi's layerwise distillation without its layer mapping: pruning here
narrows layers and never removes them, so layer l of the student answers to layer l of dense; each
layer's error is divided by the variance of dense's output there, so no layer's scale dominates.
The teacher runs on the fly in the same batch (no_grad): on this CPU a teacher forward costs about a
third of a student step, and caching hidden states for every layer of every row would not fit.

**Kept only where it helps** (:func:`distill_if_it_helps`): agreement with dense (same argmax) is
measured on ``judge`` rows before and after; the trained weights are kept only when agreement rose,
else the model is put back as it was. The judge rows must be rows dense never saw and no decision
uses (``run`` holds them out of ``--distill-data``): on dense's own training rows agreement rewards
memorisation, and on the decision rows it would be a look the promise does not count.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cahp_deploy.data import LabelledData, iter_batches, token_lengths
from cahp_deploy.errors import CahpError
from cahp_deploy.recovery.trainer import _embedding_parameters, _optimizer, _shuffled_buckets
from cahp_deploy.signals import model_inputs

log = logging.getLogger(__name__)

DISTILL_FILE = "distill.json"
#: held-out judge rows taken from the distillation text (at most; a fifth of it when it is small)
JUDGE_ROWS = 1000


@dataclass(frozen=True)
class DistillParams:
    """Hyper-parameters of one distillation (all recorded)."""

    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 32
    temperature: float = 2.0
    hidden_weight: float = 1.0
    label_weight: float = 0.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    freeze_embeddings: bool = True
    time_budget: float | None = None

    def validate(self) -> None:
        if self.epochs < 1:
            raise CahpError(f"distillation epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise CahpError(f"distillation lr must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise CahpError(f"distillation temperature must be positive, got {self.temperature}")
        if self.hidden_weight < 0 or self.label_weight < 0:
            raise CahpError("distillation loss weights must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distillation_terms(student, teacher, mask: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit KL at ``temperature`` times T^2, mean over layers of the variance-normalised hidden MSE).

    ``student``/``teacher`` are model outputs with ``logits`` and ``hidden_states``; ``mask`` (B, L)
    marks real tokens.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student.logits / t, dim=-1), F.log_softmax(teacher.logits / t, dim=-1),
                  reduction="batchmean", log_target=True) * t * t
    m = mask.unsqueeze(-1).to(student.logits.dtype)
    tokens = m.sum().clamp_min(1.0)
    terms = []
    for hs, ht in zip(student.hidden_states[1:], teacher.hidden_states[1:]):  # [0] is the shared embedding
        var = ((ht - (ht * m).sum((0, 1)) / tokens) ** 2 * m).sum() / (tokens * ht.shape[-1])
        terms.append(((hs - ht) ** 2 * m).sum() / (tokens * ht.shape[-1]) / var.clamp_min(1e-6))
    if len(student.hidden_states) != len(teacher.hidden_states):
        raise CahpError("the pruned model and dense have different numbers of layers; hidden-state distillation "
                        "matches layer l to layer l")
    return kl, torch.stack(terms).mean()


def agreement(model: nn.Module, tokenizer, rows: LabelledData, reference: np.ndarray, max_length: int,
              batch_size: int = 64) -> float:
    """Share of ``rows`` on which ``model``'s argmax equals ``reference`` (dense's argmax)."""
    from cahp_deploy import evaluation

    pred = evaluation.logits(model, tokenizer, rows, batch_size=batch_size, max_length=max_length).argmax(axis=1)
    return float((pred == np.asarray(reference)).mean())


def distill_in_place(model: nn.Module, teacher: nn.Module, tokenizer, rows: LabelledData, *, max_length: int,
                     params: DistillParams = DistillParams(), labelled: bool = False, progress=None) -> dict[str, Any]:
    """Train ``model`` towards ``teacher`` on ``rows`` (their text; labels only with ``labelled`` and a
    positive ``label_weight``). Returns the per-epoch losses and times; the model is left in eval mode."""
    params.validate()
    if len(rows) == 0:
        raise CahpError(f"no distillation rows in {rows.source} [{rows.split}]")
    device = next(model.parameters()).device
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    lengths = token_lengths(tokenizer, rows, max_length)
    steps_per_epoch = int(np.ceil(len(rows) / params.batch_size))
    total = steps_per_epoch * params.epochs
    frozen = _embedding_parameters(model) if params.freeze_embeddings else set()
    trainable, optimizer, scheduler = _optimizer(model, params, frozen, total)  # recovery's AdamW and schedule
    use_labels = labelled and params.label_weight > 0
    teacher.eval()
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    epochs, start, stopped_early = [], time.perf_counter(), False
    model.train()
    try:
        for epoch in range(params.epochs):
            t0, sums, seen = time.perf_counter(), np.zeros(3), 0
            batches = _shuffled_buckets(lengths, params.batch_size, rng)
            task = None if progress is None else progress.add_task(
                f"distillation epoch {epoch + 1}/{params.epochs}", total=len(batches))
            for idx in batches:
                _, enc, labels = next(iter_batches(tokenizer, rows.subset(idx), batch_size=len(idx),
                                                   max_length=max_length, bucket=False))
                enc = {k: v.to(device) for k, v in model_inputs(model, enc).items()}
                with torch.no_grad():
                    t_out = teacher(**enc, output_hidden_states=True)
                s_out = model(**enc, output_hidden_states=True)
                kl, hidden = distillation_terms(s_out, t_out, enc["attention_mask"], params.temperature)
                loss = kl + params.hidden_weight * hidden
                ce = F.cross_entropy(s_out.logits, torch.as_tensor(labels, device=device)) if use_labels else None
                if ce is not None:
                    loss = loss + params.label_weight * ce
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
                optimizer.step()
                scheduler.step()
                sums += [float(kl.detach()), float(hidden.detach()), 0.0 if ce is None else float(ce.detach())]
                seen += 1
                if task is not None:
                    progress.advance(task)
                if params.time_budget is not None and time.perf_counter() - start > params.time_budget:
                    stopped_early = True
                    break
            mean = sums / max(seen, 1)
            epochs.append({"epoch": epoch + 1, "kl": mean[0], "hidden": mean[1], "ce": mean[2] if use_labels else None,
                           "seconds": time.perf_counter() - t0, "steps": seen})
            log.info("distillation epoch %d: kl %.4f hidden %.4f (%.0f s)", epoch + 1, mean[0], mean[1],
                     epochs[-1]["seconds"])
            if stopped_early:
                break
    finally:
        for p in model.parameters():
            p.requires_grad_(saved.get(id(p), True))
        model.eval()
    return {"params": params.to_dict(), "rows": len(rows), "epochs": epochs, "stopped_early": stopped_early,
            "train_seconds": time.perf_counter() - start, "labels_used": use_labels}


def distill_if_it_helps(model: nn.Module, teacher: nn.Module, tokenizer, rows: LabelledData, judge: LabelledData, *,
                        max_length: int, params: DistillParams = DistillParams(), labelled: bool = False,
                        progress=None) -> dict[str, Any]:
    """Distil ``model`` towards ``teacher`` on ``rows``; keep the result only when agreement with the
    teacher on ``judge`` (rows dense never saw, disjoint from ``rows``) rose. Returns the record
    (``kept``, agreement before and after, the training record)."""
    from cahp_deploy import evaluation

    if len(judge) == 0:
        raise CahpError("distillation needs judge rows (held-out text dense never saw) to decide whether it helps")
    reference = evaluation.logits(teacher, tokenizer, judge, max_length=max_length).argmax(axis=1)
    before = agreement(model, tokenizer, judge, reference, max_length)
    snapshot = copy.deepcopy(model.state_dict())
    record = distill_in_place(model, teacher, tokenizer, rows, max_length=max_length, params=params,
                              labelled=labelled, progress=progress)
    after = agreement(model, tokenizer, judge, reference, max_length)
    kept = after > before
    if not kept:
        model.load_state_dict(snapshot)
    return {"kept": kept, "judge_rows": len(judge), "agreement_before": before, "agreement_after": after,
            "training": record}


#: two-sample Kolmogorov-Smirnov statistic of token lengths above which ``--distill-data`` is called
#: unlike the task's rows (SST-2 phrases vs SST-5 sentences: 0.47; MNLI text vs MNLI train: 0.03)
UNLIKE_KS = 0.3


def text_likeness(text_lengths, task_lengths) -> dict[str, Any]:
    """How alike the distillation text and the task's rows are, by token length (the one property any
    text has): both medians and the two-sample KS statistic, with a ``warning`` above :data:`UNLIKE_KS`.

    Why: the judge that keeps or undoes a distillation is drawn from this text. Measured on SST-5, a
    judge of SST-2 phrases (median 10 tokens vs SST-5's 24) kept two distillations that lowered
    agreement with dense on SST-5's own rows (docs/recovery.md). Length is a symptom, not a proof:
    text of the right length can still come from another distribution.
    """
    from scipy.stats import ks_2samp

    a, b = np.asarray(text_lengths), np.asarray(task_lengths)
    ks = float(ks_2samp(a, b).statistic) if a.size and b.size else 0.0
    out: dict[str, Any] = {"median_tokens": {"distill_data": float(np.median(a)) if a.size else None,
                                             "task": float(np.median(b)) if b.size else None},
                           "ks_statistic": round(ks, 4), "unlike_above": UNLIKE_KS, "warning": None}
    if ks > UNLIKE_KS:
        out["warning"] = (f"--distill-data looks unlike the task's rows (median {out['median_tokens']['distill_data']:g} "
                          f"tokens vs {out['median_tokens']['task']:g}; KS {ks:.2f} > {UNLIKE_KS}): its judge may keep "
                          "distillations that lower agreement with dense on the task's own rows (docs/recovery.md)")
    return out


def split_judge(rows: LabelledData, seed: int, judge_rows: int = JUDGE_ROWS) -> tuple[LabelledData, LabelledData]:
    """(training rows, judge rows): a seeded ``judge_rows`` of ``rows`` (a fifth when fewer than five
    times that) held out to decide whether the training is kept."""
    n = min(judge_rows, len(rows) // 5)
    if n < 1:
        raise CahpError(f"{rows.source} [{rows.split}] has {len(rows)} rows; distillation needs at least 5 "
                        "(a fifth is held out to judge it)")
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.subset(np.sort(order[n:])), rows.subset(np.sort(order[:n]))


def distill_model_dir(source, dense_model, rows: LabelledData, judge: LabelledData, out, *, max_length: int,
                      params: DistillParams = DistillParams()) -> dict[str, Any]:
    """Load ``source`` (a pruned model dir), distil it towards ``dense_model`` if it helps; write ``out``
    (with ``distill.json``) only when the training was kept. Returns the record."""
    from cahp_deploy.hashing import sha256_dir
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.recovery.stage import save_model_dir

    start = time.perf_counter()
    model, tokenizer = load_classifier(source, attn_implementation=None)
    dense, _ = load_classifier(dense_model, attn_implementation=None, with_tokenizer=False)
    result = distill_if_it_helps(model, dense, tokenizer, rows, judge, max_length=max_length, params=params)
    record = {**result, "source_model_sha256": sha256_dir(source), "rows_data": rows.provenance(),
              "max_length": int(max_length), "total_seconds": time.perf_counter() - start}
    if result["kept"]:
        save_model_dir(Path(out), True, model, tokenizer, Path(source), DISTILL_FILE, record)
    return record


__all__ = ["DISTILL_FILE", "JUDGE_ROWS", "UNLIKE_KS", "DistillParams", "agreement", "distill_if_it_helps", "distill_in_place",
           "distill_model_dir", "distillation_terms", "split_judge", "text_likeness"]
