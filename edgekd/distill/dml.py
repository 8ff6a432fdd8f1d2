"""Zhang et al., "Deep Mutual Learning" (CVPR 2018): a cohort of K >= 2 peers trained together from scratch.

Peer k minimises CE(y, p_k) + 1/(K-1) * sum_{l != k} KL(p_l || p_k) (paper Eq. 10), p_l fixed as the target
(the paper updates peers in turn on the same batch; summing the K objectives with the targets detached gives
every peer exactly its own gradient in one step). Plain softmax (temperature 1), as in the paper.
No teacher. Peer 0 is the student: `student_for_export()` returns it, the run's best.pt is it, and its
logits are what the trainer scores. Peers 1..K-1 are the method's extra modules: trained, checkpointed
(resume restores them), never exported by the trainer; each is a plain zoo model (`peer_models()`), so one
can be saved and exported on its own. `peer_model` picks another zoo architecture for peers 1..K-1 (the paper
mixes architectures); by default they are the student's architecture, freshly initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekdError
from .base import DistillOutput, Distiller, MethodOptions
from .losses import kd_loss


@dataclass(frozen=True)
class DMLOptions(MethodOptions):
    peers: int = 2  # cohort size K, the student included
    temperature: float = 1.0
    peer_model: str = ""  # zoo name for peers 1..K-1; empty: the student's architecture

    def __post_init__(self):
        if self.peers < 2:
            raise EdgekdError(f"dml needs peers >= 2 (the student and at least one peer), got {self.peers}")
        if self.temperature <= 0:
            raise EdgekdError(f"dml temperature must be > 0, got {self.temperature}")


def build_peer(student: nn.Module, name: str) -> nn.Module:
    from ..models import create_model, get_model_info

    config = dict(student.model_config)
    if not name or name == config["name"]:
        return create_model(**config)
    info = get_model_info(name)
    options = {k: config[k] for k in ("low_res_stem",) if k in config and k in info.options}
    return create_model(name, config["num_classes"], in_chans=config["in_chans"], **options)


def mutual_losses(logits: list[torch.Tensor], y: torch.Tensor, temperature: float = 1.0):
    """Per peer: (CE, mean KL from every other peer's detached distribution)."""
    out = []
    for k, z in enumerate(logits):
        ce = F.cross_entropy(z, y)
        kl = sum(kd_loss(z, other.detach(), temperature) for j, other in enumerate(logits) if j != k) / (len(logits) - 1)
        out.append((ce, kl))
    return out


class DeepMutualLearning(Distiller):
    name = "dml"
    description = "deep mutual learning (Zhang et al.): 2+ peers trained together, each CE + KL to the others"
    Options = DMLOptions
    requires_teacher = False

    def __init__(self, student, teacher, options):
        super().__init__(student, None, options)  # no teacher: the cohort teaches itself
        self.peers = nn.ModuleList(build_peer(student, options.peer_model) for _ in range(options.peers - 1))

    def peer_models(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    def forward(self, step):
        logits = [m(step.x) for m in self.peer_models()]
        losses = mutual_losses(logits, step.y, self.options.temperature)
        loss = sum(ce + kl for ce, kl in losses)
        terms = {"ce": losses[0][0].detach(), "kl": losses[0][1].detach(),
                 "peers_ce": torch.stack([ce.detach() for ce, _ in losses[1:]]).mean()}
        return DistillOutput(loss, logits[0], terms)
