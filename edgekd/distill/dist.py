"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

Instead of matching probabilities exactly (KL), DIST matches their relations: one minus the Pearson
correlation between student and teacher class probabilities, per image (inter-class relation) and per class
across the batch (intra-class relation). It tolerates the large teacher-student gap where KD fails.
loss = ce_weight * CE + beta * tau^2 * inter + gamma * tau^2 * intra, probabilities softened by tau.
Defaults are the paper's ImageNet setting (ce 1, beta 1, gamma 1, tau 1; CIFAR-100 used beta = gamma = 2, tau 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EdgekdError
from .base import LogitDistiller, MethodOptions
from .labels import label_loss


@dataclass(frozen=True)
class DISTOptions(MethodOptions):
    ce_weight: float = 1.0
    beta: float = 1.0  # inter-class relation
    gamma: float = 1.0  # intra-class relation
    tau: float = 1.0

    def __post_init__(self):
        if self.tau <= 0:
            raise EdgekdError(f"dist tau must be > 0, got {self.tau}")
        if min(self.ce_weight, self.beta, self.gamma) < 0:
            raise EdgekdError("dist ce_weight, beta and gamma must be >= 0")


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two (N, D) tensors."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta * inter, gamma * intra), each tau^2-scaled."""
    p_s = torch.softmax(student_logits.float() / tau, dim=1)
    p_t = torch.softmax(teacher_logits.float() / tau, dim=1)
    inter = 1.0 - pearson(p_s, p_t).mean()
    intra = 1.0 - pearson(p_s.t(), p_t.t()).mean()
    return beta * tau * tau * inter, gamma * tau * tau * intra


class DIST(LogitDistiller):
    name = "dist"
    description = "DIST (Huang et al. 2022): Pearson correlation of probabilities per image and per class"
    Options = DISTOptions

    def loss(self, logits, teacher_logits, y, mix):
        o = self.options
        inter, intra = dist_loss(logits, teacher_logits, o.beta, o.gamma, o.tau)
        ce = label_loss(logits, y, mix)
        return o.ce_weight * ce + inter + intra, {"ce": ce, "inter": inter, "intra": intra}
