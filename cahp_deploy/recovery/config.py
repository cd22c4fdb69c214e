"""The recovery stage's options, declared once (:mod:`cahp_deploy.config`): ``cahp-deploy recover`` and ``run``.

Recovery is two steps: the least-squares refit against dense (``reconstruct``; ``run`` only, on by
default) and the fine-tune (``recover``; in ``run`` off by default under an accuracy budget with the
refit, see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cahp_deploy.config import StageConfig, option
from cahp_deploy.errors import CahpError

#: The reference pipeline's recovery: 3 epochs of fine-tuning after pruning.
DEFAULT_EPOCHS = 3
DEFAULT_LR = 2e-5


@dataclass(frozen=True)
class RecoverConfig(StageConfig):
    """The refit and the fine-tune that follow pruning."""

    reconstruct: bool = option(True, "Refit each pruned layer's output projections against the dense model by least "
                               "squares (no training, no labels), before any fine-tune.", off=True, in_command=False)
    reconstruct_rows: int | None = option(None, "Calibration rows of the selection split the refit reads [2000].",
                                          type=int, in_command=False)
    recover: bool | None = option(None, "Fine-tune after pruning (and the refit) [on, except under --max-accuracy-drop "
                                  "with the refit: measured, fine-tuning on gold labels moves pruned models away from "
                                  "dense].", off=True, in_command=False)
    split: str | None = option(None, "Split recovery trains on [the selection split].", run_name="--recover-split",
                               in_command=False)
    epochs: int = option(DEFAULT_EPOCHS, "Fine-tune epochs (the CAHP reference uses 3).", type=int,
                         run_name="--recover-epochs")
    lr: float = option(DEFAULT_LR, "Fine-tune peak AdamW learning rate.", type=float, run_name="--recover-lr")
    batch_size: int = option(32, "Fine-tune batch size.", type=int, run_name="--recover-batch-size")
    max_examples: int | None = option(None, "Fine-tune on a seeded random subset of N rows.", type=int,
                                      run_name="--recover-max-examples")
    distill_from: str | None = option(None, "Dense model whose logits to distil from (run: --distill, its MODEL).",
                                      run_name=None)
    temperature: float = option(2.0, "Distillation temperature T.", type=float, run_name=None)
    alpha: float = option(0.5, "Weight of the distillation loss vs cross-entropy.", type=float, run_name=None)
    time_budget: float | None = option(None, "Stop training after this many seconds.", type=float, run_name=None)
    train_embeddings: bool = option(False, "Also update the word embeddings (frozen by default).", run_name=None)
    qat: bool | None = option(None, "Quantization-aware: train under the rounding of the INT8 export (per-channel "
                              "int8 weights, per-batch uint8 inputs; straight-through gradients) [run: on when INT8 "
                              "is exported, ~2x recovery time; recover: off].", off=True)

    def check(self) -> None:
        if self.reconstruct_rows is not None and (not self.reconstruct or self.reconstruct_rows < 2):
            raise CahpError(f"{self._flag('reconstruct_rows')} {self.reconstruct_rows} needs --reconstruct and at "
                            "least 2 rows")
        if self.recover is not False:
            self._positive("epochs")
        self._positive("lr", "batch_size", "max_examples", "temperature")
        if not 0.0 <= self.alpha <= 1.0:
            raise CahpError(f"{self._flag('alpha')} must be in [0, 1], got {self.alpha}")

    def reconstruct_kwargs(self) -> dict[str, Any] | None:
        """:func:`cahp_deploy.recovery.refit.refit`'s options; None: no refit."""
        if not self.reconstruct:
            return None
        return {} if self.reconstruct_rows is None else {"max_examples": self.reconstruct_rows}

    def kwargs(self, *, qat_default: bool = False, max_length: int | None = None) -> dict[str, Any]:
        """:func:`cahp_deploy.recovery.recover`'s options (``qat`` None takes ``qat_default``)."""
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "max_examples": self.max_examples,
                "distill_from": self.distill_from, "temperature": self.temperature, "alpha": self.alpha,
                "time_budget": self.time_budget, "freeze_embeddings": not self.train_embeddings,
                "qat": qat_default if self.qat is None else self.qat, "max_length": max_length}


__all__ = ["DEFAULT_EPOCHS", "DEFAULT_LR", "RecoverConfig"]
