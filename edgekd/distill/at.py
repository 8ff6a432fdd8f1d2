"""Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017): activation-based attention transfer.

The attention map of a feature map f (B, C, H, W) is Q = mean_c |f_c|^p (p=2), flattened and L2-normalised.
loss = task + beta/2 * sum over layer pairs of mean((Q_s/|Q_s| - Q_t/|Q_t|)^2), with beta = 1000: the
authors' code (szagoruyko/attention-transfer) takes the mean over batch and positions, i.e. the paper's
"beta = 10^3 divided by the number of elements in the attention map and batch size".
Layers: the outputs of each residual group in the paper; here four stage boundaries (features.layer_pairs).
A student map of another size is resized (bilinear) to the teacher's, as the paper suggests.
task = CE by default (alpha=0); alpha > 0 mixes in Hinton KD (the paper's AT+KD).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EdgekdError
from .base import DistillOutput, Distiller, MethodOptions
from .features import check_task_options, layer_pairs, resize, run_with_taps, task_loss
from .step import TeacherNeeds


@dataclass(frozen=True)
class ATOptions(MethodOptions):
    beta: float = 1000.0
    p: float = 2.0
    alpha: float = 0.0  # weight of Hinton KD in the task loss (0: CE only)
    temperature: float = 4.0
    student_layers: str = ""
    teacher_layers: str = ""

    def __post_init__(self):
        check_task_options("at", self.alpha, self.temperature)
        if self.beta < 0 or self.p <= 0:
            raise EdgekdError(f"at needs beta >= 0 and p > 0, got beta={self.beta} p={self.p}")


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, H, W) spatial attention: mean over channels of |f|^p (not yet normalised)."""
    f = f.float()
    return (f.pow(2) if p == 2 else f.abs().pow(p)).mean(1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    qs = resize(attention_map(student_feature, p), teacher_feature.shape[-2:])
    qt = attention_map(teacher_feature, p)
    qs, qt = F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)
    return (qs - qt).pow(2).mean()


class AttentionTransfer(Distiller):
    name = "at"
    description = "attention transfer (Zagoruyko & Komodakis): match normalised spatial maps of sum |f|^2 + CE"
    Options = ATOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.pairs = layer_pairs(student, teacher, options.student_layers, options.teacher_layers)
        self.teacher_needs = TeacherNeeds(tuple(t for _, t in self.pairs))  # served (cached) by the trainer

    def forward(self, step):
        x, y = step.x, step.y
        t_logits, t_feats = self.teacher_forward(step)
        logits, s_feats = run_with_taps(self.student, x, [s for s, _ in self.pairs])
        losses = [at_loss(s, t, self.options.p) for s, t in zip(s_feats, t_feats)]
        at = sum(losses)
        task, terms = task_loss(logits, y, t_logits, self.options.alpha, self.options.temperature)
        loss = task + self.options.beta / 2 * at
        return DistillOutput(loss, logits, {**terms, "at": at.detach()})
