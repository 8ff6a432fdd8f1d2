"""The contract between the trainer and a distiller: what a distiller asks of the teacher, what it gets each step.

`TeacherNeeds` is a distiller's one declaration of what the trainer should serve it from the teacher: the
logits, plus the feature maps at `taps`. A distiller (or one phase of a multi-phase method) sets
`teacher_needs`; the trainer then computes those outputs once per (training image, augmentation variant)
through distill/teacher_outputs.py (cache first, the fast runner for the misses) instead of the distiller
running the teacher. `teacher_needs = None` (the default): nothing is served, and the distiller runs its
teacher itself, if it has one.

`Step` is the one argument of `Distiller.forward` and `Distiller.after_step`: the batch, the teacher's outputs
when they were served, and where training is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import torch

from .features import Tap


@dataclass(frozen=True)
class TeacherNeeds:
    taps: tuple[Tap | str, ...] = ()  # teacher feature maps wanted beside the logits (module paths, features.Tap)


LOGITS = TeacherNeeds()  # the teacher's logits and nothing else (KD and the other logit methods)


def combined_needs(needs: Iterable[TeacherNeeds | None]) -> TeacherNeeds | None:
    """What serves all of `needs` from one teacher forward (one cache row): every tap once, in first-seen order."""
    declared = [n for n in needs if n is not None]
    if not declared:
        return None
    return TeacherNeeds(tuple(dict.fromkeys(tap for n in declared for tap in n.taps)))


@dataclass(frozen=True)
class Step:
    x: torch.Tensor  # the student's input batch
    y: torch.Tensor  # labels; UNLABELED (-1) for unlabeled images
    index: torch.Tensor | None = None  # each image's dataset index (None outside the trainer)
    # mixup/cutmix: the partner image's label and the image's own weight (distill/labels.py)
    y_partner: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    # served by the trainer as `teacher_needs` asks: logits, and the feature maps at its taps in that order
    teacher_logits: torch.Tensor | None = None
    teacher_features: tuple[torch.Tensor, ...] = ()
    epoch: int = 0  # epoch within the phase
    iteration: int = 0  # optimizer steps the phase took before this one

    @property
    def mix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.lam is None else (self.y_partner, self.lam)

    def micro(self, m: int, k: int) -> "Step":
        """Micro-batch m of k: every per-image tensor strided, the split DDP ranks take of a global batch."""
        if k == 1:
            return self

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[m::k]

        return replace(self, x=part(self.x), y=part(self.y), index=part(self.index), y_partner=part(self.y_partner),
                       lam=part(self.lam), teacher_logits=part(self.teacher_logits),
                       teacher_features=tuple(f[m::k] for f in self.teacher_features))
