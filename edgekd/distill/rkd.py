"""Park et al., "Relational Knowledge Distillation" (CVPR 2019): distance- and angle-wise relations.

On the final embedding of each network (global-average-pooled `forward_features`, the input of the
classifier; its width may differ between the two):
- distance: psi_D(t_i, t_j) = ||t_i - t_j|| / mu, mu the mean distance over the batch's pairs (Eq. 5-6);
- angle: psi_A(t_i, t_j, t_k) = cos of the angle at t_j between t_i and t_k (Eq. 8);
each matched with the Huber (smooth L1) loss. loss = task + 25 * L_dist + 50 * L_angle: lambda_D = 25 and
lambda_A = 50 are the paper's values (also the defaults of RepDistiller's RKDLoss). task = CE, or KD-mixed
with alpha > 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EdgekdError
from .base import DistillOutput, Distiller, MethodOptions
from .features import check_task_options, full_precision, task_loss
from .step import TeacherNeeds


@dataclass(frozen=True)
class RKDOptions(MethodOptions):
    distance_weight: float = 25.0
    angle_weight: float = 50.0
    alpha: float = 0.0  # weight of Hinton KD in the task loss (0: CE only)
    temperature: float = 4.0

    def __post_init__(self):
        check_task_options("rkd", self.alpha, self.temperature)
        if self.distance_weight < 0 or self.angle_weight < 0:
            raise EdgekdError("rkd distance_weight and angle_weight must be >= 0")


def _pdist(e: torch.Tensor) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # exact zeros on the diagonal


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    def normalised(e):
        d = _pdist(e.float().flatten(1))
        return d / d[d > 0].mean().clamp(min=1e-12)
    with torch.no_grad():
        t = normalised(teacher)
    return F.smooth_l1_loss(normalised(student), t)


def _angle_parts(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, h, inv), B x B float64, from which every angle of the batch follows: `_angles`.

    (e_i - e_j) . (e_k - e_j) = G_ik - h_ji - h_jk with h_ji = G_ji - G_jj / 2, and inv[j, i] = 1 / ||e_i - e_j||,
    0 where e_i coincides with e_j (the unit of a zero difference is the zero vector, as F.normalize makes it). The
    Gram sums cancel (differences of near-equal terms), so they run in float64 on embeddings centred on the batch
    mean (differences do not change). A pair counts as coinciding when its squared distance is within 1e-12 of the
    squared norms (below float32's resolution of the embeddings themselves): every j == i, and exact duplicates,
    whose float64 distance can round to a tiny non-zero."""
    x = e.double().flatten(1)
    x = x - x.mean(0)
    g = x @ x.t()
    sq_norm = g.diagonal()
    scale = sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0)
    sq = scale - 2 * g  # sq[j, i] = ||e_i - e_j||^2
    apart = sq > 1e-12 * scale  # False on the diagonal (sq == 0 there exactly)
    inv = torch.where(apart, torch.where(apart, sq, 1.0).rsqrt(), 0.0)
    return g, g - sq_norm.unsqueeze(1) / 2, inv


def _angles_from(g: torch.Tensor, h: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(angles, dots), B x B x B float32: angles[j, i, k] = dots[j, i, k] inv[j, i] inv[j, k]. Float32 from here
    on: these B^3 tensors are the loss's whole cost (float64 took twice as long); G and h carry the precision."""
    g, h, inv = g.float(), h.float(), inv.float()
    dots = g.unsqueeze(0) - h.unsqueeze(2) - h.unsqueeze(1)
    return dots * inv.unsqueeze(2) * inv.unsqueeze(1), dots


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at e_j between e_i and e_k for every (j, i, k), flattened: unit(e_i - e_j) . unit(e_k - e_j),
    0 when e_i or e_k coincides with e_j. From the Gram matrix alone (`_angle_parts`): O(B^2 D + B^3) instead of
    the O(B^3 D) of normalising B^2 differences and multiplying them."""
    return _angles_from(*_angle_parts(e))[0].flatten()


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber (smooth L1, beta 1) between the student's and the teacher's angles (mean over the B^3 triples).

    Its gradient is worked out by hand down to the B x B parts (G, h, inv) and handed to autograd through a
    surrogate whose gradient it is: autograd through the B^3 tensors cost as much as the student's own step. The
    angles are symmetric in (i, k), so the gradients of h and inv are twice their sums over one index."""
    with torch.no_grad():
        target, _ = _angles_from(*_angle_parts(teacher))
    g, h, inv = _angle_parts(student)
    with torch.no_grad():
        angles, dots = _angles_from(g, h, inv)
        diff = angles.sub_(target)
        count = diff.numel()
        size = diff.abs()
        loss = torch.where(size < 1, 0.5 * diff * diff, size - 0.5).sum() / count
        slope = diff.clamp_(-1, 1).div_(count)  # d loss / d angle
        u = inv.float()
        slope_dots = slope * u.unsqueeze(2) * u.unsqueeze(1)  # d loss / d dots
        grad_g = slope_dots.sum(0)
        grad_h = -2 * slope_dots.sum(2)
        grad_inv = 2 * torch.bmm(slope.mul_(dots), u.unsqueeze(2)).squeeze(2)
    surrogate = (grad_g.double() * g).sum() + (grad_h.double() * h).sum() + (grad_inv.double() * inv).sum()
    return loss + (surrogate - surrogate.detach()).float()


def embedding(model, x):
    """(pooled final features, logits) of a zoo model in one forward."""
    features = model.forward_features(x)
    return features.float().mean((2, 3)), model.forward_head(features)


class RelationalKD(Distiller):
    name = "rkd"
    description = "relational KD (Park et al.): distance (25) and angle (50) relations of embeddings + CE"
    Options = RKDOptions

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        # the teacher's embedding is its forward_features output (the last feature_info module), pooled: served
        # (cached) by the trainer beside the logits
        self.teacher_needs = TeacherNeeds(((teacher.feature_info[-1].module, "pooled"),))

    def forward(self, step):
        x, y = step.x, step.y
        t_logits, (t_emb,) = self.teacher_forward(step)
        s_emb, logits = embedding(self.student, x)
        with full_precision(s_emb):
            dist, angle = rkd_distance_loss(s_emb, t_emb), rkd_angle_loss(s_emb, t_emb)
        task, terms = task_loss(logits, y, t_logits, self.options.alpha, self.options.temperature)
        loss = task + self.options.distance_weight * dist + self.options.angle_weight * angle
        return DistillOutput(loss, logits, {**terms, "distance": dist.detach(), "angle": angle.detach()})
