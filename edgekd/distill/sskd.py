"""Gao et al., "An Embarrassingly Simple Approach for Knowledge Distillation" (2019): stage-by-stage KD.

Both backbones are split at resolution boundaries into K stages (the paper recommends the down-sampling
points, 4 stages; `stages` picks K of the paired stage boundaries, spread back from the deepest, which is
always included, features.layer_pairs). Then:
- phase "stage{i}" (i = 1..K): only student stage i (the layers that run after boundary i-1 up to boundary i)
  and its adapter train, to make the student's boundary-i features equal the teacher's: L2, psi(a, b) =
  ||a - b||^2 (Eq. 6; we average over elements). Earlier stages are frozen, weights and BatchNorm statistics;
  later ones are not run. No labels are used, and these phases are not evaluated.
- phase "head": the backbone is frozen and the task head (what runs after the last boundary: the classifier,
  plus MobileNetV3's pre-classifier layer) trains with CE on the labels; the teacher is not used.
Adapters, training-only: a 1x1 conv when channel counts differ (the paper's "additional convolution layer
with 1x1 kernel"; `adapter_bn=true` adds BN as the other methods' adapters have), and a bilinear resize of
the student's map when spatial sizes differ.
Epochs: `stage_epochs` per stage and `head_epochs`, each -1 for an equal share of --epochs (the total).
Learning rate: the stage phases train at `stage_lr` (the paper's 0.01, SGD with the run's momentum) on
`stage_schedule` (`step`: x0.1 at 30/60/90% of each stage, the paper's ImageNet schedule of 60 epochs per
stage, decayed at 18/36/54; `cosine` as the run), without warm-up; `stage_lr=0` keeps the run's --lr. The head
phase uses the run's optimiser settings.

`sskd_multiloss` is the paper's "multi-loss training" baseline (Table 2): one phase "backbone" minimises the
sum of the K stage losses over the whole backbone at once, then the same "head" phase. Its backbone phase
gets the epochs SSKD spends on all its stages (K * stage_epochs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekdError
from .base import DistillOutput, MethodOptions
from .features import Adapter, aligned_boundaries, layer_pairs, parse_layers, probe, run_with_taps, spread
from .multiphase import MultiPhaseDistiller, parameters_by_stage, zero_logits
from .step import TeacherNeeds


@dataclass(frozen=True)
class SSKDOptions(MethodOptions):
    stages: int = 4  # K; at most the number of paired stage boundaries
    stage_epochs: int = -1  # per stage; -1: an equal share of --epochs
    head_epochs: int = -1  # -1: an equal share of --epochs
    adapter_bn: bool = False  # BN after the adapters' 1x1 conv (the paper has none)
    stage_lr: float = 0.01  # peak lr of the stage phases (the paper's); 0: the run's --lr
    stage_schedule: str = "step"  # step (the paper's x0.1 at 30/60/90%) | cosine
    student_layers: str = ""  # stage ends, in forward order (overrides `stages`)
    teacher_layers: str = ""

    def __post_init__(self):
        if self.stages < 1:
            raise EdgekdError(f"sskd stages must be >= 1, got {self.stages}")
        if self.stage_epochs < -1 or self.head_epochs < -1 or self.stage_epochs == 0 or self.head_epochs == 0:
            raise EdgekdError("sskd stage_epochs and head_epochs must be >= 1 (or -1 for an equal share of --epochs)")
        if self.stage_lr < 0 or self.stage_schedule not in ("step", "cosine"):
            raise EdgekdError(f"sskd needs stage_lr >= 0 (0: the run's --lr) and stage_schedule step or cosine, got "
                              f"{self.stage_lr} and '{self.stage_schedule}'")


def planned_stages(options: SSKDOptions) -> int:
    """K before the models are known: one per given layer, else `stages`."""
    given = parse_layers(options.student_layers) or parse_layers(options.teacher_layers)
    return len(given) if given else options.stages


def stage_loss(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(adapted.float(), teacher.float())


class StageByStageKD(MultiPhaseDistiller):
    name = "sskd"
    description = "stage-by-stage KD (Gao et al.): student stage i learns teacher stage i (L2, no labels), then head CE"
    final_phase = "head"
    teacher_free_phases = frozenset({"head"})
    Options = SSKDOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        if options.student_layers or options.teacher_layers:
            self.pairs = layer_pairs(student, teacher, options.student_layers, options.teacher_layers)
        else:
            available = aligned_boundaries(student, teacher)
            if options.stages > len(available):
                raise EdgekdError(f"{self.name}: stages={options.stages} but these models have {len(available)} "
                                  "paired stage boundaries; lower stages")
            self.pairs = [available[i] for i in spread(len(available), options.stages)]
        s_shapes = probe(student, [s for s, _ in self.pairs])
        t_shapes = probe(teacher, [t for _, t in self.pairs])
        # the paper's plain 1x1 conv by default: BN would normalise away the scale of the student's
        # features, which the frozen backbone hands to the head as they are
        self.adapters = nn.ModuleList(Adapter(s, t, bn=options.adapter_bn) for (s, _), (t, _) in zip(s_shapes, t_shapes))
        self._groups = parameters_by_stage(student, [s for s, _ in self.pairs])

    @property
    def num_stages(self) -> int:
        return len(self.pairs)

    def stage_parameters(self, i: int) -> list[nn.Parameter]:
        """Student parameters of stage i (0-based); i == num_stages is the head."""
        return list(self._groups[i])

    def phase_parts(self):
        parts = [(f"stage{i + 1}", self.stage_parameters(i) + list(self.adapters[i].parameters()), False)
                 for i in range(self.num_stages)]
        return parts + [("head", self.stage_parameters(self.num_stages), True)]

    @classmethod
    def epoch_plan(cls, options, distiller=None):
        k = distiller.num_stages if distiller is not None else planned_stages(options)
        return [(f"stage{i + 1}", options.stage_epochs, 1) for i in range(k)] + [("head", options.head_epochs, 1)]

    def phases(self, epochs, optim):
        """The backbone phases at the stage rate and schedule, the head phase with the run's settings."""
        if self.options.stage_lr == 0:
            return super().phases(epochs, optim)
        stage = dataclasses.replace(optim, lr=self.options.stage_lr, schedule=self.options.stage_schedule,
                                    warmup_epochs=0.0)
        return [p if p.name == "head" else dataclasses.replace(p, optim=stage) for p in super().phases(epochs, optim)]

    def stage_losses(self, step, upto: int, only: int | None = None) -> list[torch.Tensor]:
        """L2 losses of stages 0..upto (0-based): the student cut at boundary `upto`, the teacher's maps as the
        trainer served them (cached: every boundary in one row), else from a live forward cut there too."""
        idx = [only] if only is not None else list(range(upto + 1))
        if step.teacher_logits is not None:
            t_feats = [step.teacher_features[i] for i in idx]
        else:
            with torch.no_grad():
                _, t_feats = run_with_taps(self.teacher, step.x, [self.pairs[i][1] for i in idx],
                                           stop_after=self.pairs[upto][1])
        _, s_feats = run_with_taps(self.student, step.x, [self.pairs[i][0] for i in idx],
                                   stop_after=self.pairs[upto][0])
        return [stage_loss(self.adapters[i](s, t.shape[-2:]), t) for i, s, t in zip(idx, s_feats, t_feats)]

    def phase_teacher_needs(self, phase):
        # served, so cached: one row per (image, variant) holds every boundary's map, the first stage's epochs
        # fill it and every later stage reads it; the head phase trains on labels alone
        return None if phase == "head" else TeacherNeeds(tuple(t for _, t in self.pairs))

    def forward_phase(self, phase, step):
        x, y = step.x, step.y
        if phase == "head":
            logits = self.student(x)
            loss = F.cross_entropy(logits, y)
            return DistillOutput(loss, logits, {"ce": loss.detach()})
        i = int(phase.removeprefix("stage")) - 1
        (loss,) = self.stage_losses(step, i, only=i)
        return DistillOutput(loss, zero_logits(x, self.student.num_classes), {f"l2_stage{i + 1}": loss.detach()})


class SSKDMultiLoss(StageByStageKD):
    name = "sskd_multiloss"
    description = "SSKD's multi-loss baseline: all stage L2 losses summed over the whole backbone at once, then head CE"

    def phase_parts(self):
        backbone = [p for i in range(self.num_stages) for p in self.stage_parameters(i)]
        return [("backbone", backbone + list(self.adapters.parameters()), False),
                ("head", self.stage_parameters(self.num_stages), True)]

    @classmethod
    def epoch_plan(cls, options, distiller=None):
        k = distiller.num_stages if distiller is not None else planned_stages(options)
        backbone = k * options.stage_epochs if options.stage_epochs > 0 else -1
        return [("backbone", backbone, k), ("head", options.head_epochs, 1)]

    def forward_phase(self, phase, step):
        if phase == "head":
            return super().forward_phase(phase, step)
        x = step.x
        losses = self.stage_losses(step, self.num_stages - 1)
        loss = sum(losses)
        terms = {f"l2_stage{i + 1}": v.detach() for i, v in enumerate(losses)}
        return DistillOutput(loss, zero_logits(x, self.student.num_classes), terms)
