"""Image sets: uint8 images at the training resolution plus integer labels.

Small datasets are held as one in-memory tensor so the CPU cores are spent on training, not decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class ImageSet(Protocol):
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) for the given int64 indices."""
        ...


@dataclass
class TensorImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), already at the training resolution
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]

    def subset(self, indices: torch.Tensor) -> "TensorImageSet":
        return TensorImageSet(self.images[indices], self.labels[indices])
