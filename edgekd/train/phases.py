"""The optimizer of a training phase (the phases themselves: edgekd.distill.phase.Phase)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig


def build_optimizer(params: list[nn.Parameter], optim: OptimConfig,
                    head: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """No weight decay on biases and normalisation parameters (1-D tensors), as is standard for CNNs.

    Each group carries `lr_scale` (the trainer sets lr = schedule * lr_scale): 1 for `head`, and
    `optim.body_lr_scale` for the rest when a head is given."""
    head_ids = {id(p) for p in head}
    body_scale = optim.body_lr_scale if head_ids else 1.0
    groups = []
    for scale, members in ((1.0, [p for p in params if id(p) in head_ids]),
                           (body_scale, [p for p in params if id(p) not in head_ids])):
        for decay, chosen in ((optim.weight_decay, [p for p in members if p.ndim > 1]),
                              (0.0, [p for p in members if p.ndim <= 1])):
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr_scale": scale})
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.momentum > 0)
    return torch.optim.AdamW(groups, lr=optim.lr)
