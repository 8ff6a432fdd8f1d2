"""Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning" (CVPR 2017): the "flow of solution procedure" (FSP) matrices.

For two feature maps F1 (C1, h, w) and F2 (C2, h, w) of one network, G = F1 F2^T / (h w) (C1 x C2). The paper
takes the first and last layer of each same-resolution section and max-pools the larger map when sizes
differ; we take consecutive stage boundaries (the output of section i-1 is the input of section i's first
layer, the output of section i its last), so four boundaries give the paper's three FSP matrices. The paper
requires equal channel counts; across zoo families a training-only 1x1 conv + BN maps each student boundary
to the teacher's channels when they differ. L_FSP = mean over matrices of ||G_s - G_t||^2 with equal
weights lambda_i; we average over the matrix elements rather than sum (RepDistiller does the same), a scale that
does not grow with channel counts.
Schedule (Algorithm 1): phase "fsp" trains the student up to its deepest boundary (+ adapters) with L_FSP
only (not evaluated); phase "ce" then trains the whole student on the labels. `init_epochs` (-1: a quarter of
--epochs) is part of --epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekdError
from .base import DistillOutput, MethodOptions
from .features import Adapter, full_precision, layer_pairs, probe, run_with_taps
from .multiphase import MultiPhaseDistiller, parameters_by_stage, zero_logits
from .step import TeacherNeeds


@dataclass(frozen=True)
class FSPOptions(MethodOptions):
    init_epochs: int = -1  # -1: a quarter of --epochs; 0: no FSP phase (plain CE)
    label_smoothing: float = 0.0
    student_layers: str = ""  # at least two boundaries; consecutive ones form the FSP matrices
    teacher_layers: str = ""

    def __post_init__(self):
        if self.init_epochs < -1:
            raise EdgekdError(f"fsp init_epochs must be >= 0 (or -1), got {self.init_epochs}")


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """(B, C1, C2) Gram matrix between two layers, the larger map max-pooled to the smaller (paper, Sec. 4)."""
    f1, f2 = f1.float(), f2.float()
    if f1.shape[-2:] != f2.shape[-2:]:
        h = min(f1.shape[-2], f2.shape[-2]), min(f1.shape[-1], f2.shape[-1])
        f1, f2 = F.adaptive_max_pool2d(f1, h), F.adaptive_max_pool2d(f2, h)
    return f1.flatten(2) @ f2.flatten(2).transpose(1, 2) / (f1.shape[-2] * f1.shape[-1])


def fsp_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    with full_precision(student_feats[0]):
        losses = [(fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean()
                  for s1, s2, t1, t2 in zip(student_feats, student_feats[1:], teacher_feats, teacher_feats[1:])]
    return sum(losses) / len(losses)


class FSP(MultiPhaseDistiller):
    name = "fsp"
    description = "FSP matrices (Yim et al.): match Gram matrices between consecutive stages, then train on labels"
    final_phase = "ce"
    Options = FSPOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.pairs = layer_pairs(student, teacher, options.student_layers, options.teacher_layers)
        if len(self.pairs) < 2:
            raise EdgekdError(f"fsp needs at least two layer pairs (an FSP matrix spans two layers), got {len(self.pairs)}")
        s_shapes = probe(student, [s for s, _ in self.pairs])
        t_shapes = probe(teacher, [t for _, t in self.pairs])
        self.adapters = nn.ModuleList(Adapter(s, t) for (s, _), (t, _) in zip(s_shapes, t_shapes))

    def phase_parts(self):
        init_part = parameters_by_stage(self.student, [self.pairs[-1][0]])[0]
        return [("fsp", init_part + list(self.adapters.parameters()), False),
                ("ce", list(self.student.parameters()), True)]

    @classmethod
    def epoch_plan(cls, options, distiller=None):
        return [("init_epochs", options.init_epochs, 1), ("ce", -1, 3)]

    def phase_teacher_needs(self, phase):
        # served, so cached: once the bank is filled the FSP phase costs the student's forward only; the CE
        # phase does not use the teacher
        return TeacherNeeds(tuple(t for _, t in self.pairs)) if phase == "fsp" else None

    def forward_phase(self, phase, step):
        x = step.x
        if phase == "fsp":
            _, t_feats = self.teacher_forward(step, self.phase_teacher_needs("fsp"), stop_after=self.pairs[-1][1])
            _, s_feats = run_with_taps(self.student, x, [s for s, _ in self.pairs], stop_after=self.pairs[-1][0])
            # the spatial size of the student's map does not enter the (C1 x C2) matrix: adapt channels only
            s_feats = [a(s, s.shape[-2:]) for a, s in zip(self.adapters, s_feats)]
            loss = fsp_loss(s_feats, t_feats)
            return DistillOutput(loss, zero_logits(x, self.student.num_classes), {"fsp": loss.detach()})
        logits = self.student(x)
        loss = F.cross_entropy(logits, step.y, label_smoothing=self.options.label_smoothing)
        return DistillOutput(loss, logits, {"ce": loss.detach()})
