"""Support for methods whose training is a sequence of phases with different losses (FitNets, AB, FSP, SSKD,
MLD, DistPro).

The trainer runs each Phase's distiller. A multi-phase method hands it a `PhaseView` per phase: a Distiller
that shares (not copies) the method's student, teacher and extra modules, computes that phase's loss, declares
what that phase needs from the teacher (`phase_teacher_needs`: a KD phase takes the served, cached logits like
KD does), and keeps the frozen part of the student in eval mode, so frozen BatchNorm layers keep their running
statistics as well as their weights. Checkpoints are unaffected: a view has the same module names as its method.

`--epochs` is always the total over a method's phases; `split_epochs` shares it out.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from ..errors import EdgekdError
from .base import DistillOutput, Distiller
from .phase import Phase
from .step import Step, TeacherNeeds


def split_epochs(method: str, total: int, plan: Sequence[tuple[str, int, float]]) -> list[int]:
    """Epochs per phase. `plan` rows are (phase name, fixed epochs or -1 for a share, weight of the share).

    Fixed values are used as given (0 drops the phase); the rest of `total` is shared by weight, at least 1 each.
    """
    fixed = sum(e for _, e, _ in plan if e >= 0)
    auto = [i for i, (_, e, _) in enumerate(plan) if e < 0]
    names = ", ".join(f"{n}={e if e >= 0 else 'auto'}" for n, e, _ in plan)
    if not auto:
        if fixed != total:
            raise EdgekdError(f"{method}: phase epochs ({names}) add up to {fixed} but --epochs is {total}: "
                              "make them agree or leave one unset (-1) to take the rest")
        return [e for _, e, _ in plan]
    left = total - fixed
    if left < len(auto):
        raise EdgekdError(f"{method} needs --epochs >= {fixed + len(auto)} for its phases ({names}); got {total}")
    weights = [plan[i][2] for i in auto]
    exact = [left * w / sum(weights) for w in weights]
    share = [max(1, int(v)) for v in exact]
    # hand out (or take back) the rounding difference by largest remainder, deterministically
    order = sorted(range(len(auto)), key=lambda j: (-(exact[j] - int(exact[j])), -j))
    while sum(share) < left:
        share[order[0]] += 1
        order = order[1:] + order[:1]
    while sum(share) > left:
        j = max((j for j in range(len(share)) if share[j] > 1), key=lambda j: share[j] - exact[j])
        share[j] -= 1
    out = [e for _, e, _ in plan]
    for i, s in zip(auto, share):
        out[i] = s
    return out


def parameters_by_stage(model: nn.Module, boundaries: Sequence[str]) -> list[list[nn.Parameter]]:
    """The model's parameters grouped by where they run: group i holds those used after boundary i-1 up to
    boundary i (module paths, forward order); the last group holds those used after the last boundary (the
    head). Found from one forward in execution order, so it holds for any architecture."""
    from .features import blank_forward, modules_at

    bounds = modules_at(model, boundaries)
    stage_of_boundary = {id(m): i + 1 for i, m in enumerate(bounds)}
    stage = [0]
    owner: dict[int, int] = {}
    handles = []

    def hook(module, _inp, _out):
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), stage[0])
        if id(module) in stage_of_boundary:
            stage[0] = max(stage[0], stage_of_boundary[id(module)])

    for m in model.modules():
        if id(m) in stage_of_boundary or any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(hook))
    try:
        blank_forward(model)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[nn.Parameter]] = [[] for _ in range(len(bounds) + 1)]
    for p in model.parameters():
        groups[owner.get(id(p), len(bounds))].append(p)  # never used in forward: counts as head
    return groups


class PhaseView(Distiller):
    """One phase of a MultiPhaseDistiller: shares its modules, runs `parent.forward_phase(name, ...)`."""

    def __init__(self, parent: "MultiPhaseDistiller", phase: str, trainable: Sequence[nn.Parameter]):
        nn.Module.__init__(self)  # the parent already checked and froze the teacher
        self.__dict__["_parent"] = parent  # not a child module: its modules are registered below, once
        for name, module in parent.named_children():
            self.add_module(name, module)
        self.options = parent.options
        self.phase = phase
        self._trainable = {id(p) for p in trainable}

    @property
    def teacher_needs(self) -> TeacherNeeds | None:
        return self._parent.phase_teacher_needs(self.phase)

    @property
    def uses_teacher(self) -> bool:
        return self.phase not in self._parent.teacher_free_phases

    def _apply(self, fn, recurse=True):
        # .to(device) / .half() reach the shared children through this view; the parent's own parameters and
        # buffers (DistPro's alpha logits, say) are not among them and must move too
        super()._apply(fn, recurse)
        self._parent._apply(fn, recurse=False)
        return self

    # checkpoints hold the whole method's state (its own parameters and buffers and any optimizer of its own)
    def extra_state(self) -> dict[str, torch.Tensor]:
        return self._parent.extra_state()

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self._parent.load_extra_state(state)

    def forward(self, step):
        return self._parent.forward_phase(self.phase, step)

    def on_epoch_start(self, epoch, epochs, optimizer, steps_per_epoch: int = 0) -> None:
        self._parent.on_phase_epoch_start(self.phase, epoch, epochs, optimizer, steps_per_epoch)

    def after_step(self, step, optimizer) -> dict[str, float]:
        return self._parent.after_phase_step(self.phase, step, optimizer)

    def train(self, mode: bool = True) -> "PhaseView":
        super().train(mode)
        if mode:
            # frozen layers keep their BatchNorm statistics too, not only their weights
            for m in self.modules():
                own = list(m.parameters(recurse=False))
                if own and not any(id(p) in self._trainable for p in own):
                    m.eval()
        return self

    def student_for_export(self) -> nn.Module:
        return self._parent.student_for_export()


class MultiPhaseDistiller(Distiller):
    """Base of methods trained in several phases. Subclasses implement `phase_parts`, `epoch_plan` and
    `forward_phase`, name their last phase in `final_phase` (`forward(step)` outside the trainer computes that
    phase's loss) and declare what each phase wants served from the teacher in `phase_teacher_needs`."""

    final_phase: ClassVar[str] = ""
    teacher_free_phases: ClassVar[frozenset[str]] = frozenset()  # phases that train without the teacher at all

    def phase_parts(self) -> list[tuple[str, list[nn.Parameter], bool]]:
        """(name, trainable parameters, evaluate) of each phase, in order."""
        raise NotImplementedError

    @classmethod
    def epoch_plan(cls, options, distiller: "MultiPhaseDistiller | None" = None) -> list[tuple[str, int, float]]:
        """split_epochs rows, one per phase, from the options (and the built distiller when there is one)."""
        raise NotImplementedError

    def phase_epochs(self, epochs: int) -> list[int]:
        """Epochs of each phase out of the total `epochs`; a phase with 0 is skipped."""
        return split_epochs(self.name, epochs, self.epoch_plan(self.options, self))

    @classmethod
    def check_epochs(cls, options, epochs: int) -> None:
        split_epochs(cls.name, epochs, cls.epoch_plan(options))

    def forward_phase(self, phase: str, step: Step) -> DistillOutput:
        raise NotImplementedError

    def phase_teacher_needs(self, phase: str) -> TeacherNeeds | None:
        """The `teacher_needs` of one phase (default: nothing served, the phase runs the teacher itself)."""
        return None

    def forward(self, step):
        return self.forward_phase(self.final_phase, step)

    def on_phase_epoch_start(self, phase: str, epoch: int, epochs: int, optimizer, steps_per_epoch: int = 0) -> None:
        """on_epoch_start for one phase (default: nothing)."""

    def after_phase_step(self, phase: str, step: Step, optimizer) -> dict[str, float]:
        """after_step for one phase (default: nothing)."""
        return {}

    def phases(self, epochs: int, optim) -> list:
        return [Phase(name, n, PhaseView(self, name, trainable), trainable, optim, evaluate=evaluate)
                for (name, trainable, evaluate), n in zip(self.phase_parts(), self.phase_epochs(epochs)) if n > 0]


def zero_logits(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits for phases that never reach the classifier: the trainer counts accuracy, which means nothing there."""
    return torch.zeros(x.shape[0], num_classes, device=x.device)
