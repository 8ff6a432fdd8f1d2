"""The Distiller contract every method implements.

A Distiller wraps a student and (optionally) a teacher. `forward(step)` (distill/step.py) returns the training
loss, the student logits and the named loss terms. The teacher is frozen and stays in eval mode whatever
`train()` is called with; features are tapped with forward hooks by module path (features.run_with_taps), so
zoo models are never edited. What the trainer serves from the teacher is declared in `teacher_needs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import EdgekdError
from ..validate import build
from .features import run_with_taps
from .phase import Phase
from .step import LOGITS, Step, TeacherNeeds


@dataclass
class DistillOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None  # the labels of `logits`' rows when the loss used only part of the batch


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass(frozen=True)
class MethodOptions:
    """Base for a method's options; subclasses are frozen dataclasses with typed defaults from the paper."""

    @classmethod
    def from_strings(cls, items: dict[str, Any], method: str = "") -> "MethodOptions":
        """Builds options from `key=value` strings (CLI) or typed values (YAML/API), strictly (validate.py);
        `method` names the method in errors."""
        return build(cls, items, context=method, noun="method option", parse_strings=True)


class Distiller(nn.Module):
    """Base class: subclasses set `name`, `Options`, `requires_teacher` and implement `forward`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires_teacher: ClassVar[bool] = True
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # what the trainer serves in each Step from the teacher (distill/step.py); None: nothing, the method runs
    # its teacher itself. A class constant where it does not depend on the models (LOGITS), else set in __init__
    teacher_needs: TeacherNeeds | None = None
    # True when forward uses step.mix for mixup/cutmix batches and its label term skips unlabeled images
    # (label -1, see distill/labels.py): the method can take --mixup/--cutmix and --unlabeled
    handles_mixed_labels: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None, options: MethodOptions):
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise EdgekdError(f"method '{self.name}' needs a teacher: pass --teacher MODEL_OR_CHECKPOINT")
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.options = options

    @property
    def uses_teacher(self) -> bool:
        """Whether training runs the teacher at all (a phase of a multi-phase method may train on labels alone)."""
        return self.teacher is not None

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def forward(self, step: Step) -> DistillOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def teacher_forward(self, step: Step, needs: TeacherNeeds | None = None,
                        stop_after: str | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The teacher's logits and feature maps at `needs.taps` (default: `teacher_needs`) for the step: the ones
        the trainer served, else a live forward. `stop_after` (a module path) ends a live forward there when the
        caller needs no logits (they are None then)."""
        if step.teacher_logits is not None:
            return step.teacher_logits, list(step.teacher_features)
        taps = (needs or self.teacher_needs or LOGITS).taps
        with torch.no_grad():
            return run_with_taps(self.teacher, step.x, taps, stop_after) if taps else (self.teacher(step.x), [])

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the method adds (adapters, heads); never exported."""
        owned = {id(p) for p in self.student.parameters()}
        if self.teacher is not None:
            owned |= {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if id(p) not in owned]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + self.extra_parameters()

    def extra_state(self) -> dict[str, torch.Tensor]:
        """State of the method's own modules (not student, not teacher), for checkpoints."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("student.", "teacher."))}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.extra_state()) - set(state)
        if missing:
            raise EdgekdError(f"checkpoint lacks method state {sorted(missing)[:3]}: it was written by another method")
        self.load_state_dict({**self.state_dict(), **state})

    @classmethod
    def check_epochs(cls, options: MethodOptions, epochs: int) -> None:
        """Raise EdgekdError if `epochs` cannot cover the method's phases; called before anything is trained."""

    def phases(self, epochs: int, optim) -> list:
        """The training phases of this method; single-phase methods train student + extras together."""
        return [Phase(self.name, epochs, self, self.trainable_parameters(), optim)]

    def student_for_export(self) -> nn.Module:
        """The plain zoo model to export: no exits, adapters or masks."""
        return self.student

    def after_step(self, step: Step, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Called by the trainer after each optimizer step with the whole step (this rank's part of the batch), for
        methods with an optimisation of their own (a meta step); returns values to log. Must act the same on
        every rank."""
        return {}

    def write_artifacts(self, run_dir) -> None:
        """Called once after training (main process): files a method adds to the run (e.g. a plot)."""

    def extra_eval_models(self) -> dict[str, nn.Module]:
        """Extra models the run reports test accuracy for at the end (e.g. an ensemble of exits), by name."""
        return {}

    def on_epoch_start(self, epoch: int, epochs: int, optimizer: torch.optim.Optimizer,
                       steps_per_epoch: int = 0) -> None:
        """Called by the trainer before each epoch of a phase (also the epoch a resumed run continues); for
        methods with epoch-level schedules. Must act the same on every DDP rank."""


class LogitDistiller(Distiller):
    """A method that needs nothing from the teacher but its logits on the student's own view (KD and its
    relatives): the trainer serves them (cached, or from the fast runner at the teacher's resolution), and the
    label term skips unlabeled images and mixes labels of mixed ones. Subclasses implement `loss`."""

    teacher_needs = LOGITS
    handles_mixed_labels = True

    def forward(self, step):
        teacher_logits, _ = self.teacher_forward(step)
        logits = self.student(step.x)
        loss, terms = self.loss(logits, teacher_logits, step.y, step.mix)
        return DistillOutput(loss, logits, {name: value.detach() for name, value in terms.items()})

    def loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
             mix: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(training loss, named terms) of the student's logits against the teacher's."""
        raise NotImplementedError
