"""A method is a list of phases; each phase trains its own parameters with its own loss and optimizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import OptimConfig

if TYPE_CHECKING:
    from ..distill.base import Distiller


@dataclass
class Phase:
    name: str
    epochs: int
    distiller: "Distiller"  # forward(x, y) -> DistillOutput
    trainable: list[nn.Parameter]  # what this phase optimises; everything else is frozen during it
    optim: OptimConfig = field(default_factory=OptimConfig)
    evaluate: bool = True  # False for phases whose logits mean nothing yet (e.g. hint pre-training)

    @property
    def eval_model(self) -> nn.Module:
        return self.distiller.student_for_export()


def build_optimizer(params: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and normalisation parameters (1-D tensors), as is standard for CNNs."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.momentum > 0)
    return torch.optim.AdamW(groups, lr=optim.lr)
