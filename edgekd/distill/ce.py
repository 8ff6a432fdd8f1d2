"""Plain supervised training (no teacher): the baseline every distiller is compared with."""
from __future__ import annotations

from dataclasses import dataclass

from .base import DistillOutput, Distiller, MethodOptions
from .labels import label_loss


@dataclass(frozen=True)
class CEOptions(MethodOptions):
    label_smoothing: float = 0.0


class CrossEntropy(Distiller):
    name = "ce"
    description = "cross-entropy on the labels only (training from scratch, no teacher)"
    requires_teacher = False
    Options = CEOptions
    handles_mixed_labels = True

    def forward(self, step):
        logits = self.student(step.x)
        loss = label_loss(logits, step.y, step.mix, self.options.label_smoothing)
        return DistillOutput(loss, logits, {"ce": loss.detach()})
