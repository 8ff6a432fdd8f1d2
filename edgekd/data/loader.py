"""Deterministic batch iteration over an ImageSet, shardable across DDP ranks and resumable mid-epoch."""
from __future__ import annotations

from typing import Iterator

import torch

from .augment import CropFlip
from .imageset import ImageSet


class BatchLoader:
    """Yields (x float32 normalized NCHW, y int64) batches.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run
    would. Under DDP every rank walks the same permutation and takes a strided shard of each global batch,
    so `world_size` ranks with `batch_size` each see the same global batch as one process with
    `batch_size * world_size`.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels: int,
        shuffle: bool = False,
        augment: CropFlip | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.images = images
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels = channels
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n = len(self.images)
        if self.drop_last:
            return n // self.global_batch
        return -(-n // self.global_batch)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def order(self) -> torch.Tensor:
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=self._generator())

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(start_step=0)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        # augmentation parameters for the whole epoch, drawn once so they do not depend on the start step
        params = self.augment.sample(len(order), self._generator_for_augment()) if self.augment else None
        for step in range(start_step, len(self)):
            chunk = torch.arange(step * self.global_batch, min((step + 1) * self.global_batch, len(order)))
            mine = chunk[self.rank :: self.world_size]
            idx = order[mine]
            raw = self.images.get_batch(idx)
            if params is not None:
                raw = self.augment.apply(raw, _take(params, mine))
            yield self.normalize(raw), self.images.labels[idx]

    def _generator_for_augment(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)


def _take(params, positions: torch.Tensor):
    return type(params)(params.dx[positions], params.dy[positions], params.flip[positions])
