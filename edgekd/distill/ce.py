"""Plain supervised training (no teacher): the baseline every distiller is compared with."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import DistillOutput, Distiller, MethodOptions


@dataclass(frozen=True)
class CEOptions(MethodOptions):
    label_smoothing: float = 0.0


class CrossEntropy(Distiller):
    name = "ce"
    description = "cross-entropy on the labels only (training from scratch, no teacher)"
    requires_teacher = False
    Options = CEOptions

    def forward(self, x, y):
        logits = self.student(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        return DistillOutput(loss, logits, {"ce": loss.detach()})
