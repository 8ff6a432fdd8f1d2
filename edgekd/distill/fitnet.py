"""Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), with the paper's two-stage schedule.

Phase "hint" (Algorithm 1, line 4): a regressor on the student's guided layer is trained, together with the
student layers up to that layer and nothing else, to predict the teacher's hint layer: L_HT = ||u_h - r(v_g)||^2
(we average over elements). No labels; the classifier is not reached, so this phase is not evaluated.
Phase "kd" (line 6): the whole student is trained with Hinton KD (alpha*KD + (1-alpha)*CE, T=4, alpha=0.9,
the kd method's defaults; the paper anneals its KD weight, which we do not).
Layers: the paper takes the middle layer of each network as hint/guided layer; by default the middle of the
paired stage boundaries (reduction 8 for the zoo at its default stems, the SSKD paper's "28x28" choice on
ImageNet). The regressor is a 1x1 conv + BN (+ bilinear resize), where the paper uses a conv whose kernel
shrinks the spatial size; it is training-only. `hint_epochs` (-1: a quarter of --epochs) is part of --epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EdgekdError
from .base import DistillOutput, MethodOptions
from .features import Adapter, check_task_options, layer_pairs, probe, run_with_taps, task_loss
from .multiphase import MultiPhaseDistiller, parameters_by_stage, zero_logits
from .step import LOGITS, TeacherNeeds


@dataclass(frozen=True)
class FitNetOptions(MethodOptions):
    hint_epochs: int = -1  # -1: a quarter of --epochs; 0: no hint phase (plain KD)
    temperature: float = 4.0
    alpha: float = 0.9
    student_layers: str = ""  # the guided layer (one module path)
    teacher_layers: str = ""  # the hint layer (one module path)

    def __post_init__(self):
        check_task_options("fitnet", self.alpha, self.temperature)
        if self.hint_epochs < -1:
            raise EdgekdError(f"fitnet hint_epochs must be >= 0 (or -1 for a quarter of --epochs), got {self.hint_epochs}")


def hint_loss(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(regressed.float(), hint.float())


class FitNet(MultiPhaseDistiller):
    name = "fitnet"
    description = "FitNets hints: regress the teacher's middle layer (student up to guided layer), then KD"
    final_phase = "kd"
    Options = FitNetOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        pairs = layer_pairs(student, teacher, options.student_layers, options.teacher_layers, middle=True)
        if len(pairs) != 1:
            raise EdgekdError(f"fitnet uses one guided/hint layer pair, got {len(pairs)}: pass one path each")
        self.guided, self.hint = pairs[0]
        (s_ch, _), = probe(student, [self.guided])
        (t_ch, _), = probe(teacher, [self.hint])
        self.regressor = Adapter(s_ch, t_ch, always=True)

    def phase_parts(self):
        guided_part = parameters_by_stage(self.student, [self.guided])[0]
        return [("hint", guided_part + list(self.regressor.parameters()), False),
                ("kd", list(self.student.parameters()), True)]

    @classmethod
    def epoch_plan(cls, options, distiller=None):
        return [("hint_epochs", options.hint_epochs, 1), ("kd", -1, 3)]

    def phase_teacher_needs(self, phase):
        # served, so cached: once the bank is filled the hint phase costs the student's forward only
        return LOGITS if phase == "kd" else TeacherNeeds((self.hint,))

    def forward_phase(self, phase, step):
        x = step.x
        if phase == "hint":
            _, (hint,) = self.teacher_forward(step, TeacherNeeds((self.hint,)), stop_after=self.hint)
            _, (guided,) = run_with_taps(self.student, x, [self.guided], stop_after=self.guided)
            loss = hint_loss(self.regressor(guided, hint.shape[-2:]), hint)
            return DistillOutput(loss, zero_logits(x, self.student.num_classes), {"hint": loss.detach()})
        t_logits, _ = self.teacher_forward(step, LOGITS)
        logits = self.student(x)
        loss, terms = task_loss(logits, step.y, t_logits, self.options.alpha, self.options.temperature)
        return DistillOutput(loss, logits, terms)
