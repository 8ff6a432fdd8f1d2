"""NetAug (Cai et al., "Network Augmentation for Tiny Deep Learning", ICLR 2022) and NetAug + KD.

The tiny student is the smallest sub-network of a weight-shared wider network. Each step runs the base on the
batch and one augmented configuration sampled at random (every inverted-bottleneck expansion scaled by a factor
from `expand_factors`, every other channel count by one from `width_factors`, rounded to a multiple of 8);
loss = L(base) + alpha * L(augmented), one optimizer step. Width augmentation stops for the last `stop_fraction` of
the epochs, expansion augmentation for the last `expand_stop_fraction` (default 0: never, as the reference). While
the width is augmented, at each epoch start the channels of every expansion are re-sorted by importance (L1 norm of the
projection weights that read them) so the base keeps the most important ones; the optimizer's momentum is
permuted with them. Before evaluation and export the base's BatchNorm statistics are re-estimated on the most
recent training batches. The exported model is the ordinary zoo student with the leading slices of the shared
weights: same class, same state-dict keys, zero inference overhead.

How the sharing works: the student is traced once with torch.fx; every channel dimension is assigned to a
"channel group" (tied through depthwise convs, BatchNorm, residual adds and the SE scale). The method owns one
tensor per student parameter at the largest configuration's size; a configuration is a size per group, and the
student's own forward runs on leading slices (torch.func.functional_call), depthwise convs getting their
`groups` set to the active channel count. Augmented forwards use throwaway BatchNorm buffers, so the base's
running statistics only ever see the base. Configurations are drawn from a generator seeded by the run seed and
a step counter kept in the checkpoint: every DDP rank draws the same one, and a resumed run draws the same ones.
A resumed run ends with exactly the uninterrupted run's weights and statistics. The one difference: if it stopped
within the last `bn_batches` steps of an epoch, that epoch's BatchNorm re-estimation (so its validation accuracy)
sees fewer batches, because the recent batches are not checkpointed (they would make every checkpoint
`bn_batches` batches of images larger); the next epoch's re-estimation restores the same statistics.

Schedule and gradient clipping, from the public reference implementation (mit-han-lab/tinyml, netaug/train.py,
configs/netaug.yaml, utils/lr_scheduler.py): SGD (Nesterov, momentum 0.9), 5 warm-up epochs then a cosine to zero
over 150 epochs, lr 0.025 per 128 images (0.4 on 16 GPUs x 128), weight decay 4e-5 off BatchNorm and biases, label
smoothing 0.1; the same recipe as its baseline, so only what is NetAug's own is a default here: the width
augmentation stops for the last 75 of the 155 epochs (`stop_aug_w_epoch: 75`) while the expansion ratios stay
augmented to the end (`stop_aug_e_epoch: 0`, `stop_netaug_epoch: 0`), and channels are sorted only while the width
is augmented. The run's warm-up + cosine-to-zero (edgekd.train.schedules) already has the reference's shape. The
reference does not clip gradients; we do (`grad_clip`, ours): the base gets the gradients of both losses, and at
our usual lr 0.05 on batches of 128 the unclipped run diverged (docs/methods.md).

NetAug + KD (`netaug+kd`): both the base and the augmented network are trained on the KD objective (T^2-scaled KL
to the teacher's softened logits mixed with CE, as `kd`), so the teacher also guides the shared wide weights;
the teacher's logits can come from the teacher-output cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from ..errors import EdgekdError
from ..models.layers import make_divisible
from .base import DistillOutput, Distiller, MethodOptions
from .losses import kd_loss
from .step import LOGITS


def _floats(text) -> tuple[float, ...]:
    if isinstance(text, (tuple, list)):
        return tuple(float(v) for v in text)
    try:
        return tuple(float(v) for v in str(text).replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise EdgekdError(f"netaug factor list must be numbers separated by commas, got {text!r}") from None


# default max gradient norm for netaug (ours, measured on Fashion-MNIST 32 px, batch 128, see docs/methods.md)
GRAD_CLIP = 10.0


@dataclass(frozen=True)
class NetAugOptions(MethodOptions):
    alpha: float = 1.0  # weight of the augmented network's loss
    expand_factors: str = "1.0,1.6,2.2,2.8"  # multiply inverted-bottleneck expansions (method notes)
    width_factors: str = "1.0,1.8,2.6"  # multiply every other channel count
    # the reference (mit-han-lab/tinyml netaug, configs/netaug.yaml): width augmentation off for the last 75 of 155
    # epochs (stop_aug_w_epoch), the expansion ratios augmented to the end (stop_aug_e_epoch = stop_netaug_epoch = 0)
    stop_fraction: float = 0.5  # width augmentation off for this last fraction of the epochs
    expand_stop_fraction: float = 0.0  # expansion augmentation off for this last fraction (0: never; 0.5: all off)
    # max global gradient norm of the netaug phase when the run sets none (--grad-clip 0); an explicit --grad-clip
    # wins; 0 turns it off. Ours: the reference does not clip (it trains at lr 0.025 per 128 images)
    grad_clip: float = GRAD_CLIP
    label_smoothing: float = 0.0  # of both CE terms (ours, as `ce`; the reference: 0.1 for baseline and NetAug alike)
    sort_channels: bool = True  # re-sort expansions by importance each epoch while the width is augmented
    bn_batches: int = 8  # recent training batches used to re-estimate the base's BatchNorm statistics
    divisor: int = 8
    seed: int = 0
    # netaug+kd only
    temperature: float = 4.0
    kd_alpha: float = 0.9

    def __post_init__(self):
        for name in ("expand_factors", "width_factors"):
            values = _floats(getattr(self, name))
            if not values or min(values) < 1.0 or values[0] != 1.0:
                raise EdgekdError(f"netaug {name} must start with 1.0 (the base) and be >= 1, got {getattr(self, name)!r}")
        if self.alpha < 0 or not 0.0 <= self.stop_fraction < 1.0 or not 0.0 <= self.expand_stop_fraction < 1.0:
            raise EdgekdError("netaug alpha must be >= 0 and stop_fraction and expand_stop_fraction in [0, 1)")
        if self.grad_clip < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise EdgekdError("netaug grad_clip must be >= 0 (0: off) and label_smoothing in [0, 1)")
        if self.bn_batches < 0 or self.divisor < 1 or self.temperature <= 0 or not 0 <= self.kd_alpha <= 1:
            raise EdgekdError("netaug bn_batches >= 0, divisor >= 1, temperature > 0 and kd_alpha in [0, 1] please")


# ------------------------------------------------------------------------------------------- channel groups

@dataclass
class ChannelGroup:
    base: int
    kind: str  # "fixed" (input/classes), "expand" (inverted-bottleneck mid channels) or "width"


class _Groups:
    """Union-find over channel dimensions of the traced student."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.size[a] != self.size[b]:
                raise EdgekdError(f"netaug cannot tie {self.size[a]} and {self.size[b]} channels at {where}")
            self.parent[b] = a
        return a


def analyse(student: nn.Module) -> tuple[dict[str, list[tuple[int, int]]], dict[int, ChannelGroup], list[str]]:
    """(param/buffer name -> [(dim, group)], groups, depthwise conv paths) of the student's channel structure."""
    try:
        gm = fx.symbolic_trace(student)
    except Exception as e:  # noqa: BLE001
        raise EdgekdError(f"netaug needs a torch.fx-traceable student ({type(e).__name__}: {str(e)[:100]})") from None
    modules = dict(gm.named_modules())
    uf = _Groups()
    group_of: dict[fx.Node, int | None] = {}
    dims: dict[str, list[tuple[int, int]]] = {}
    producer_kernel: dict[int, int] = {}  # group -> kernel size of the conv producing it
    has_depthwise: set[int] = set()
    depthwise: list[str] = []
    fixed: set[int] = set()
    channels = None

    def in_group(node: fx.Node) -> int | None:
        for a in node.all_input_nodes:
            if group_of.get(a) is not None:
                return group_of[a]
        return None

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            channels = getattr(student, "model_config", {}).get("in_chans", 3)
            group_of[node] = uf.new(channels)
            fixed.add(group_of[node])
        elif node.op == "call_module":
            m = modules[node.target]
            g_in = in_group(node)
            path = str(node.target)
            if isinstance(m, nn.Conv2d):
                if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
                    out = g_in
                    dims[f"{path}.weight"] = [(0, g_in)]
                    depthwise.append(path)
                    has_depthwise.add(g_in)
                elif m.groups == 1:
                    out = uf.new(m.out_channels)
                    producer_kernel[out] = m.kernel_size[0]
                    dims[f"{path}.weight"] = [(0, out), (1, g_in)]
                else:
                    raise EdgekdError(f"netaug cannot widen grouped convolution {path} (groups={m.groups})")
                if m.bias is not None:
                    dims[f"{path}.bias"] = [(0, out)]
                group_of[node] = out
            elif isinstance(m, nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    dims[f"{path}.{name}"] = [(0, g_in)]
                group_of[node] = g_in
            elif isinstance(m, nn.Linear):
                out = uf.new(m.out_features)
                dims[f"{path}.weight"] = [(0, out), (1, g_in)]
                if m.bias is not None:
                    dims[f"{path}.bias"] = [(0, out)]
                group_of[node] = out
            elif any(True for _ in m.parameters(recurse=False)):
                raise EdgekdError(f"netaug cannot widen layer {path} ({type(m).__name__})")
            else:  # activations, pooling, dropout, padding: channels pass through
                group_of[node] = g_in
        elif node.op in ("call_function", "call_method"):
            groups = [group_of[a] for a in node.all_input_nodes if group_of.get(a) is not None]
            out = groups[0] if groups else None
            for g in groups[1:]:  # residual add, SE scale: the operands share channels
                out = uf.union(out, g, node.name)
            group_of[node] = out
        elif node.op == "output":
            for a in node.all_input_nodes:
                if group_of.get(a) is not None:
                    fixed.add(group_of[a])
    roots = {uf.find(g) for g in range(len(uf.parent))}
    fixed = {uf.find(g) for g in fixed}
    expand = {uf.find(g) for g in producer_kernel if producer_kernel[g] == 1} & {uf.find(g) for g in has_depthwise}
    groups = {g: ChannelGroup(uf.size[g], "fixed" if g in fixed else "expand" if g in expand else "width")
              for g in roots}
    dims = {name: [(d, uf.find(g)) for d, g in pairs] for name, pairs in dims.items()}
    return dims, groups, depthwise


# ------------------------------------------------------------------------------------------- the method

class NetAug(Distiller):
    name = "netaug"
    description = "NetAug: the student trained as the smallest sub-network of a weight-shared wider network"
    Options = NetAugOptions
    requires_teacher = False

    def __init__(self, student, teacher, options: NetAugOptions):
        super().__init__(student, teacher, options)
        self.expand_factors = _floats(options.expand_factors)
        self.width_factors = _floats(options.width_factors)
        self.dims, self.groups, self.depthwise = analyse(student)
        self.max_sizes = self._sizes(max(self.width_factors), max(self.expand_factors))
        self._base_sizes = {g: info.base for g, info in self.groups.items()}  # checked on every forward
        # the shared weights: every student parameter at the largest configuration, leading slice = the student
        self.shared = nn.ParameterDict()
        params = dict(student.named_parameters())
        for name, p in params.items():
            big = torch.empty(self._shape(name, p.shape, self.max_sizes), dtype=p.dtype)
            _init_like(big, name)
            big[tuple(slice(0, s) for s in p.shape)] = p.detach()
            self.shared[_key(name)] = nn.Parameter(big)
        self.param_names = list(params)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # configurations drawn so far
        self.register_buffer("sorted_epoch", torch.full((), -1, dtype=torch.long))
        self.augmenting_width = self.augmenting_expand = True
        self._recent: list[torch.Tensor] = []  # recent training inputs for BatchNorm re-estimation
        self._batches_seen = 0  # training batches since construction (or resume)
        self._recalibrated_at = -1  # _batches_seen at the last re-estimation

    # -- configurations
    def _sizes(self, width: float, expand: float) -> dict[int, int]:
        d = self.options.divisor
        out = {}
        for g, info in self.groups.items():
            factor = 1.0 if info.kind == "fixed" else width * (expand if info.kind == "expand" else 1.0)
            out[g] = info.base if factor == 1.0 else max(info.base, make_divisible(info.base * factor, d))
        return out

    def _shape(self, name: str, shape, sizes: dict[int, int]) -> tuple[int, ...]:
        shape = list(shape)
        for dim, g in self.dims.get(name, []):
            shape[dim] = sizes[g]
        return tuple(shape)

    def base_sizes(self) -> dict[int, int]:
        return self._base_sizes

    @property
    def augmenting(self) -> bool:
        return self.augmenting_width or self.augmenting_expand

    def sample(self) -> tuple[float, float]:
        """(width factor, expand factor): the same sequence on every rank and after a resume; 1.0 for a dimension
        whose augmentation has stopped."""
        rng = random.Random(self.options.seed * 1_000_003 + int(self.draws))
        self.draws += 1
        width, expand = rng.choice(self.width_factors), rng.choice(self.expand_factors)
        return width if self.augmenting_width else 1.0, expand if self.augmenting_expand else 1.0

    # -- forward of a sub-network
    def _params(self, sizes: dict[int, int]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.param_names:
            p = self.shared[_key(name)]
            for dim, g in self.dims.get(name, []):
                p = p.narrow(dim, 0, sizes[g])
            out[name] = p
        return out

    @contextlib.contextmanager
    def _depthwise_groups(self, sizes: dict[int, int]):
        modules = dict(self.student.named_modules())
        saved = {path: modules[path].groups for path in self.depthwise}
        try:
            for path in self.depthwise:
                modules[path].groups = sizes[self.dims[f"{path}.weight"][0][1]]
            yield
        finally:
            for path, groups in saved.items():
                modules[path].groups = groups

    def run(self, x: torch.Tensor, sizes: dict[int, int] | None = None) -> torch.Tensor:
        """The sub-network of `sizes` (default: the base) on x."""
        sizes = sizes or self.base_sizes()
        tensors: dict[str, torch.Tensor] = self._params(sizes)
        if sizes != self.base_sizes():  # throwaway BatchNorm buffers: the base's statistics see only the base
            for name, buf in self.student.named_buffers():
                if name in self.dims:
                    fill = 1.0 if name.endswith("running_var") else 0.0
                    tensors[name] = torch.full(self._shape(name, buf.shape, sizes), fill, device=buf.device,
                                               dtype=buf.dtype)
                elif name.endswith("num_batches_tracked"):
                    tensors[name] = buf.clone()
        with self._depthwise_groups(sizes):
            return functional_call(self.student, tensors, (x,), strict=False)

    def _loss(self, logits, y, teacher_logits):
        return F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing), {}

    def forward(self, step):
        x, y = step.x, step.y
        teacher_logits = self.teacher_forward(step)[0] if self.teacher_needs is not None else None
        if self.training and self.options.bn_batches:
            self._recent = (self._recent + [x.detach()])[-self.options.bn_batches:]
            self._batches_seen += 1
        logits = self.run(x)
        loss, terms = self._loss(logits, y, teacher_logits)
        terms = {"base": loss.detach(), **terms}
        if self.training and self.augmenting and self.options.alpha > 0:
            width, expand = self.sample()
            aug_logits = self.run(x, self._sizes(width, expand))
            aug_loss, _ = self._loss(aug_logits, y, teacher_logits)
            loss = loss + self.options.alpha * aug_loss
            terms.update(augmented=aug_loss.detach(), width=torch.tensor(width), expand=torch.tensor(expand))
        return DistillOutput(loss, logits, terms)

    # -- what the trainer sees
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.values())

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.values())

    def phases(self, epochs, optim):
        """One phase; the run's optimiser settings with the method's `grad_clip` where the run clips nothing."""
        if optim.grad_clip == 0 and self.options.grad_clip > 0:
            optim = dataclasses.replace(optim, grad_clip=self.options.grad_clip)
        return super().phases(epochs, optim)

    def on_epoch_start(self, epoch: int, epochs: int, optimizer, steps_per_epoch: int = 0) -> None:
        self.augmenting_width = epoch < math.ceil(epochs * (1.0 - self.options.stop_fraction))
        self.augmenting_expand = epoch < math.ceil(epochs * (1.0 - self.options.expand_stop_fraction))
        # the reference sorts only in its "default" mode (width and expansion augmented)
        if self.options.sort_channels and self.augmenting_width and epoch > int(self.sorted_epoch) and epoch > 0:
            self.sort_channels(optimizer)
        self.sorted_epoch.fill_(max(int(self.sorted_epoch), epoch))

    @torch.no_grad()
    def sort_channels(self, optimizer=None) -> None:
        """Re-order every expansion's channels by importance, most important first (stable)."""
        for g, info in self.groups.items():
            if info.kind != "expand":
                continue
            readers = [n for n, pairs in self.dims.items() if (1, g) in pairs and n in self.param_names]
            if not readers:
                continue
            importance = sum(self.shared[_key(n)].abs().sum(dim=[d for d in range(self.shared[_key(n)].ndim) if d != 1])
                             for n in readers)
            order = torch.argsort(importance, descending=True, stable=True)
            for name, pairs in self.dims.items():
                for dim, group in pairs:
                    if group != g:
                        continue
                    if name in self.param_names:
                        p = self.shared[_key(name)]
                        p.copy_(p.index_select(dim, order))
                        state = optimizer.state.get(p, {}) if optimizer is not None else {}
                        for key, value in state.items():
                            if torch.is_tensor(value) and value.shape == p.shape:
                                value.copy_(value.index_select(dim, order))
        # the base's BatchNorm statistics belong to channels that may have moved: re-estimate before use
        self._recalibrated_at = -1

    @torch.no_grad()
    def student_for_export(self) -> nn.Module:
        for name, p in self.student.named_parameters():
            p.copy_(self.shared[_key(name)][tuple(slice(0, s) for s in p.shape)])
        # after every epoch, augmented or not: a resumed run whose previous re-estimation saw fewer batches then
        # gets the uninterrupted run's statistics back
        if self._recent and self._batches_seen != self._recalibrated_at:
            _recalibrate_bn(self.student, self._recent)
            self._recalibrated_at = self._batches_seen
        return self.student


class NetAugKD(NetAug):
    name = "netaug+kd"
    description = "NetAug with the KD objective on both the base and the augmented network"
    requires_teacher = True
    teacher_needs = LOGITS

    def _loss(self, logits, y, teacher_logits):
        soft = kd_loss(logits, teacher_logits, self.options.temperature)
        hard = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        return self.options.kd_alpha * soft + (1.0 - self.options.kd_alpha) * hard, {"kd": soft.detach()}


def _key(name: str) -> str:
    return name.replace(".", "__")


def _init_like(t: torch.Tensor, name: str) -> None:
    """The zoo's initialisation (edgekd.models.layers.init_weights) for the channels beyond the student's."""
    if name.endswith("running_var") or (t.ndim == 1 and name.endswith("weight")):
        nn.init.ones_(t)
    elif t.ndim == 1:
        nn.init.zeros_(t)
    elif t.ndim == 4:
        nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu")
    else:
        nn.init.normal_(t, 0.0, 0.01)


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Exact BatchNorm statistics of `model` on `batches` (cumulative average), as NetAug does before evaluation."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    saved = [m.momentum for m in bns]
    model.eval()  # dropout off: re-estimation consumes no random numbers, so a resumed run matches
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x in batches:
        model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
