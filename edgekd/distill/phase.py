"""A method is a list of phases; each phase trains its own parameters with its own loss and optimizer.

`Phase` is the one thing a method hands the trainer (Distiller.phases()); it lives in the distill layer so that
methods never import the trainer, and the trainer (edgekd.train) imports it from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from ..config import OptimConfig

if TYPE_CHECKING:
    from .base import Distiller


@dataclass
class Phase:
    name: str
    epochs: int
    distiller: "Distiller"  # forward(step) -> DistillOutput; its teacher_needs say what the trainer serves
    trainable: list[nn.Parameter]  # what this phase optimises; everything else is frozen during it
    optim: OptimConfig = field(default_factory=OptimConfig)
    evaluate: bool = True  # False for phases whose logits mean nothing yet (e.g. hint pre-training)
    head: list[nn.Parameter] = field(default_factory=list)  # keep the full lr under optim.body_lr_scale < 1

    @property
    def eval_model(self) -> nn.Module:
        return self.distiller.student_for_export()
