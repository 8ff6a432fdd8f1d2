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


class LabelsReplaced:
    """An image set whose labels are replaced (e.g. all UNLABELED), images served by the wrapped set."""

    def __init__(self, base: ImageSet, labels: torch.Tensor):
        if len(labels) != len(base):
            raise ValueError("labels and images differ in length")
        self.base = base
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.base.get_batch(indices)


class ConcatImageSet:
    """Several image sets (same resolution and channels) as one: index i of part k is offset_k + i."""

    def __init__(self, parts: list[ImageSet]):
        self.parts = [p for p in parts if len(p)]
        self.labels = torch.cat([p.labels for p in self.parts])
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        out = None
        for part, start, end in zip(self.parts, self.offsets, self.offsets[1:]):
            inside = (indices >= start) & (indices < end)
            if not bool(inside.any()):
                continue
            images = part.get_batch(indices[inside] - start)
            if out is None:
                out = images.new_empty((len(indices), *images.shape[1:]))
            out[inside] = images
        return out
