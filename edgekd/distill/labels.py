"""The label term of a loss when batches may hold unlabeled or mixed (mixup/cutmix) images.

Unlabeled images (label UNLABELED, -1) never reach it; a mixed image contributes
lam * CE(y) + (1 - lam) * CE(y_partner) when both labels are known. The mean is over the images that
contribute, so the term keeps its scale whatever share of the batch is unlabeled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.loader import UNLABELED


def labelled_rows(y: torch.Tensor, mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bool mask of the rows whose label term is defined."""
    known = y != UNLABELED
    if mix is not None:
        partner, lam = mix
        known = known & ((partner != UNLABELED) | (lam >= 1.0))
    return known


def label_loss(logits: torch.Tensor, y: torch.Tensor, mix: tuple[torch.Tensor, torch.Tensor] | None = None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled rows (0, still in the graph, when there are none)."""
    rows = labelled_rows(y, mix)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    logits = logits[rows]
    ce = F.cross_entropy(logits, y[rows], reduction="none", label_smoothing=label_smoothing)
    if mix is not None:
        partner, lam = mix[0][rows], mix[1][rows].to(ce.dtype)
        ce_partner = F.cross_entropy(logits, partner.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
        ce = lam * ce + (1.0 - lam) * ce_partner
    return ce.mean()


def dominant_label(y: torch.Tensor, teacher_logits: torch.Tensor,
                   mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One class per row for losses that need a target class (DKD): the label of unmixed labelled images,
    else the teacher's top-1 (unlabeled or mixed images have no single true class)."""
    target = teacher_logits.argmax(1)
    known = y != UNLABELED
    if mix is not None:
        known = known & (mix[1] >= 1.0)
    return torch.where(known, y, target)
