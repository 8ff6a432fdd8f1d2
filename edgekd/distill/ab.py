"""Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons" (AAAI 2019).

AB transfers which neurons are on or off, not how strongly. With teacher pre-activation t and the student's
pre-activation s mapped by a connector (1x1 conv + BN) to the teacher's channels, the hinge-style
"alternative loss" (paper Eq. 4) is
    rho(t) * (mu - s)^2 [s < mu]  +  (1 - rho(t)) * (mu + s)^2 [s > -mu],   rho(t) = [t > 0],  margin mu = 1,
summed over neurons. As in the authors' code (bhheo/AB_distillation): layer l of L is weighted 2^(l-L) (the
deepest 1, halving towards the input), each sum is divided by the batch size, and the total is scaled by 3/1000.
Schedule (authors' code): phase "ab" trains the student up to its deepest tapped layer + connectors with the
AB loss only (an initialisation; not evaluated); phase "kd" trains the student with KD at T=3 and, as their
script does, the soft targets only (alpha=1). `init_epochs` (-1: a quarter of --epochs) is part of --epochs.

Where we tap (pre-activation responses, at four stage boundaries, features.layer_pairs):
- a ConvBNAct boundary (e.g. conv_head): the input of its activation, i.e. the BN output;
- a ResNet stage (layer1..4): the input of the last block's final ReLU, i.e. residual sum before ReLU;
- the ResNet stem `relu`: its input (bn1 output);
- an inverted-residual stage (blocks.N of MobileNet/EfficientNet/MCUNet): its output as is. These end in a
  linear bottleneck with no activation after it, so its sign is the closest thing to an activation boundary
  (RepDistiller does the same for MobileNetV2). MobileNetV3's hard-swish head is cut at the BN output too.
Paths given in student_layers / teacher_layers are tapped at their output, as given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EdgekdError
from .base import DistillOutput, MethodOptions
from .features import Adapter, Tap, check_task_options, layer_pairs, modules_at, parse_layers, probe, run_with_taps, task_loss
from .multiphase import MultiPhaseDistiller, parameters_by_stage, zero_logits
from .step import LOGITS, TeacherNeeds


@dataclass(frozen=True)
class ABOptions(MethodOptions):
    margin: float = 1.0
    init_epochs: int = -1  # -1: a quarter of --epochs; 0: no AB phase (plain KD)
    temperature: float = 3.0
    alpha: float = 1.0  # KD phase: weight of the soft targets (1 - alpha on CE)
    student_layers: str = ""
    teacher_layers: str = ""

    def __post_init__(self):
        check_task_options("ab", self.alpha, self.temperature)
        if self.margin < 0 or self.init_epochs < -1:
            raise EdgekdError(f"ab needs margin >= 0 and init_epochs >= -1, got margin={self.margin} init_epochs={self.init_epochs}")


def preactivation_tap(model: nn.Module, path: str) -> Tap:
    """Where the pre-activation response of a stage boundary can be read (see the module docstring)."""
    (module,) = modules_at(model, [path])
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return path, "input"
    act = getattr(module, "act", None)
    if isinstance(module, nn.Sequential) and hasattr(module, "bn") and act is not None and not isinstance(act, nn.Identity):
        return f"{path}.act", "input"
    if isinstance(module, nn.Sequential) and len(module) and isinstance(getattr(module[-1], "relu", None), nn.Module):
        return f"{path}.{len(module) - 1}.relu", "input"  # called last on the residual sum
    return path, "output"


def ab_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Alternative (hinge-style) loss of Eq. 4, summed over neurons and divided by the batch size.

    Both cases are one hinge: (s - mu)^2 [s < mu] = relu(mu - s)^2 and (s + mu)^2 [s > -mu] = relu(mu + s)^2,
    so with sign = -1 where the teacher's neuron is on and +1 where it is off, the loss is relu(mu + sign * s)^2:
    bitwise the same values and gradients as evaluating both branches and selecting (torch.where), in a third of
    the passes over the maps."""
    with torch.no_grad():
        sign = torch.where(teacher > 0, -1.0, 1.0)  # float32 whatever the teacher's dtype
    z = (student.float() * sign).add_(margin).relu_()  # * +-1 is exact; m + (-s) == m - s in IEEE arithmetic
    return z.pow(2).sum() / student.shape[0]


def boundary_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Share of neurons on the same side of the activation boundary (the paper's transfer loss, Eq. 3, as 1 - it)."""
    return ((student > 0) == (teacher > 0)).float().mean()


class ActivationBoundaries(MultiPhaseDistiller):
    name = "ab"
    description = "activation-boundary transfer (Heo et al.): hinge loss on pre-ReLU signs as init, then KD"
    final_phase = "kd"
    Options = ABOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        pairs = layer_pairs(student, teacher, options.student_layers, options.teacher_layers)
        s_given, t_given = parse_layers(options.student_layers), parse_layers(options.teacher_layers)
        self.student_taps = [(s, "output") if s_given else preactivation_tap(student, s) for s, _ in pairs]
        self.teacher_taps = [(t, "output") if t_given else preactivation_tap(teacher, t) for _, t in pairs]
        self.deepest = pairs[-1]
        s_shapes, t_shapes = probe(student, self.student_taps), probe(teacher, self.teacher_taps)
        self.connectors = nn.ModuleList(Adapter(s, t, always=True) for (s, _), (t, _) in zip(s_shapes, t_shapes))
        n = len(pairs)
        self.weights = [2.0 ** (i - n + 1) for i in range(n)]

    def phase_parts(self):
        init_part = parameters_by_stage(self.student, [self.deepest[0]])[0]
        return [("ab", init_part + list(self.connectors.parameters()), False),
                ("kd", list(self.student.parameters()), True)]

    @classmethod
    def epoch_plan(cls, options, distiller=None):
        return [("init_epochs", options.init_epochs, 1), ("kd", -1, 3)]

    def phase_teacher_needs(self, phase):
        # served, so cached: once the bank is filled the AB phase costs the student's forward only
        return LOGITS if phase == "kd" else TeacherNeeds(tuple(self.teacher_taps))

    def forward_phase(self, phase, step):
        x = step.x
        if phase == "ab":
            _, t_feats = self.teacher_forward(step, self.phase_teacher_needs("ab"), stop_after=self.deepest[1])
            _, s_feats = run_with_taps(self.student, x, self.student_taps, stop_after=self.deepest[0])
            mapped = [c(s, t.shape[-2:]) for c, s, t in zip(self.connectors, s_feats, t_feats)]
            total = sum(w * ab_loss(s, t, self.options.margin) for w, s, t in zip(self.weights, mapped, t_feats))
            loss = total * 3 / 1000
            agree = torch.stack([boundary_agreement(s.detach(), t) for s, t in zip(mapped, t_feats)]).mean()
            return DistillOutput(loss, zero_logits(x, self.student.num_classes), {"ab": loss.detach(), "agreement": agree})
        t_logits, _ = self.teacher_forward(step, LOGITS)
        logits = self.student(x)
        loss, terms = task_loss(logits, step.y, t_logits, self.options.alpha, self.options.temperature)
        return DistillOutput(loss, logits, terms)
