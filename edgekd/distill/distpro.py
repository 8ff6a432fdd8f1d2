"""DistPro (Deng et al., "DistPro: Searching a Fast Knowledge Distillation Process via Meta Optimization", ECCV 2022).

Pathways: every chosen teacher feature map (the stage boundaries, `stages=3` of them by default) to every chosen
student feature map, each through N candidate transform blocks (`transforms`: `conv1x1` = 1x1 conv + BN;
`conv3x3` = 3x3 conv + BN + ReLU + 1x1 conv + BN; `attention` = the paper's self-attention block - a conv makes a
1-channel sigmoid map that multiplies the features - then 1x1 conv + BN) and a bilinear resize to the teacher's map
(the paper's "convolution layers and an interpolation layer", order unstated: `transform_at=smaller`, the default,
runs the transform at the smaller of the two maps - the resize first when the teacher's map is smaller - so a
pathway from a 16 x 16 student map into a 2 x 2, 1,280-channel teacher map costs 64x less; `transform_at=student`
transforms at the student's size, then resizes. For a 1x1 conv the two orders agree exactly but for BatchNorm's
batch statistics), and a distance
(`distance`: `l2` mean squared error, `l1`, or `hcl`, ReviewKD's hierarchical context loss that the
paper follows: MSE at full size and after adaptive average pooling to 4, 2 and 1, weights 1, 1/2, 1/4, 1/8
normalised). 3 x 3 x 3 = 27 pathways with the defaults, like the paper.

Weights (Eq. 2): alpha = exp(a~) / (sum exp(a~) + exp(g)), the biased softmax with g = 1; a~ starts at 1.
Loss: CE(student, y) + sum over pathways alpha_p * distance_p.

Phase `search` (Algorithm 1, Eq. 4-5): the training images are split 80/20 by dataset index (`val_fraction`);
the student and transforms train on the 80%; after every step the pathway logits a~ take one Adam step
(`alpha_lr=0.05`) down the DARTS finite-difference estimate of the meta-gradient
-xi (grad_a L_train(theta+) - grad_a L_train(theta-)) / 2 eps, theta+- = theta +- eps grad_theta L_val(theta'),
theta' = theta - xi grad_theta L_train (xi = the current learning rate; eps = 0.01 / ||grad L_val||), with L_val the
CE on a batch of the 20%. The weights of every step are recorded: that is the process.
Phase `retrain`: the student and transforms restart from their initial weights and train on all images while
the recorded process, linearly interpolated to the retrain length (exact at both ends), sets the weights; a
pathway whose a~ <= `clip` (0.5, the paper's tau) is skipped, not computed.
`process=FILE` replays a saved process (the paper's transfer across datasets and networks) without searching;
`schedule=equal` (every pathway 1/P, the paper's "equally weighted") and `schedule=final` (the last searched
weights at every step, "use alpha_T") are the paper's baselines. The run writes process.json and process.png
(weights per pathway over the steps, like the paper's Fig. 6).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import EdgekdError
from .base import DistillOutput, MethodOptions
from .features import functional_run_with_taps, parse_layers, probe, resize, run_with_taps, spread, stage_boundaries
from .multiphase import MultiPhaseDistiller
from .step import TeacherNeeds

TRANSFORMS = ("conv1x1", "conv3x3", "attention")
DISTANCES = ("l2", "l1", "hcl")
SCHEDULES = ("process", "equal", "final")
TRANSFORM_AT = ("smaller", "student")
G_BIAS = 1.0


@dataclass(frozen=True)
class DistProOptions(MethodOptions):
    stages: int = 3
    student_layers: str = ""
    teacher_layers: str = ""
    transforms: str = "conv1x1,conv3x3,attention"
    distance: str = "hcl"
    alpha_lr: float = 0.05
    val_fraction: float = 0.2
    clip: float = 0.5
    search_epochs: int = -1
    retrain_epochs: int = -1
    schedule: str = "process"
    process: str = ""  # a saved process.json to replay (no search)
    transform_at: str = "smaller"

    def __post_init__(self):
        names = [t.strip() for t in self.transforms.split(",") if t.strip()]
        if not names or any(t not in TRANSFORMS for t in names):
            raise EdgekdError(f"distpro transforms must be some of {', '.join(TRANSFORMS)}, got '{self.transforms}'")
        if self.distance not in DISTANCES or self.schedule not in SCHEDULES:
            raise EdgekdError(f"distpro distance must be one of {', '.join(DISTANCES)} and schedule one of "
                              f"{', '.join(SCHEDULES)}")
        if self.transform_at not in TRANSFORM_AT:
            raise EdgekdError(f"distpro transform_at must be one of {', '.join(TRANSFORM_AT)}, "
                              f"got '{self.transform_at}'")
        if not 0 < self.val_fraction < 1 or self.alpha_lr <= 0 or self.stages < 1:
            raise EdgekdError("distpro needs 0 < val_fraction < 1, alpha_lr > 0 and stages >= 1")


def biased_softmax(logits: torch.Tensor, g: float = G_BIAS) -> torch.Tensor:
    """exp(a) / (sum exp(a) + exp(g)) (Eq. 2): the weights sum to less than one, the rest is the bias term."""
    full = torch.softmax(torch.cat([logits, logits.new_tensor([g])]), 0)
    return full[:-1]


def interpolate_process(process: torch.Tensor, steps: int) -> torch.Tensor:
    """(S, P) recorded weights -> (steps, P), linear in time, equal to the record at the first and last step."""
    s = process.shape[0]
    if s == 1 or steps == 1:
        return process[:1].expand(steps, -1).clone() if steps > 1 else process[-1:].clone()
    position = torch.linspace(0, s - 1, steps, dtype=torch.float64, device=process.device)
    lo = position.floor().long().clamp(max=s - 2)
    frac = (position - lo).to(process.dtype).unsqueeze(1)
    return process[lo] * (1 - frac) + process[lo + 1] * frac


def hcl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hierarchical context loss: MSE at full size and pooled to 4, 2, 1, weights halving."""
    loss, total, weight = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[-1]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


class _Attention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.map = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.map(x))


def _transform(kind: str, cin: int, cout: int) -> nn.Module:
    if kind == "conv1x1":
        return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    if kind == "conv3x3":
        return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                             nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(_Attention(cin), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class DistPro(MultiPhaseDistiller):
    name = "distpro"
    description = "DistPro: a searched per-step weighting of many teacher->student feature pathways"
    Options = DistProOptions
    requires_teacher = True
    final_phase = "retrain"

    def __init__(self, student, teacher, options: DistProOptions):
        super().__init__(student, teacher, options)
        s_given, t_given = parse_layers(options.student_layers), parse_layers(options.teacher_layers)
        s_bounds = s_given or stage_boundaries(student)
        t_bounds = t_given or stage_boundaries(teacher)
        self.student_points = s_given or [s_bounds[i] for i in spread(len(s_bounds), options.stages)]
        self.teacher_points = t_given or [t_bounds[i] for i in spread(len(t_bounds), options.stages)]
        s_shapes, t_shapes = probe(student, self.student_points), probe(teacher, self.teacher_points)
        kinds = [t.strip() for t in options.transforms.split(",") if t.strip()]
        self.pathways = [(i, j, k) for i in range(len(t_shapes)) for j in range(len(s_shapes)) for k in kinds]
        self.transforms = nn.ModuleList(_transform(k, s_shapes[j][0], t_shapes[i][0]) for i, j, k in self.pathways)
        self.alpha_logits = nn.Parameter(torch.ones(len(self.pathways)))  # a~_0 = 1 (paper)
        self.alpha_optimizer = torch.optim.Adam([self.alpha_logits], lr=options.alpha_lr, betas=(0.5, 0.999))
        self.register_buffer("process", torch.zeros(0, len(self.pathways)))  # recorded a~ per search step
        self.register_buffer("retrain_started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("retrain_step", torch.zeros((), dtype=torch.long))
        self._initial = {k: v.detach().clone() for k, v in self._trainable_state().items()}
        self._retrain_steps = 0
        if options.process:
            self.load_process(Path(options.process))

    # -- phases
    @classmethod
    def epoch_plan(cls, options, distiller=None):
        if options.process or options.schedule == "equal":
            return [("search", 0, 1.0), ("retrain", options.retrain_epochs, 1.0)]
        return [("search", options.search_epochs, 1.0), ("retrain", options.retrain_epochs, 3.0)]

    def phase_parts(self):
        trainable = list(self.student.parameters()) + list(self.transforms.parameters())
        return [("search", trainable, False), ("retrain", list(trainable), True)]

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {**{f"student.{k}": v for k, v in self.student.state_dict().items()},
                **{f"transforms.{k}": v for k, v in self.transforms.state_dict().items()}}

    def phases(self, epochs, optim):
        phases = super().phases(epochs, optim)
        retrain = next(p for p in phases if p.name == "retrain")
        self._retrain_epochs = retrain.epochs
        return phases

    # -- the loss
    def weights(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        return biased_softmax(self.alpha_logits if logits is None else logits)

    def pathway_losses(self, s_feats, t_feats, active: list[int] | None = None) -> dict[int, torch.Tensor]:
        transforms = self.transforms
        shrunk = {}  # (student map, size) -> resized once for the pathways that share it
        out = {}
        for p in active if active is not None else range(len(self.pathways)):
            i, j, _ = self.pathways[p]
            size = tuple(t_feats[i].shape[-2:])
            student_size = s_feats[j].shape[-2:]
            if self.options.transform_at == "smaller" and size[0] * size[1] < student_size[0] * student_size[1]:
                if (j, size) not in shrunk:
                    shrunk[j, size] = resize(s_feats[j], size)
                mapped = transforms[p](shrunk[j, size])
            else:
                mapped = resize(transforms[p](s_feats[j]), size)
            target = t_feats[i].float()
            mapped = mapped.float()
            if self.options.distance == "l2":
                out[p] = F.mse_loss(mapped, target)
            elif self.options.distance == "l1":
                out[p] = F.l1_loss(mapped, target)
            else:
                out[p] = hcl(mapped, target)
        return out

    @torch.no_grad()
    def teacher_features(self, x) -> list[torch.Tensor]:
        return run_with_taps(self.teacher, x, self.teacher_points)[1]

    def _features(self, x, params: dict | None = None, t_feats: list[torch.Tensor] | None = None):
        if t_feats is None:
            t_feats = self.teacher_features(x)
        if params is None:
            logits, s_feats = run_with_taps(self.student, x, self.student_points)
        else:
            logits, s_feats = functional_run_with_taps(self.student, params, x, self.student_points)
        return logits, s_feats, t_feats

    def train_loss(self, x, y, weights: torch.Tensor, active=None, params=None, t_feats=None):
        logits, s_feats, t_feats = self._features(x, params, t_feats)
        losses = self.pathway_losses(s_feats, t_feats, active)
        ce = F.cross_entropy(logits, y)
        distill = sum((weights[p] * loss for p, loss in losses.items()), torch.zeros((), device=x.device))
        return ce + distill, logits, ce, distill, len(losses)

    def phase_teacher_needs(self, phase):
        # served, so cached: both phases tap the same maps of the same images; the search's train and validation
        # parts are rows of the one batch
        return TeacherNeeds(tuple(self.teacher_points))

    @staticmethod
    def _served(step, rows: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """The teacher's maps the trainer served for the step (of `rows` only), None when it served none."""
        if step.teacher_logits is None:
            return None
        return [f if rows is None else f[rows] for f in step.teacher_features]

    def _split(self, index: torch.Tensor) -> torch.Tensor:
        """True for the images of the validation part (a fixed, index-determined val_fraction of the data)."""
        # Knuth multiplicative hash: an even spread over any index range, the same in every run and on every rank
        return ((index.long() * 2654435761) % 1000) < int(self.options.val_fraction * 1000)

    def forward_phase(self, phase, step):
        x, y = step.x, step.y
        if phase == "search":
            keep = ~self._split(step.index) if step.index is not None else torch.ones_like(y, dtype=torch.bool)
            if keep.sum() == 0:
                keep[:] = True
            x, y = x[keep], y[keep]
            loss, logits, ce, distill, n = self.train_loss(x, y, self.weights().detach(),
                                                           t_feats=self._served(step, keep))
            return DistillOutput(loss, logits, {"ce": ce.detach(), "distill": distill.detach(),
                                                "pathways": torch.tensor(float(n))}, labels=y)
        weights, active = self.retrain_weights()
        loss, logits, ce, distill, n = self.train_loss(x, y, weights, active, t_feats=self._served(step))
        return DistillOutput(loss, logits, {"ce": ce.detach(), "distill": distill.detach(), "pathways": torch.tensor(float(n))})

    # -- the process
    def retrain_weights(self) -> tuple[torch.Tensor, list[int]]:
        """Weights and the pathways computed at the current retrain step."""
        n = len(self.pathways)
        if self.options.schedule == "equal":
            return torch.full((n,), 1.0 / n, device=self.alpha_logits.device), list(range(n))
        if self.process.shape[0] == 0:
            raise EdgekdError("distpro: no process to replay - run the search phase or pass process=FILE")
        if self.options.schedule == "final":
            logits = self.process[-1]
        else:
            total = max(self._retrain_steps, 1)
            step = min(int(self.retrain_step), total - 1)
            logits = interpolate_process(self.process, total)[step]
        active = [p for p in range(n) if float(logits[p]) > self.options.clip]
        return biased_softmax(logits).to(self.alpha_logits.device), active

    def on_phase_epoch_start(self, phase, epoch, epochs, optimizer, steps_per_epoch: int = 0) -> None:
        if phase != "retrain":
            return
        if not bool(self.retrain_started):  # retrain starts from the initial weights (not the searched ones)
            with torch.no_grad():
                current = self._trainable_state()
                for k, v in self._initial.items():
                    current[k].copy_(v)
            self.retrain_started.fill_(True)
        self._retrain_steps = epochs * max(steps_per_epoch, 1)

    def after_phase_step(self, phase, step, optimizer) -> dict[str, float]:
        if phase == "retrain":
            self.retrain_step += 1
            return {}
        if step.index is None:
            return {}
        x, y = step.x, step.y
        val = self._split(step.index)
        if val.sum() == 0 or (~val).sum() == 0:
            self._record()
            return {}
        lr = optimizer.param_groups[0]["lr"]
        with torch.autocast(x.device.type, enabled=False):
            grad = self.alpha_gradient(x[~val].float(), y[~val], x[val].float(), y[val], lr,
                                       t_feats=self._served(step, ~val))
        from ..distributed import average_gradients

        average_gradients([grad])
        self.alpha_optimizer.zero_grad(set_to_none=True)
        self.alpha_logits.grad = grad
        self.alpha_optimizer.step()
        self._record()
        return {"alpha_grad_norm": float(grad.norm())}

    def _record(self) -> None:
        self.process = torch.cat([self.process, self.alpha_logits.detach().unsqueeze(0)])

    def alpha_gradient(self, x_train, y_train, x_val, y_val, lr: float, exact: bool = False,
                       eps_scale: float = 0.01, t_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """d L_val(theta - lr grad L_train(theta, alpha)) / d a~ : finite differences (Eq. 5) or, with `exact`, autograd's
        second-order derivative (for checking)."""
        names = [n for n, _ in self.student.named_parameters()]
        params = dict(self.student.named_parameters())
        buffers = {n: b.detach().clone() for n, b in self.student.named_buffers()}
        if t_feats is None:  # the same maps for the virtual step and both finite-difference sides
            t_feats = self.teacher_features(x_train)
        logits_a = self.alpha_logits.detach().clone().requires_grad_(True)
        loss, *_ = self.train_loss(x_train, y_train, biased_softmax(logits_a), params={**params, **buffers},
                                   t_feats=t_feats)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=exact)
        stepped = {n: params[n] - lr * g for n, g in zip(names, grads)}
        if not exact:
            stepped = {n: v.detach().requires_grad_(True) for n, v in stepped.items()}
        buffers = {n: b.detach().clone() for n, b in self.student.named_buffers()}
        val_loss = F.cross_entropy(functional_call(self.student, {**stepped, **buffers}, (x_val,)), y_val)
        if exact:
            return torch.autograd.grad(val_loss, logits_a)[0]
        g_val = torch.autograd.grad(val_loss, [stepped[n] for n in names])
        eps = eps_scale / (torch.sqrt(sum((g * g).sum() for g in g_val)) + 1e-12)  # DARTS' step: 0.01 / ||g||
        sided = []
        for sign in (1.0, -1.0):
            moved = {n: (params[n] + sign * eps * g).detach() for n, g in zip(names, g_val)}
            buffers = {n: b.detach().clone() for n, b in self.student.named_buffers()}
            a = self.alpha_logits.detach().clone().requires_grad_(True)
            loss, *_ = self.train_loss(x_train, y_train, biased_softmax(a), params={**moved, **buffers},
                                       t_feats=t_feats)
            sided.append(torch.autograd.grad(loss, a)[0])
        return -lr * (sided[0] - sided[1]) / (2 * eps)

    # -- checkpoints: the growing process and Adam's state
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        for key, value in self.alpha_optimizer.state.get(self.alpha_logits, {}).items():
            state[f"alpha_optimizer.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        optimizer_state = {k: v for k, v in state.items() if k.startswith("alpha_optimizer.")}
        if "process" in state:
            self.process = state["process"].clone().to(self.process.device)
        super().load_extra_state({k: v for k, v in state.items() if k not in optimizer_state})
        for key, value in optimizer_state.items():
            self.alpha_optimizer.state[self.alpha_logits][key.split(".", 1)[1]] = value.to(self.alpha_logits.device)

    # -- saving and loading a process
    def process_dict(self) -> dict:
        return {"format": "edgekd-distpro-process", "version": 1,
                "pathways": [{"teacher": self.teacher_points[i], "student": self.student_points[j], "transform": k}
                             for i, j, k in self.pathways],
                "g": G_BIAS, "alpha_logits": self.process.tolist()}

    def load_process(self, path: Path) -> None:
        try:
            data = json.loads(Path(path).read_text())
            logits = torch.tensor(data["alpha_logits"], dtype=torch.float32)
            count = len(data["pathways"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgekdError(f"{path} is not a DistPro process file ({type(e).__name__}): pass the process.json "
                              "a distpro run wrote") from None
        if count != len(self.pathways) or logits.ndim != 2 or logits.shape[1] != count:
            raise EdgekdError(f"{path} has {count} pathways but this teacher/student pair has {len(self.pathways)}: "
                              "use the same stages and transforms as the search")
        self.process = logits

    def write_artifacts(self, run_dir) -> None:
        run_dir = Path(run_dir)
        (run_dir / "process.json").write_text(json.dumps(self.process_dict()) + "\n")
        if self.process.shape[0]:
            plot_process(self.process, self.pathways, run_dir / "process.png")


def plot_process(process: torch.Tensor, pathways, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = torch.stack([biased_softmax(row) for row in process.detach().cpu()]).numpy()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for p, (i, j, k) in enumerate(pathways):
        ax.plot(weights[:, p], lw=1, label=f"T{i}->S{j} {k}")
    ax.set_xlabel("search step")
    ax.set_ylabel("pathway weight alpha")
    ax.set_title("DistPro process")
    ax.legend(fontsize=5, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
