"""Deterministic batch iteration over an ImageSet, shardable across DDP ranks and resumable mid-epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .augment import AugmentParams, CropFlip
from .imageset import ImageSet


@dataclass
class Batch:
    x: torch.Tensor  # float32 normalized NCHW
    y: torch.Tensor  # int64
    index: torch.Tensor  # int64 positions in the ImageSet
    variant: torch.Tensor  # int64 augmentation variant of each image (0 without a bank)


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
        variants: int = 0,
        bank_seed: int = 0,
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
        # variants > 0: every image has a fixed bank of `variants` augmentations and each epoch uses one of
        # them (fast knowledge distillation, Shen & Xing 2021), so teacher outputs per variant can be cached
        self.variants = variants
        self.bank_seed = bank_seed  # separate from `seed` so runs with different seeds share one bank (and cache)
        self._bank: AugmentParams | None = None

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
        for batch in self.iterate_batches(start_step):
            yield batch.x, batch.y

    def iterate_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches with the image indices and augmentation variants they were made from."""
        order = self.order()
        variant = self.epoch_variants()
        # augmentation parameters for the whole epoch, drawn once so they do not depend on the start step
        params = None
        if self.augment is not None and not self.variants:
            params = self.augment.sample(len(order), self._generator_for_augment())
        for step in range(start_step, len(self)):
            chunk = torch.arange(step * self.global_batch, min((step + 1) * self.global_batch, len(order)))
            mine = chunk[self.rank :: self.world_size]
            idx = order[mine]
            raw = self.images.get_batch(idx)
            if self.augment is not None:
                raw = self.augment.apply(raw, _take(params, mine) if params is not None else self.bank_params(idx, variant[idx]))
            yield Batch(self.normalize(raw), self.images.labels[idx], idx, variant[idx])

    def epoch_variants(self) -> torch.Tensor:
        """Variant of every image this epoch: each image cycles through all its variants, from its own offset."""
        n = len(self.images)
        if not self.variants or self.augment is None:
            return torch.zeros(n, dtype=torch.int64)
        offset = torch.randint(0, self.variants, (n,), generator=torch.Generator().manual_seed(self.seed + 99_991))
        return (offset + self.epoch) % self.variants

    def bank_params(self, index: torch.Tensor, variant: torch.Tensor) -> AugmentParams:
        """The augmentation parameters of (image, variant) pairs; a pure function of the seed."""
        if self._bank is None:
            n, k = len(self.images), self.variants
            flat = self.augment.sample(n * k, torch.Generator().manual_seed(self.bank_seed * 1_000_003 + 5_555_555))
            self._bank = AugmentParams(flat.dx.view(n, k), flat.dy.view(n, k), flat.flip.view(n, k))
        return AugmentParams(self._bank.dx[index, variant], self._bank.dy[index, variant], self._bank.flip[index, variant])

    def _generator_for_augment(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)


def _take(params, positions: torch.Tensor):
    return type(params)(params.dx[positions], params.dy[positions], params.flip[positions])
