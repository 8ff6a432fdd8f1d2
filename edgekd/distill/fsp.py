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


def _pooled_to(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """adaptive_max_pool2d(f, size), skipped when f already has that size (it would copy it) and as a plain
    max_pool2d when the sizes divide (the same windows, maxima and argmax, so the same gradient; faster)."""
    h, w = f.shape[-2:]
    if (h, w) == tuple(size):
        return f
    if h % size[0] == 0 and w % size[1] == 0:
        return F.max_pool2d(f, (h // size[0], w // size[1]))
    return F.adaptive_max_pool2d(f, size)


def _common_size(f1: torch.Tensor, f2: torch.Tensor) -> tuple[int, int]:
    return min(f1.shape[-2], f2.shape[-2]), min(f1.shape[-1], f2.shape[-1])


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """(B, C1, C2) Gram matrix between two layers, the larger map max-pooled to the smaller (paper, Sec. 4)."""
    f1, f2 = f1.float(), f2.float()
    if f1.shape[-2:] != f2.shape[-2:]:
        h = _common_size(f1, f2)
        f1, f2 = _pooled_to(f1, h), _pooled_to(f2, h)
    return f1.flatten(2) @ f2.flatten(2).transpose(1, 2) / (f1.shape[-2] * f1.shape[-1])


def fsp_distance(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """mean((G_s - G_t)^2) of two FSP matrices from their pooled maps (B, C1, n_s), (B, C2, n_s), (B, C1, n_t),
    (B, C2, n_t) (n = h w): what (fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean() computes, by the cheaper
    of two exact routes. The teacher's side carries no gradient.

    direct: G_t once, then G_s - G_t = baddbmm(-G_t, s1, s2^T / n_s): C1 C2 n work and a few passes over the
    (B, C1, C2) difference.
    kernel: with A = s1, B = s2, C = t1, D = t2 (per image), ||A B^T / n_s - C D^T / n_t||_F^2 =
    <A^T A, B^T B> / n_s^2 - 2 <A^T C, B^T D> / (n_s n_t) + <C^T C, D^T D> / n_t^2, from (n x n) kernels over
    the positions: (n_s + n_t)^2 (C1 + C2) work, never forming the C1 x C2 matrices. That wins when the maps are
    small and the channels many (the deepest pair: 2 x 2 maps, 1280 channels). It is a difference of near-equal
    terms when the student matches well, so it runs in float64, which makes it at least as accurate as the
    direct float32 route (the result is cast back to float32)."""
    b, c1, n_s = s1.shape
    c2, n_t = s2.shape[1], t1.shape[-1]
    if (n_s + n_t + 8) * c1 * c2 <= 2 * (n_s + n_t) ** 2 * (c1 + c2):
        with torch.no_grad():
            g_t = torch.bmm(t1, t2.transpose(1, 2)).div_(n_t)
        return torch.baddbmm(g_t, s1, s2.transpose(1, 2), beta=-1, alpha=1 / n_s).pow(2).mean()
    x = torch.cat([s1.double(), t1.double()], 2)  # (B, C1, n_s + n_t)
    y = torch.cat([s2.double(), t2.double()], 2)
    kx, ky = x.transpose(1, 2) @ x, y.transpose(1, 2) @ y  # (B, n_s + n_t, n_s + n_t)
    w = torch.full((n_s + n_t, n_s + n_t), -1 / (n_s * n_t), dtype=torch.float64, device=x.device)
    w[:n_s, :n_s], w[n_s:, n_s:] = 1 / n_s**2, 1 / n_t**2
    return ((kx * ky).sum(0).mul_(w).sum() / (b * c1 * c2)).float()


def _pooled_pairs(feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive layer pairs as (B, C, h w) maps, each pair max-pooled to its smaller spatial size."""
    pairs = []
    for f1, f2 in zip(feats, feats[1:]):
        h = _common_size(f1, f2)
        pairs.append((_pooled_to(f1.float(), h).flatten(2), _pooled_to(f2.float(), h).flatten(2)))
    return pairs


def fsp_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over consecutive layer pairs of mean((G_s - G_t)^2), G = fsp_matrix of the pair's two maps."""
    with full_precision(student_feats[0]):
        s_pairs = _pooled_pairs(student_feats)
        with torch.no_grad():
            t_pairs = _pooled_pairs(teacher_feats)
        losses = [fsp_distance(s1, s2, t1, t2) for (s1, s2), (t1, t2) in zip(s_pairs, t_pairs)]
    return sum(losses) / len(losses)


class FSP(MultiPhaseDistiller):
    name = "fsp"
    description = "FSP matrices (Yim et al.): match Gram matrices between consecutive stages, then train on labels"
    final_phase = "ce"
    teacher_free_phases = frozenset({"ce"})
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
