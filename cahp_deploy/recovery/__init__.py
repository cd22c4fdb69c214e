"""The recovery fine-tune: a few epochs after pruning win back most of the lost accuracy.

``recover`` is the stage (pruned model dir -> recovered model dir); ``finetune_in_place`` is the
in-memory loop it runs, shared with the study.
"""

from cahp_deploy.recovery.stage import RECOVERY_FILE, recover, sample_examples
from cahp_deploy.recovery.trainer import RecoveryParams, distillation_loss, finetune_in_place

__all__ = ["RECOVERY_FILE", "RecoveryParams", "distillation_loss", "finetune_in_place", "recover", "sample_examples"]
