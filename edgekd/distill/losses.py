"""Loss functions several methods share (KD, DML, BYOT, MLD, NetAug, MetaDistiller, the feature methods' KD
phases). Depends on torch only, so any distill module can use them without importing a method."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row (Sun et al. 2024, Algorithm 1: (z - mean) / (1e-7 + std), std with Bessel's correction)."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (1e-7 + logits.std(1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            standardize: bool = False) -> torch.Tensor:
    """T^2-scaled KL divergence between softened teacher and student distributions, mean over the batch; with
    `standardize` both logit vectors are z-scored first."""
    t = temperature
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
