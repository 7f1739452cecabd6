"""Classification and distillation losses."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher ‖ student) on the class distributions, averaged over the batch."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), reduction="batchmean", log_target=True)
