"""MetaDistiller (Liu et al., "MetaDistiller: Network Self-Boosting via Meta-Learned Top-Down Distillation",
ECCV 2020): teacher-free; a label generator fuses deeper features top-down into soft targets for the exits.

The student is split at its stage boundaries (`stages=4`, or `student_layers`); an exit (the BYOT bottleneck to
the deepest feature shape + a classifier, `edgekd.distill.byot.Exit`) follows every stage but the last. The
label generator (paper Eq. 5): F^_K = conv1x1(F_K); F^_k = conv3x3(upsample(F^_{k+1}) + conv1x1(F_k)), bilinear
upsampling to stage k's size, `generator_channels` wide; a bottleneck head on F^_k gives the soft target T_k.
Loss (Eq. 3-4): CE(y, S_K) + sum_k [alpha CE(y, S_k) + (1 - alpha) tau^2 KL(T_k || S_k)], the paper's alpha=0.5,
tau=1. T_k is a fixed target for the main network (no gradient to the generator or through it).

Meta step (Eq. 6-8, Algorithm 1), after the main optimizer step in every M-th epoch (M = `meta_every` = 5, from
epoch 0): the batch is split at random into two disjoint halves (the paper splits the dataset in half; a random
half of each random batch is the same in expectation and needs no second loader); a virtual SGD step of the
student on half A with the generator's targets kept differentiable (learning rate = the main optimizer's
current rate, as the paper), then CE of the virtually-updated student's final output on half B; its gradient
reaches only the generator, which Adam updates. The virtual forwards use copies of the BatchNorm buffers, and
the meta step always runs in fp32 (autocast off), so it works under AMP; under DDP the generator's gradients are
averaged over ranks. The paper uses Adam at 0.1 for the generator; we default to 1e-3 (see docs/methods.md).

`mode` gives the paper's baselines with the same exits: `deep` (deeply supervised: exits on hard labels only)
and `self` (self-distillation: T_k = the final output, as Be Your Own Teacher without its feature term).
Exits and generator are dropped at export; `extra_eval_models()` offers the ensemble of all exits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import EdgekdError
from .base import DistillOutput, Distiller, MethodOptions
from .byot import Exit
from .features import (functional_run_with_taps, parse_layers, probe, resize, run_with_taps, spread,
                       stage_boundaries)
from .losses import kd_loss

MODES = ("meta", "self", "deep")


@dataclass(frozen=True)
class MetaDistillerOptions(MethodOptions):
    alpha: float = 0.5
    temperature: float = 1.0
    meta_every: int = 5
    generator_lr: float = 1e-3
    generator_channels: int = 64
    stages: int = 4
    student_layers: str = ""
    mode: str = "meta"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise EdgekdError(f"metadistiller needs alpha in [0, 1] and temperature > 0 (got {self.alpha}, {self.temperature})")
        if self.meta_every < 1 or self.generator_lr <= 0 or self.generator_channels < 1 or self.stages < 2:
            raise EdgekdError("metadistiller needs meta_every >= 1, generator_lr > 0, generator_channels >= 1, stages >= 2")
        if self.mode not in MODES:
            raise EdgekdError(f"metadistiller mode must be one of {', '.join(MODES)}, got '{self.mode}'")


class LabelGenerator(nn.Module):
    """Top-down fusion of the stage features into soft targets for the K-1 early exits."""

    def __init__(self, shapes: list[tuple[int, int]], width: int, num_classes: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c, _ in shapes)
        self.refine = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in shapes[:-1])
        r_out = shapes[-1][1]
        self.heads = nn.ModuleList(Exit(width, r, width, r_out, num_classes) for _, r in shapes[:-1])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        fused = self.lateral[-1](feats[-1])
        deepest = feats[-1].shape[-2:]
        targets = []
        for k in range(len(feats) - 2, -1, -1):
            fused = self.refine[k](resize(fused, feats[k].shape[-2:]) + self.lateral[k](feats[k]))
            targets.append(self.heads[k](fused, deepest)[1])
        return targets[::-1]


class _Ensemble(nn.Module):
    """Mean of the exits' and the final classifier's probabilities (log returned as logits)."""

    def __init__(self, method: "MetaDistiller"):
        super().__init__()
        self.method = method

    def forward(self, x):
        logits, exits, _ = self.method.outputs(x)
        probs = torch.stack([F.softmax(z.float(), 1) for z in [*exits, logits]]).mean(0)
        return probs.clamp_min(1e-12).log()


class MetaDistiller(Distiller):
    name = "metadistiller"
    description = "MetaDistiller: exits learn from soft targets a meta-learned top-down label generator makes"
    Options = MetaDistillerOptions
    requires_teacher = False

    def __init__(self, student, teacher, options: MetaDistillerOptions):
        super().__init__(student, None, options)
        given = parse_layers(options.student_layers)
        bounds = stage_boundaries(student) if not given else given
        self.stages = given or [bounds[i] for i in spread(len(bounds), options.stages)]
        if len(self.stages) < 2:
            raise EdgekdError("metadistiller needs at least two stages (exits after all but the deepest)")
        shapes = probe(student, self.stages)
        c_out, r_out = shapes[-1]
        self.exits = nn.ModuleList(Exit(c, r, c_out, r_out, student.num_classes) for c, r in shapes[:-1])
        self.generator = LabelGenerator(shapes, options.generator_channels, student.num_classes)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=options.generator_lr)
        self.meta_active = options.mode == "meta"

    # -- the main network with its exits
    def outputs(self, x, params: dict | None = None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        if params is None:
            logits, feats = run_with_taps(self.student, x, self.stages)
        else:
            logits, feats = functional_run_with_taps(self.student, params, x, self.stages)
        deepest = feats[-1].shape[-2:]
        exits = [exit_(f, deepest)[1] for exit_, f in zip(self.exits, feats[:-1])]
        return logits, exits, feats

    def _loss(self, logits, exits, y, targets) -> tuple[torch.Tensor, dict]:
        ce_final = F.cross_entropy(logits, y)
        ce_exits = [F.cross_entropy(z, y) for z in exits]
        a, t = self.options.alpha, self.options.temperature
        if targets is None:  # deeply supervised
            return ce_final + sum(ce_exits), {"ce": ce_final.detach(), "exits_ce": sum(ce_exits).detach()}
        kl = [kd_loss(z, target, t) for z, target in zip(exits, targets)]
        loss = ce_final + sum(a * ce + (1 - a) * k for ce, k in zip(ce_exits, kl))
        return loss, {"ce": ce_final.detach(), "exits_ce": sum(ce_exits).detach(), "kl": sum(kl).detach()}

    def _targets(self, logits, feats):
        if self.options.mode == "deep":
            return None
        if self.options.mode == "self":
            return [logits.detach()] * len(self.exits)
        with torch.no_grad():
            return self.generator([f.detach() for f in feats])

    def forward(self, step):
        logits, exits, feats = self.outputs(step.x)
        loss, terms = self._loss(logits, exits, step.y, self._targets(logits, feats))
        return DistillOutput(loss, logits, terms)

    # -- the trainer's hooks
    def on_epoch_start(self, epoch: int, epochs: int, optimizer, steps_per_epoch: int = 0) -> None:
        self.meta_active = self.options.mode == "meta" and epoch % self.options.meta_every == 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        # the generator is not trained by the main loss: only by the meta step's own optimizer
        return list(self.student.parameters()) + list(self.exits.parameters())

    def after_step(self, step, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        x, y = step.x, step.y
        if not self.meta_active or len(y) < 2:
            return {}
        lr = optimizer.param_groups[0]["lr"]
        with torch.autocast(x.device.type, enabled=False):
            meta_loss, grads = self.meta_gradient(x.float(), y, lr)
        from ..distributed import average_gradients

        average_gradients(grads)
        self.generator_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.generator.parameters(), grads):
            p.grad = g
        self.generator_optimizer.step()
        return {"meta_loss": float(meta_loss)}

    def meta_gradient(self, x, y, lr: float, split: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradient of CE(student after one virtual SGD step on half A, half B) w.r.t. the generator (Eq. 8)."""
        for p in self.generator.parameters():  # the trainer freezes what its optimizer does not train
            p.requires_grad_(True)
        order = split if split is not None else torch.randperm(len(y), device=y.device)
        half = len(y) // 2
        a, b = order[:half], order[half:]
        params = {n: p for n, p in self.student.named_parameters()}
        buffers = {n: b_.clone() for n, b_ in self.student.named_buffers()}  # virtual forwards keep BN stats intact
        logits, exits, feats = self.outputs(x[a], {**params, **buffers})
        targets = self.generator([f.detach() for f in feats])  # differentiable in the generator
        inner, _ = self._loss(logits, exits, y[a], targets)
        names = list(params)
        grads = torch.autograd.grad(inner, [params[n] for n in names], create_graph=True)
        stepped = {n: params[n] - lr * g for n, g in zip(names, grads)}
        buffers = {n: b_.clone() for n, b_ in self.student.named_buffers()}
        outer = F.cross_entropy(functional_call(self.student, {**stepped, **buffers}, (x[b],)), y[b])
        gen = list(self.generator.parameters())
        meta = torch.autograd.grad(outer, gen, allow_unused=True)
        return outer.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(gen, meta)]

    # -- state and export
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        for i, p in enumerate(self.generator.parameters()):
            for key, value in self.generator_optimizer.state.get(p, {}).items():
                state[f"generator_optimizer.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        optimizer_state = {k: v for k, v in state.items() if k.startswith("generator_optimizer.")}
        super().load_extra_state({k: v for k, v in state.items() if k not in optimizer_state})
        params = list(self.generator.parameters())
        for key, value in optimizer_state.items():
            _, index, name = key.split(".", 2)
            p = params[int(index)]
            self.generator_optimizer.state[p][name] = value.to(p.device)

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return {"ensemble": _Ensemble(self)}
