"""Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self
Distillation" (ICCV 2019). No teacher network: the student's deepest classifier teaches its shallow exits.

An exit follows each student stage but the last: a bottleneck (1x1 conv, stride-2 depthwise-separable convs
down to the final resolution, 1x1 conv to the final width, BN + ReLU each, like the authors' SepConv
bottlenecks) that maps the stage's features to the shape of the deepest feature map, then global pooling and
a fully connected classifier. Per exit i, with the deepest logits z_C and deepest features F_C (both fixed as
targets):
    (1 - alpha) * CE(y, z_i) + alpha * T^2 * KL(softmax(z_C/T) || softmax(z_i/T)) + beta * ||F_i - F_C||^2
and the deepest classifier gets (1 - alpha) * CE. Defaults T=3, alpha=0.1, beta=1e-6 are those of the
authors' code (luanyunteng/pytorch-be-your-own-teacher), whose feature term is a sum over batch and elements,
counted only where either map is positive; we keep that reduction so beta keeps its meaning.
Exits are the method's extra modules: trained and checkpointed, dropped at export (`student_for_export()` is
the plain student). Stages: four stage boundaries of the student (`student_layers` overrides; the last one
listed is the deepest feature F_C).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekdError
from .base import DistillOutput, Distiller, MethodOptions
from .features import parse_layers, probe, resize, run_with_taps, spread, stage_boundaries
from .losses import kd_loss


@dataclass(frozen=True)
class BYOTOptions(MethodOptions):
    temperature: float = 3.0
    alpha: float = 0.1
    beta: float = 1e-6
    student_layers: str = ""  # stage ends; an exit after each but the last (the deepest)

    def __post_init__(self):
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0 or self.beta < 0:
            raise EdgekdError(f"byot needs temperature > 0, alpha in [0, 1], beta >= 0 "
                              f"(got {self.temperature}, {self.alpha}, {self.beta})")


def _conv_bn_relu(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Exit(nn.Module):
    """Bottleneck to the deepest feature shape + classifier."""

    def __init__(self, in_channels: int, in_reduction: int, out_channels: int, out_reduction: int, num_classes: int):
        super().__init__()
        mid = max(in_channels, 8)
        layers = _conv_bn_relu(in_channels, mid)
        for _ in range(max(0, round(math.log2(max(out_reduction, 1) / max(in_reduction, 1))))):
            layers += _conv_bn_relu(mid, mid, 3, 2, groups=mid) + _conv_bn_relu(mid, mid)
        layers += _conv_bn_relu(mid, out_channels)
        self.bottleneck = nn.Sequential(*layers)
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, x: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
        features = resize(self.bottleneck(x), size)  # odd sizes: stride-2 rounding may leave one pixel over
        return features, self.fc(features.mean((2, 3)))


def byot_feature_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' hint loss: squared error where either map is positive, summed over batch and elements."""
    features, target = features.float(), target.float()
    return ((features - target).pow(2) * ((features > 0) | (target > 0))).sum()


class BeYourOwnTeacher(Distiller):
    name = "byot"
    description = "Be Your Own Teacher self-distillation: exits after each stage learn from the deepest (KL + L2)"
    Options = BYOTOptions
    requires_teacher = False

    def __init__(self, student, teacher, options):
        super().__init__(student, None, options)
        given = parse_layers(options.student_layers)
        if given:
            self.stages = given
        else:
            bounds = stage_boundaries(student)
            self.stages = [bounds[i] for i in spread(len(bounds), 4)]
        if len(self.stages) < 2:
            raise EdgekdError("byot needs at least two stages (exits after all but the deepest)")
        shapes = probe(student, self.stages)
        (c_out, r_out) = shapes[-1]
        self.exits = nn.ModuleList(Exit(c, r, c_out, r_out, student.num_classes) for c, r in shapes[:-1])

    def forward(self, step):
        x, y = step.x, step.y
        logits, feats = run_with_taps(self.student, x, self.stages)
        deepest, target = feats[-1], feats[-1].detach()
        soft_target = logits.detach()
        a, t = self.options.alpha, self.options.temperature
        ce_deep = F.cross_entropy(logits, y)
        ce_exits, kl, hint = [], [], []
        for exit_, f in zip(self.exits, feats[:-1]):
            f_i, z_i = exit_(f, deepest.shape[-2:])
            ce_exits.append(F.cross_entropy(z_i, y))
            kl.append(kd_loss(z_i, soft_target, t))
            hint.append(byot_feature_loss(f_i, target))
        ce_all, kl_all, hint_all = ce_deep + sum(ce_exits), sum(kl), sum(hint)
        loss = (1 - a) * ce_all + a * kl_all + self.options.beta * hint_all
        terms = {"ce": ce_deep.detach(), "exits_ce": (sum(ce_exits) / len(ce_exits)).detach(),
                 "kl": kl_all.detach(), "feature": hint_all.detach()}
        return DistillOutput(loss, logits, terms)
