"""Masked Layer Distillation (MLD: mask generation, masked local distillation, end-to-end KD).

Breakpoints pair a teacher module with a student module whose outputs are compared (default: `breakpoints=3`
of the paired stage boundaries, spread back from the deepest; `student_layers`/`teacher_layers` override). The
student between breakpoints i-1 and i is its group i; the teacher between the same breakpoints may hold several
blocks (the paper's ResNet34 -> ResNet18 mapping: 3/4/6/3 teacher blocks to 2/2/2/2 student blocks between the
stage ends). Adapters, for training only: a 1x1 conv (+ resize) from the teacher's breakpoint-i features to the
student's channels (group i+1's input) and one from the student's group-i output to the teacher's shape.

Phase `masks` (paper Eq. 4-5): teacher and the randomly initialised student (and adapters) frozen (the student's
BatchNorm normalising with batch statistics, its running ones being meaningless at initialisation). Student group
i runs on the teacher's input at its breakpoint, and its (adapted) output is injected into the teacher as noise:
x_t_i := x_t_i + (1 - M_i) * noise_i; the masks M_i (one value per channel and position of the teacher's
breakpoint feature, initialised to 0 = all the noise) minimise CE(teacher output, y) + alpha * sum_i ||M_i||_2. The
noise of every breakpoint is computed from the clean teacher features (with several breakpoints the paper's
formula leaves this open).
Phase `local` (Eq. 6): every group learns, in one pass, to reproduce the teacher's breakpoint-i output from the
teacher's breakpoint-(i-1) output (the image for group 1): sum_i mean |(1 - ReLU(M_i)) * (x_t_i - x_s_i)|
(a mean per breakpoint instead of the paper's sum, so breakpoints of different sizes weigh the same; M capped at
1 as well as at 0); masks and teacher frozen. `head_breakpoint=true` (default; ours) adds a breakpoint at the
logits: the student's last group and head, fed the (adapted) teacher output at the last breakpoint, learn the
teacher's logits (Hinton's KL at T, `temperature`), so the head is not left at its random initialisation until
the KD phase (the earlier benchmark's MLD trailed KD at equal epochs); `false` is the paper's local phase.
Phase `kd`: end-to-end fine-tuning of the whole student, `finetune=kd` (default): Hinton KD (T=4, alpha=0.9, the
`kd` defaults); `finetune=label_refinery`: Label Refinery (Bagherinezhad et al. 2018), the paper's main fine-tuning
method - the student matches the teacher's softmax on the same crop, KL at T=1, no ground-truth labels.

The masks are saved with the run's checkpoints; `write_artifacts` draws them (mean |M| over channels per
position, and per channel over positions) as masks.png in the run, like the paper's Figure 3.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekdError
from .features import StopForward, aligned_boundaries, modules_at, parse_layers, resize, run_with_taps, spread
from .losses import kd_loss
from .base import DistillOutput, MethodOptions
from .multiphase import MultiPhaseDistiller, parameters_by_stage, zero_logits
from .step import LOGITS, TeacherNeeds


@dataclass(frozen=True)
class MLDOptions(MethodOptions):
    breakpoints: int = 3
    student_layers: str = ""
    teacher_layers: str = ""
    mask_alpha: float = 0.01  # our choice: the paper gives no value
    mask_epochs: int = -1
    local_epochs: int = -1
    kd_epochs: int = -1
    finetune: str = "kd"  # kd | label_refinery
    head_breakpoint: bool = True  # the local phase also distils the logits through the student's last group + head
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self):
        if self.finetune not in ("kd", "label_refinery"):
            raise EdgekdError(f"mld finetune must be kd or label_refinery, got '{self.finetune}'")
        if self.breakpoints < 1 or self.mask_alpha < 0 or self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise EdgekdError("mld needs breakpoints >= 1, mask_alpha >= 0, temperature > 0 and alpha in [0, 1]")


def masked_l1(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean |(1 - ReLU(M)) * (x_t - x_s)| (Eq. 6 for one breakpoint, averaged over batch and elements); M is also
    capped at 1, so a mask value above 1 cannot turn into a negative weight that rewards moving away."""
    return ((1 - mask.clamp(0.0, 1.0)) * (teacher.float() - student.float())).abs().mean()


class MaskedLayerDistillation(MultiPhaseDistiller):
    name = "mld"
    description = "Masked Layer Distillation: noise-sensitivity masks, masked layer-wise L1 from teacher inputs, then KD"
    Options = MLDOptions
    requires_teacher = True
    final_phase = "kd"

    def __init__(self, student, teacher, options: MLDOptions):
        super().__init__(student, teacher, options)
        s_given, t_given = parse_layers(options.student_layers), parse_layers(options.teacher_layers)
        if bool(s_given) != bool(t_given) or len(s_given) != len(t_given):
            raise EdgekdError("mld: give student_layers and teacher_layers together, the same number of each")
        if s_given:
            pairs = list(zip(s_given, t_given))
        else:
            paired = aligned_boundaries(student, teacher)
            pairs = [paired[i] for i in spread(len(paired), options.breakpoints)]
        self.student_points = [s for s, _ in pairs]
        self.teacher_points = [t for _, t in pairs]
        size = getattr(student, "input_size", None) or 2 * student.feature_info[-1].reduction
        s_shapes, t_shapes = _shapes(student, self.student_points, size), _shapes(teacher, self.teacher_points, size)
        # masks: one value per channel and position of each teacher breakpoint feature; 0 = all the noise, so
        # training raises them exactly where the teacher is sensitive
        self.masks = nn.ParameterList(nn.Parameter(torch.zeros(c, h, w)) for c, h, w in t_shapes)
        self.to_teacher = nn.ModuleList(_adapter(s[0], t[0]) for s, t in zip(s_shapes, t_shapes))
        # group i+1 takes the teacher's breakpoint-i output; with the head breakpoint the group after the last too
        fed = s_shapes if options.head_breakpoint else s_shapes[:-1]
        self.to_student = nn.ModuleList(_adapter(t[0], s[0]) for s, t in zip(fed, t_shapes))
        self._s_shapes = [tuple(s) for s in s_shapes]

    # -- phases
    @classmethod
    def epoch_plan(cls, options, distiller=None):
        return [("masks", options.mask_epochs, 1.0), ("local", options.local_epochs, 2.0),
                ("kd", options.kd_epochs, 3.0)]

    def phase_parts(self):
        groups = parameters_by_stage(self.student, self.student_points)
        trained = groups if self.options.head_breakpoint else groups[:-1]
        adapters = list(self.to_teacher.parameters()) + list(self.to_student.parameters())
        local = [p for g in trained for p in g] + adapters
        return [("masks", list(self.masks.parameters()), False), ("local", local, False),
                ("kd", list(self.student.parameters()), True)]

    def phase_teacher_needs(self, phase):
        # the masks phase injects noise into the teacher (it runs it itself); the local phase's clean breakpoint
        # maps and the KD phase's logits are served, so cached
        return {"masks": None, "local": TeacherNeeds(tuple(self.teacher_points)), "kd": LOGITS}[phase]

    def forward_phase(self, phase, step):
        x, y = step.x, step.y
        if phase == "masks":
            return self._masks_loss(x, y)
        if phase == "local":
            return self._local_loss(step)
        teacher_logits, _ = self.teacher_forward(step, LOGITS)
        logits = self.student(x)
        if self.options.finetune == "label_refinery":
            refined = kd_loss(logits, teacher_logits, 1.0)
            return DistillOutput(refined, logits, {"refinery_kl": refined.detach()})
        soft = kd_loss(logits, teacher_logits, self.options.temperature)
        hard = F.cross_entropy(logits, y)
        return DistillOutput(self.options.alpha * soft + (1 - self.options.alpha) * hard, logits,
                             {"kd": soft.detach(), "ce": hard.detach()})

    # -- pieces
    @torch.no_grad()
    def teacher_features(self, x) -> list[torch.Tensor]:
        return run_with_taps(self.teacher, x, self.teacher_points)[1]

    def student_groups(self, x, teacher_feats: list[torch.Tensor],
                       through_head: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each student group's output when group i+1 is fed the (adapted) teacher output at breakpoint i, and
        with `through_head` the logits of the last group + head fed the teacher's last breakpoint output (else
        the head is not run: None)."""
        modules = modules_at(self.student, self.student_points)
        outputs: dict[int, torch.Tensor] = {}

        def hook(i):
            def replace(_m, _inp, out):
                outputs[i] = out
                if i == len(modules) - 1 and not through_head:
                    raise StopForward
                return resize(self.to_student[i](teacher_feats[i]), self._s_shapes[i][1:])
            return replace

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
        logits = None
        try:
            logits = self.student(x)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        adapted = [resize(self.to_teacher[i](outputs[i]), teacher_feats[i].shape[-2:]) for i in range(len(modules))]
        return adapted, logits

    def noised_teacher(self, x, noise: list[torch.Tensor]) -> torch.Tensor:
        """The teacher with x_t_i + (1 - M_i) * noise_i at every breakpoint (Eq. 4)."""
        modules = modules_at(self.teacher, self.teacher_points)

        def hook(i):
            def inject(_m, _inp, out):
                return out + (1 - self.masks[i]) * noise[i]
            return inject

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
        try:
            return self.teacher(x)
        finally:
            for h in handles:
                h.remove()

    def _masks_loss(self, x, y):
        feats = self.teacher_features(x)
        with torch.no_grad(), _batch_statistics(self.student):
            noise, _ = self.student_groups(x, feats)
        logits = self.noised_teacher(x, noise)
        ce = F.cross_entropy(logits, y)
        norm = sum(m.norm() for m in self.masks)
        loss = ce + self.options.mask_alpha * norm
        return DistillOutput(loss, zero_logits(x, self.student.num_classes),
                             {"teacher_ce": ce.detach(), "mask_norm": norm.detach()})

    def _local_loss(self, step):
        x, head = step.x, self.options.head_breakpoint
        stop = None if head else self.teacher_points[-1]  # the head breakpoint needs the teacher's logits
        teacher_logits, feats = self.teacher_forward(step, self.phase_teacher_needs("local"), stop_after=stop)
        student, logits = self.student_groups(x, feats, through_head=head)
        masks = [m.detach() for m in self.masks]
        l1 = sum(masked_l1(t, s, m) for t, s, m in zip(feats, student, masks))
        if not head:
            return DistillOutput(l1, zero_logits(x, self.student.num_classes), {"masked_l1": l1.detach()})
        head_kd = kd_loss(logits, teacher_logits, self.options.temperature)
        return DistillOutput(l1 + head_kd, zero_logits(x, self.student.num_classes),
                             {"masked_l1": l1.detach(), "head_kd": head_kd.detach()})

    # -- masks picture
    def write_artifacts(self, run_dir: Path) -> None:
        plot_masks([m.detach().cpu() for m in self.masks], self.teacher_points, Path(run_dir) / "masks.png")


@contextmanager
def _batch_statistics(model: nn.Module):
    """The frozen random student's BatchNorm layers normalise with the batch's statistics (running ones untouched):
    its running statistics are still the initial (0, 1), under which a badly initialised student (normal(1,1),
    constant) would produce overflowing noise instead of the activations it has when training starts."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum


def plot_masks(masks: list[torch.Tensor], names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(masks), figsize=(3.2 * len(masks), 5.6), squeeze=False)
    for i, (mask, name) in enumerate(zip(masks, names)):
        magnitude = mask.abs()
        im = axes[0][i].imshow(magnitude.mean(0).numpy(), cmap="viridis")
        axes[0][i].set_title(f"{name}\nmean |M| per position", fontsize=8)
        axes[0][i].axis("off")
        fig.colorbar(im, ax=axes[0][i], fraction=0.046)
        axes[1][i].bar(range(mask.shape[0]), magnitude.mean((1, 2)).numpy(), width=1.0)
        axes[1][i].set_title("mean |M| per channel", fontsize=8)
        axes[1][i].set_xlabel("channel", fontsize=7)
    fig.suptitle("MLD sensitivity masks (1 = no noise tolerated)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _adapter(cin: int, cout: int) -> nn.Module:
    return nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)


@torch.no_grad()
def _shapes(model: nn.Module, points: list[str], size: int) -> list[tuple[int, int, int]]:
    was = model.training
    model.eval()
    param = next(model.parameters())
    channels = getattr(model, "model_config", {}).get("in_chans", 3)
    try:
        _, feats = run_with_taps(model, torch.zeros(1, channels, size, size, device=param.device, dtype=param.dtype), points)
    finally:
        model.train(was)
    return [tuple(f.shape[1:]) for f in feats]
