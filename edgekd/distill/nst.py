"""Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017).

Each channel's flattened activation map, L2-normalised, is a sample of "neuron selectivity"; the student's
channels should follow the teacher's distribution. loss = task + lambda/2 * sum over layer pairs of MMD^2
(paper Eq. 3-4) with the polynomial kernel k(a, b) = (a.b + c)^d, d=2 and c=0 as in the paper, computed per
example and averaged over the batch. lambda = 50 is RepDistiller's CIFAR-100 setting for NST (the paper tunes
it per experiment; the SSKD paper's grid found 100-1000). Channel counts may differ (MMD compares the two sets
of channel samples); a student map of another size is resized (bilinear) to the teacher's.
Layers: four stage boundaries (features.layer_pairs). task = CE, or KD-mixed with alpha > 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EdgekdError
from .base import DistillOutput, Distiller, MethodOptions
from .features import check_task_options, full_precision, layer_pairs, resize, run_with_taps, task_loss
from .step import TeacherNeeds


@dataclass(frozen=True)
class NSTOptions(MethodOptions):
    weight: float = 50.0  # lambda of Eq. 3 (the loss adds lambda/2 * MMD^2)
    degree: int = 2
    c: float = 0.0
    alpha: float = 0.0  # weight of Hinton KD in the task loss (0: CE only)
    temperature: float = 4.0
    student_layers: str = ""
    teacher_layers: str = ""

    def __post_init__(self):
        check_task_options("nst", self.alpha, self.temperature)
        if self.weight < 0 or self.degree < 1:
            raise EdgekdError(f"nst needs weight >= 0 and degree >= 1, got weight={self.weight} degree={self.degree}")


def _mean_kernel(a: torch.Tensor, b: torch.Tensor, degree: int, c: float) -> torch.Tensor:
    """Per example, mean over channel pairs (i, j) of (a_i . b_j + c)^degree; a (B, Ca, N), b (B, Cb, N)."""
    ca, cb, n = a.shape[1], b.shape[1], a.shape[2]
    if degree == 2 and c == 0 and n * n < ca * cb:
        # sum_ij (a_i . b_j)^2 = <a^T a, b^T b>: N x N Gram matrices instead of Ca x Cb
        return (a.transpose(1, 2) @ a * (b.transpose(1, 2) @ b)).sum((1, 2)) / (ca * cb)
    return (a @ b.transpose(1, 2) + c).pow(degree).mean((1, 2))


def nst_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    with full_precision(student_feature):
        s = resize(student_feature.float(), teacher_feature.shape[-2:])
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(teacher_feature.float().flatten(2), dim=2)
        mmd = _mean_kernel(t, t, degree, c) + _mean_kernel(s, s, degree, c) - 2 * _mean_kernel(s, t, degree, c)
        return mmd.mean()


class NeuronSelectivityTransfer(Distiller):
    name = "nst"
    description = "neuron selectivity transfer (Huang & Wang): MMD of channel maps, polynomial kernel d=2 + CE"
    Options = NSTOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.pairs = layer_pairs(student, teacher, options.student_layers, options.teacher_layers)
        self.teacher_needs = TeacherNeeds(tuple(t for _, t in self.pairs))  # served (cached) by the trainer

    def forward(self, step):
        x, y = step.x, step.y
        t_logits, t_feats = self.teacher_forward(step)
        logits, s_feats = run_with_taps(self.student, x, [s for s, _ in self.pairs])
        mmd = sum(nst_loss(s, t, self.options.degree, self.options.c) for s, t in zip(s_feats, t_feats))
        task, terms = task_loss(logits, y, t_logits, self.options.alpha, self.options.temperature)
        loss = task + self.options.weight / 2 * mmd
        return DistillOutput(loss, logits, {**terms, "mmd": mmd.detach()})
