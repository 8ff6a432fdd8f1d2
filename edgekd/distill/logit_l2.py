"""Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (NeurIPS 2014): regress the teacher's logits.

loss = mean squared error between student and teacher logits (+ ce_weight * CE on the labels).
The paper's objective is 1/2 ||z_s - z_t||^2 per example and uses no labels (ce_weight=0). We average over
the classes as well (MSE): the same minimiser, with a scale that does not grow with the class count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..errors import EdgekdError
from .base import LogitDistiller, MethodOptions
from .labels import label_loss


@dataclass(frozen=True)
class LogitL2Options(MethodOptions):
    ce_weight: float = 0.0

    def __post_init__(self):
        if self.ce_weight < 0:
            raise EdgekdError(f"logit_l2 ce_weight must be >= 0, got {self.ce_weight}")


def logit_l2_loss(student_logits, teacher_logits):
    return F.mse_loss(student_logits.float(), teacher_logits.float())


class LogitL2(LogitDistiller):
    name = "logit_l2"
    description = "Ba & Caruana logit regression: MSE between student and teacher logits (+ optional CE)"
    Options = LogitL2Options

    def loss(self, logits, teacher_logits, y, mix):
        l2 = logit_l2_loss(logits, teacher_logits)
        if self.options.ce_weight == 0:
            return l2, {"l2": l2}
        ce = label_loss(logits, y, mix)
        return l2 + self.options.ce_weight * ce, {"l2": l2, "ce": ce}
