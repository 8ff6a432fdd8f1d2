"""Shared helpers of the feature-matching methods: layer pairs, shape probes, adapters and tapped forwards.

Layer pairs. Every zoo model lists its stage boundaries in `feature_info` (one entry per resolution, in
forward order). By default a student boundary is paired with the teacher boundary at the same *relative
depth counted from the deepest*: last with last, second-to-last with second-to-last, and so on. When the two
models have the same total stride (the zoo default, or low_res_stem on both) this is exactly "same
reduction"; when they differ (low_res_stem on one side only) the final feature maps still pair with each
other and spatial sizes are reconciled by interpolation. Methods then take a spread of these pairs
(`spread`), always including the deepest. Options `student_layers` / `teacher_layers` (comma-separated module
paths) override either side; a side left empty is matched to the given one as above.

Taps are forward hooks registered only for the duration of one forward (`run_with_taps`), so the student
handed to export carries no hooks. A tap reads a module's output ("output") or the input of its last call
("input", cloned: the activations that follow are in-place), which is how pre-activation responses are read.
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekdError
from .losses import kd_loss

# (module path, "output" | "input" | "pooled"); "pooled": the output averaged over its spatial positions (B, C),
# all an embedding method (RKD) needs and a fraction of the map for a cache to hold
Tap = tuple[str, str]


def parse_layers(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


_MODULES: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]]" = weakref.WeakKeyDictionary()


def modules_at(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    modules = _MODULES.get(model)
    if modules is None:  # resolved once per model: taps are looked up on every training step
        modules = _MODULES[model] = dict(model.named_modules())
    for p in paths:
        if p not in modules:
            known = [info.module for info in getattr(model, "feature_info", [])]
            raise EdgekdError(
                f"{type(model).__name__} has no module '{p}' to tap"
                f" (stage tap points: {', '.join(known) or 'see model.named_modules()'})"
            )
    return [modules[p] for p in paths]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been computed."""


def run_with_taps(model: nn.Module, x: torch.Tensor, taps: Sequence[Tap | str],
                  stop_after: str | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """model(x) with the tapped features, in `taps` order. With `stop_after` (a module path) the forward ends
    when that module returns (the output is then None): stage-wise methods skip the layers they don't train."""
    taps = [(t, "output") if isinstance(t, str) else t for t in taps]
    paths = [p for p, _ in taps] + ([stop_after] if stop_after else [])
    modules = modules_at(model, paths)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def keep_output(i):
        def hook(_m, _inp, out):
            store[i] = out
        return hook

    def keep_pooled(i):
        def hook(_m, _inp, out):
            store[i] = out.mean((2, 3))
        return hook

    def keep_input(i):
        def hook(_m, inp):
            store[i] = inp[0].clone()  # the module may work in place (ReLU(inplace=True))
        return hook

    def stop(_m, _inp, _out):
        raise StopForward

    try:
        for i, ((_, kind), module) in enumerate(zip(taps, modules)):
            if kind == "output":
                handles.append(module.register_forward_hook(keep_output(i)))
            elif kind == "input":
                handles.append(module.register_forward_pre_hook(keep_input(i)))
            elif kind == "pooled":
                handles.append(module.register_forward_hook(keep_pooled(i)))
            else:
                raise ValueError(f"tap kind must be 'output', 'input' or 'pooled', got {kind!r}")
        if stop_after:
            handles.append(modules[-1].register_forward_hook(stop))  # after the taps' hooks on that module
        try:
            out = model(x)
        except StopForward:
            out = None
    finally:
        for h in handles:
            h.remove()
    missing = [taps[i][0] for i in range(len(taps)) if i not in store]
    if missing:
        raise RuntimeError(f"tap '{missing[0]}' did not fire before the forward pass ended")
    return out, [store[i] for i in range(len(taps))]


def functional_run_with_taps(model: nn.Module, tensors: dict, x: torch.Tensor,
                             taps: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """run_with_taps with substituted parameters/buffers (torch.func.functional_call): for virtual steps."""
    from torch.func import functional_call

    store: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: store.__setitem__(i, out))
               for i, m in enumerate(modules_at(model, taps))]
    try:
        out = functional_call(model, tensors, (x,))
    finally:
        for h in handles:
            h.remove()
    return out, [store[i] for i in range(len(taps))]


def probe_size(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    return 2 * info[-1].reduction if info else 64


@torch.no_grad()
def blank_forward(model: nn.Module, run=None):
    """One eval-mode forward of a blank image at twice the total stride (structure probes); restores the mode.

    `run(model, x)` replaces the plain `model(x)` call; returns (its result, the probe size)."""
    size = probe_size(model)
    in_chans = getattr(model, "model_config", {}).get("in_chans", 3)
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, size, size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        return (run(model, x) if run is not None else model(x)), size
    finally:
        model.train(was_training)


def probe(model: nn.Module, taps: Sequence[Tap | str]) -> list[tuple[int, int]]:
    """(channels, reduction) of each tap, from one blank forward."""
    (_, feats), size = blank_forward(model, lambda m, x: run_with_taps(m, x, taps))
    return [(f.shape[1], max(1, round(size / f.shape[-1]))) for f in feats]


def spread(n: int, k: int) -> list[int]:
    """k of n indices spaced evenly back from the deepest (which is always included), in forward order."""
    k = max(1, min(k, n))
    return sorted({n - 1 - (j * n) // k for j in range(k)})


def stage_boundaries(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise EdgekdError(f"{type(model).__name__} has no feature_info: pass student_layers and teacher_layers")
    return [i.module for i in info]


def aligned_boundaries(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """Stage boundaries of both models paired from the deepest (see the module docstring)."""
    s, t = stage_boundaries(student), stage_boundaries(teacher)
    n = min(len(s), len(t))
    return list(zip(s[len(s) - n:], t[len(t) - n:]))


def _match_one_side(given_model, given, other_model) -> list[str]:
    """For paths of one model, the other model's boundary at the same depth from the end if the path is a
    boundary with a partner there, else the boundary of the nearest reduction (ties: the deeper one)."""
    mine, theirs = stage_boundaries(given_model), stage_boundaries(other_model)
    other_infos = other_model.feature_info
    reductions = [r for _, r in probe(given_model, given)]
    out = []
    for path, r in zip(given, reductions):
        if path in mine and len(mine) - mine.index(path) <= len(theirs):
            out.append(theirs[len(theirs) - (len(mine) - mine.index(path))])
            continue
        best = min(range(len(other_infos)),
                   key=lambda i: (abs(math.log2(other_infos[i].reduction) - math.log2(r)), -i))
        out.append(other_infos[best].module)
    return out


def layer_pairs(student: nn.Module, teacher: nn.Module, student_layers: str = "", teacher_layers: str = "",
                count: int = 4, middle: bool = False) -> list[tuple[str, str]]:
    """(student path, teacher path) pairs: the user's, or `count` spread boundary pairs (or the middle one)."""
    s_given, t_given = parse_layers(student_layers), parse_layers(teacher_layers)
    if s_given and t_given:
        if len(s_given) != len(t_given):
            raise EdgekdError(
                f"student_layers has {len(s_given)} paths but teacher_layers has {len(t_given)}: give one teacher layer per student layer"
            )
        modules_at(student, s_given)
        modules_at(teacher, t_given)
        return list(zip(s_given, t_given))
    if s_given:
        modules_at(student, s_given)
        return list(zip(s_given, _match_one_side(student, s_given, teacher)))
    if t_given:
        modules_at(teacher, t_given)
        return list(zip(_match_one_side(teacher, t_given, student), t_given))
    pairs = aligned_boundaries(student, teacher)
    if middle:
        return [pairs[len(pairs) // 2]]
    return [pairs[i] for i in spread(len(pairs), count)]


def full_precision(x: torch.Tensor):
    """Autocast off: Gram matrices and kernel sums lose too much in bf16/fp16 (MMD is a difference of near-equal terms)."""
    return torch.autocast(x.device.type, enabled=False)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) or (B, H, W) maps to `size` when it differs."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 3
    y = F.interpolate(x.unsqueeze(1) if squeeze else x, size=tuple(size), mode="bilinear", align_corners=False)
    return y.squeeze(1) if squeeze else y


class Adapter(nn.Module):
    """Student feature -> teacher feature shape: 1x1 conv + BN when channels differ (or `always`), then a
    bilinear resize when the spatial sizes differ. Training-only: it lives in the distiller, never the student.

    bn=False gives a plain 1x1 conv with a bias (SSKD's adapter in the paper)."""

    def __init__(self, in_channels: int, out_channels: int, always: bool = False, bn: bool = True):
        super().__init__()
        if in_channels != out_channels or always:
            conv = nn.Conv2d(in_channels, out_channels, 1, bias=not bn)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.proj = nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if bn else conv
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return resize(self.proj(x), size)


def task_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float,
              temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The label part that feature methods add: CE, or Hinton's alpha*KD + (1 - alpha)*CE when alpha > 0."""
    ce = F.cross_entropy(logits, y)
    if alpha <= 0 or teacher_logits is None:
        return ce, {"ce": ce.detach()}
    kd = kd_loss(logits, teacher_logits, temperature)
    return alpha * kd + (1.0 - alpha) * ce, {"ce": ce.detach(), "kd": kd.detach()}


def check_task_options(method: str, alpha: float, temperature: float) -> None:
    if temperature <= 0:
        raise EdgekdError(f"{method} temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise EdgekdError(f"{method} alpha must be in [0, 1], got {alpha}")
