"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
The T^2 factor keeps the soft-target gradients on the same scale as T changes (paper, section 2).
Defaults T=4, alpha=0.9 follow mdistiller's CIFAR settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import DistillOutput, Distiller, MethodOptions


@dataclass(frozen=True)
class KDOptions(MethodOptions):
    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0

    def __post_init__(self):
        from ..errors import EdgekdError

        if self.temperature <= 0:
            raise EdgekdError(f"kd temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise EdgekdError(f"kd alpha must be in [0, 1], got {self.alpha}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2-scaled KL divergence between softened teacher and student distributions, mean over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


class HintonKD(Distiller):
    name = "kd"
    description = "Hinton knowledge distillation: softened teacher logits (KL, temperature T) + label CE"
    Options = KDOptions
    teacher_logits_only = True

    def forward(self, x, y, teacher_logits=None):
        if teacher_logits is None:
            teacher_logits = self.teacher_logits(x)
        logits = self.student(x)
        soft = kd_loss(logits, teacher_logits, self.options.temperature)
        hard = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        loss = self.options.alpha * soft + (1.0 - self.options.alpha) * hard
        return DistillOutput(loss, logits, {"kd": soft.detach(), "ce": hard.detach()})
