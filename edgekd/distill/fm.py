"""Function matching: Beyer et al., "Knowledge distillation: A good teacher is patient and consistent" (CVPR 2022).

The teacher and the student see the identical (aggressively augmented, mixup/cutmix) image and the student
matches the teacher's function there: loss = KL(p_teacher || p_student) at T = 1, no label term (the paper's
best recipe); `label_weight` > 0 adds the label cross-entropy (mixed labels for mixed images). Unlabeled
images only contribute the KL term, so any image the teacher can see is training data.

The consistency comes from the trainer: the teacher's outputs are computed (or served from the teacher
cache, keyed by image and augmentation variant, the mix partner and lambda included) for exactly the view
the student gets, at the teacher's own resolution when `--teacher-resolution` is set.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgekdError
from .base import LogitDistiller, MethodOptions
from .labels import label_loss
from .losses import kd_loss


@dataclass(frozen=True)
class FMOptions(MethodOptions):
    temperature: float = 1.0  # the paper: T = 1
    label_weight: float = 0.0  # the paper: no label term

    def __post_init__(self):
        if self.temperature <= 0:
            raise EdgekdError(f"fm temperature must be > 0, got {self.temperature}")
        if self.label_weight < 0:
            raise EdgekdError(f"fm label_weight must be >= 0, got {self.label_weight}")


class FunctionMatching(LogitDistiller):
    name = "fm"
    description = "function matching (Beyer et al. 2022): KL at T=1 to the teacher on the identical augmented/mixed view"
    Options = FMOptions

    def loss(self, logits, teacher_logits, y, mix):
        kl = kd_loss(logits, teacher_logits, self.options.temperature)
        if self.options.label_weight == 0:
            return kl, {"kl": kl}
        ce = label_loss(logits, y, mix)
        return kl + self.options.label_weight * ce, {"kl": kl, "ce": ce}
