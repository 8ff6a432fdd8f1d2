"""Batch-wise augmentation with explicit, replayable parameters.

Parameters are sampled separately from their application so the same augmentation can be replayed later
(e.g. to look up cached teacher outputs for exactly the crop/flip the student saw).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    dx: torch.Tensor  # int64 (B,), crop offset in [0, 2*pad]
    dy: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)


@dataclass(frozen=True)
class CropFlip:
    """Random crop after zero padding (`pad` pixels per side) and optional horizontal flip."""

    pad: int
    hflip: bool

    def sample(self, n: int, generator: torch.Generator) -> AugmentParams:
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return AugmentParams(dx, dy, flip)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """images: (B, C, H, W) any dtype. Returns the same shape."""
        b, _, h, w = images.shape
        if self.pad > 0:
            padded = F.pad(images, (self.pad,) * 4)
            rows = (params.dy[:, None] + torch.arange(h)[None, :])  # (B, H)
            cols = (params.dx[:, None] + torch.arange(w)[None, :])  # (B, W)
            batch = torch.arange(b)[:, None, None]
            # gather (B, H, W) pixels for every channel at once
            images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if params.flip.any():
            images = images.clone()
            images[params.flip] = images[params.flip].flip(-1)
        return images.contiguous()
