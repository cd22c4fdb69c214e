"""``recover``: pruned model dir in, recovered model dir out (same format, plus recovery.json).

Removing heads costs accuracy (on the reference models, 10 to 28 points at CAHP's knee); the CAHP
reference pipeline always fine-tunes for 3 epochs after pruning. This stage does that, file to file,
so its output is again a pruned model dir that ``export`` and ``load_pruned`` accept unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cahp_deploy import distributed, evaluation, schema
from cahp_deploy.atomic import atomic_dir, check_output_path
from cahp_deploy.data import LabelledData, check_labels, load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir
from cahp_deploy.modeling import KEPT_HEADS_FIELD, load_classifier
from cahp_deploy.progress import make_progress
from cahp_deploy.recovery.qat import simulated_int8
from cahp_deploy.recovery.trainer import RecoveryParams, finetune_in_place

log = logging.getLogger(__name__)

RECOVERY_FILE = "recovery.json"
#: files of the input dir carried over unchanged (weights, config and tokenizer are re-saved)
#: tokens per example when no --max-length is given (capped at the model's positions)
DEFAULT_MAX_LENGTH = 128
_CARRIED_FILES = ("pruning.json", "refit.json")  # what export and the summary read


def save_model_dir(out: Path, force: bool, model, tokenizer, source: Path, record_file: str, record: dict) -> None:
    """Write a recovered model dir atomically: weights, tokenizer, what export and the summary read from
    ``source`` (:data:`_CARRIED_FILES`), and the step's own JSON record."""
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in _CARRIED_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, tmp / name)
        with open(tmp / record_file, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


def sample_examples(data: LabelledData, max_examples: int | None, seed: int) -> LabelledData:
    """A seeded random subset of ``max_examples`` rows (kept in their original order), or all rows."""
    if max_examples is None or max_examples >= len(data):
        return data
    if max_examples < 1:
        raise CahpError(f"--max-examples must be at least 1, got {max_examples}")
    rng = np.random.default_rng(seed)
    return data.subset(np.sort(rng.choice(len(data), size=max_examples, replace=False)))


def _teacher_logits(distill_from: str, student, train: LabelledData, tokenizer, max_length: int, progress):
    teacher, _ = load_classifier(distill_from, attn_implementation=None, with_tokenizer=False)
    if int(teacher.config.num_labels) != int(student.config.num_labels):
        raise CahpError(
            f"--distill-from {distill_from} has {teacher.config.num_labels} labels; the pruned model has "
            f"{student.config.num_labels}: distil from the dense model the pruned one came from"
        )
    if getattr(teacher.config, "vocab_size", None) != getattr(student.config, "vocab_size", None):
        raise CahpError(f"--distill-from {distill_from} uses another vocabulary than the pruned model")
    return evaluation.logits(teacher, tokenizer, train, batch_size=64, max_length=max_length, progress=progress)


def recover(
    pruned_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "train",
    eval_split: str | None = None,
    eval_max_examples: int | None = None,
    epochs: int = 3,
    lr: float = 2e-5,
    batch_size: int = 32,
    max_length: int | None = None,
    distill_from: str | os.PathLike | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    seed: int = 42,
    max_examples: int | None = None,
    time_budget: float | None = None,
    freeze_embeddings: bool = True,
    qat: bool = False,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    force: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Fine-tune the model in ``pruned_dir`` on ``data[split]`` and save it, complete, at ``out``.

    ``pruned_dir`` may also be a dense model dir. ``distill_from`` (the dense model) adds a KL term on
    its logits at ``temperature``, weighted ``alpha`` against cross-entropy. ``eval_split``, when given,
    is measured before and after (it must differ from ``split``; ``eval_max_examples`` keeps its first N
rows, the rows ``bench --max-examples`` scores). ``max_examples`` trains on a seeded
    random subset; ``time_budget`` (seconds) stops training early. ``qat`` trains under simulated
    dynamic INT8 (:mod:`cahp_deploy.recovery.qat`; ``accuracy_after_int8`` is then also measured
    under it). ``progress`` None: a bar when stderr is a terminal.

    Returns the contents of ``out/recovery.json``. ``out`` holds the weights, a config that keeps
    ``cahp_kept_heads``, the tokenizer, the input's ``pruning.json``, and ``recovery.json``; it is
    written atomically (nothing appears on error or Ctrl-C).

    Launched as several ranks (torchrun, ``accelerate launch``), training is data-parallel under DDP
    (same seed and epochs; :func:`~cahp_deploy.recovery.trainer.finetune_in_place`); only rank 0
    measures ``eval_split`` and writes ``out``; every rank returns once it is written.
    """
    params = RecoveryParams(
        epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length or DEFAULT_MAX_LENGTH, temperature=temperature,
        alpha=alpha, seed=seed, freeze_embeddings=freeze_embeddings, time_budget=time_budget, qat=qat,
    )
    params.validate()
    if eval_split is not None and eval_split == split:
        raise CahpError(
            f"--eval-split {eval_split!r} is the training split; evaluate on held-out data (e.g. validation)"
        )
    pruned_dir, out = Path(pruned_dir), Path(out)
    check_output_path(out, force)
    if out.resolve() == pruned_dir.resolve():
        raise CahpError(f"--out {out} is the input model dir; write the recovered model elsewhere")
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    train = load_labelled(data, split, **columns)
    held_out = load_labelled(data, eval_split, **columns) if eval_split is not None else None
    if held_out is not None and eval_max_examples is not None:
        if eval_max_examples < 1:
            raise CahpError(f"--eval-max-examples must be at least 1, got {eval_max_examples}")
        held_out = held_out.head(eval_max_examples)  # the first N rows, as bench scores them
    parallel = distributed.init_from_env()
    model, tokenizer = load_classifier(pruned_dir, attn_implementation=None)  # sdpa where supported
    from cahp_deploy.arch import max_sequence_length
    from cahp_deploy.serving_length import check_max_length

    # asked for: it must fit the position table; by default 128 tokens, capped at the positions
    params = replace(params, max_length=check_max_length(max_length, model.config)
                     or min(DEFAULT_MAX_LENGTH, max_sequence_length(model.config)))
    max_length = params.max_length
    model.to(distributed.device())
    num_labels = int(model.config.num_labels)
    check_labels(train, num_labels, min_classes=2)
    if held_out is not None:
        check_labels(held_out, num_labels)
    train = sample_examples(train, max_examples, seed)

    t_start = time.perf_counter()
    quiet = not distributed.is_main() or progress is False
    with make_progress(disable=True if quiet else None if progress is None else not progress) as bar:
        before = None
        if held_out is not None and distributed.is_main():
            before = evaluation.accuracy(model, tokenizer, held_out, max_length=max_length, progress=bar)
        teacher = None
        if distill_from is not None:
            teacher = _teacher_logits(str(distill_from), model, train, tokenizer, max_length, bar)
        stats = finetune_in_place(model, tokenizer, train, params, teacher_logits=teacher, progress=bar)
        after = after_int8 = None
        if held_out is not None and distributed.is_main():
            after = evaluation.accuracy(model, tokenizer, held_out, max_length=max_length, progress=bar)
            if qat:
                with simulated_int8(model, params.qat_per_channel):
                    after_int8 = evaluation.accuracy(model, tokenizer, held_out, max_length=max_length, progress=bar)

    record: dict[str, Any] = {
        "schema": schema.RECOVERY,
        "source_model": str(pruned_dir),
        "source_model_sha256": sha256_dir(pruned_dir),
        "kept_heads": getattr(model.config, KEPT_HEADS_FIELD, None),
        "distill_from": None if distill_from is None else str(distill_from),
        "distill_from_sha256": None if distill_from is None else sha256_dir(distill_from),
        "params": {**params.to_dict(), "max_examples": max_examples},
        "world_size": distributed.world_size(),
        "train": train.provenance(),
        "eval": None if held_out is None else held_out.provenance(),
        "accuracy_before": before,
        "accuracy_after": after,
        **({"accuracy_after_int8": after_int8} if qat else {}),
        **stats,
        "total_seconds": time.perf_counter() - t_start,
    }
    if not distributed.is_main():
        distributed.barrier()  # returns once rank 0 has written out
        return record
    save_model_dir(out, force, model, tokenizer, pruned_dir, RECOVERY_FILE, record)
    if parallel:
        distributed.barrier()
    log.info("recovered model saved to %s (%.1f s per epoch)", out, stats["seconds_per_epoch"])
    return record


__all__ = ["RECOVERY_FILE", "recover", "sample_examples"]
