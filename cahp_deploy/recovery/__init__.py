"""Recovery after pruning: the least-squares refit against dense, then (optionally) a short fine-tune.

``recover`` is the stage (pruned model dir -> recovered model dir); ``finetune_in_place`` is the
in-memory loop it runs, shared with the study; :mod:`~cahp_deploy.recovery.config` declares the
options. Names are imported on first use, so the config (and ``--help``) do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cahp_deploy.recovery.stage import RECOVERY_FILE, recover, sample_examples
    from cahp_deploy.recovery.trainer import RecoveryParams, distillation_loss, finetune_in_place

_HOME = {"RECOVERY_FILE": "stage", "recover": "stage", "sample_examples": "stage",
         "RecoveryParams": "trainer", "distillation_loss": "trainer", "finetune_in_place": "trainer"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"cahp_deploy.recovery.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RECOVERY_FILE", "RecoveryParams", "distillation_loss", "finetune_in_place", "recover", "sample_examples"]
