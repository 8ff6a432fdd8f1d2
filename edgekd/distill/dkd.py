"""Decoupled knowledge distillation: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

KD's KL splits into a target-class term (TCKD: the binary target vs rest probabilities) and a non-target
term (NCKD: the distribution among the other classes), weighted separately:
loss = ce_weight * CE + warmup(epoch) * (alpha * TCKD + beta * NCKD), both T^2-scaled.
Defaults are the reference code's (mdistiller, CIFAR-100): CE 1.0, alpha 1.0, beta 8.0, T 4.0, the KD terms
ramped in linearly per epoch over the first 20 of 240 epochs (here: the same 1/12 of the schedule). The target class of
unlabeled or mixed images is the teacher's top-1 (distill/labels.py: dominant_label).
`standardize` z-scores the logits first (Sun et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EdgekdError
from .base import LogitDistiller, MethodOptions
from .labels import dominant_label, label_loss
from .losses import standardize_logits


@dataclass(frozen=True)
class DKDOptions(MethodOptions):
    ce_weight: float = 1.0
    alpha: float = 1.0  # TCKD
    beta: float = 8.0  # NCKD
    temperature: float = 4.0
    warmup_fraction: float = 20 / 240  # of the phase's steps over which the KD terms ramp in
    standardize: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise EdgekdError(f"dkd temperature must be > 0, got {self.temperature}")
        if min(self.ce_weight, self.alpha, self.beta) < 0:
            raise EdgekdError("dkd ce_weight, alpha and beta must be >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise EdgekdError(f"dkd warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha * TCKD, beta * NCKD), each T^2-scaled and averaged over the batch."""
    t = temperature
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    # binary (target, non-target) probabilities
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1).clamp(min=1e-12)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1).clamp(min=1e-12)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * t * t
    # distribution over the non-target classes: the target logit pushed to -inf (the reference uses -1000)
    masked = torch.finfo(torch.float32).min
    log_q_s = F.log_softmax((student_logits.float() / t).masked_fill(gt, masked), dim=1)
    q_t = F.softmax((teacher_logits.float() / t).masked_fill(gt, masked), dim=1)
    nckd = F.kl_div(log_q_s.masked_fill(gt, 0.0), q_t, reduction="batchmean") * t * t
    return alpha * tckd, beta * nckd


class DecoupledKD(LogitDistiller):
    name = "dkd"
    description = "decoupled KD (Zhao et al. 2022): target-class and non-target-class KL weighted separately"
    Options = DKDOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.ramp = 1.0

    def on_epoch_start(self, epoch, epochs, optimizer, steps_per_epoch=0):
        # per epoch, as the reference (min(epoch / warmup, 1), epochs counted from 1): exact after a resume
        warmup_epochs = self.options.warmup_fraction * epochs
        self.ramp = min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0

    def loss(self, logits, teacher_logits, y, mix):
        o = self.options
        target = dominant_label(y, teacher_logits, mix)
        s, t = (standardize_logits(logits), standardize_logits(teacher_logits)) if o.standardize else (logits, teacher_logits)
        tckd, nckd = dkd_loss(s, t, target, o.alpha, o.beta, o.temperature)
        ce = label_loss(logits, y, mix)
        return o.ce_weight * ce + self.ramp * (tckd + nckd), {"ce": ce, "tckd": tckd, "nckd": nckd}
