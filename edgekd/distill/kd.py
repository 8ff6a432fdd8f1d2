"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
The T^2 factor keeps the soft-target gradients on the same scale as T changes (paper, section 2).
Defaults T=4, alpha=0.9 follow mdistiller's CIFAR settings.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import LogitDistiller, MethodOptions
from .labels import label_loss
from .losses import kd_loss, standardize_logits  # noqa: F401  (kd_loss, standardize_logits: public here too)


@dataclass(frozen=True)
class KDOptions(MethodOptions):
    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0
    # Sun et al. 2024: z-score both logit vectors before the softened KL (their setting: temperature 2,
    # KL weight 9, CE 0.1, i.e. alpha 0.9 with soft_weight 10)
    standardize: bool = False
    soft_weight: float = 1.0  # multiplies the KL term on top of alpha

    def __post_init__(self):
        from ..errors import EdgekdError

        if self.temperature <= 0:
            raise EdgekdError(f"kd temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise EdgekdError(f"kd alpha must be in [0, 1], got {self.alpha}")
        if self.soft_weight <= 0:
            raise EdgekdError(f"kd soft_weight must be > 0, got {self.soft_weight}")


class HintonKD(LogitDistiller):
    name = "kd"
    description = "Hinton knowledge distillation: softened teacher logits (KL, temperature T) + label CE"
    Options = KDOptions

    def loss(self, logits, teacher_logits, y, mix):
        o = self.options
        soft = kd_loss(logits, teacher_logits, o.temperature, o.standardize)
        hard = label_loss(logits, y, mix, o.label_smoothing)
        return o.alpha * o.soft_weight * soft + (1.0 - o.alpha) * hard, {"kd": soft, "ce": hard}
