"""Deterministic batch iteration over an ImageSet, shardable across DDP ranks and resumable mid-epoch."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .augment import Augmentation, CropFlip, Mix, RandAugment, ViewParams, map_params
from .imageset import ImageSet

UNLABELED = -1  # the label of images whose label is unknown (or withheld): no label loss ever sees them


@dataclass
class Batch:
    x: torch.Tensor  # float32 normalized NCHW
    y: torch.Tensor  # int64; UNLABELED (-1) for unlabeled images
    index: torch.Tensor  # int64 positions in the ImageSet
    variant: torch.Tensor  # int64 augmentation variant of each image (0 without a bank)
    # the teacher's view of the same augmented image at its own resolution, normalised on first use of
    # `teacher_x` (a batch served from the teacher cache never needs it)
    teacher_view: Callable[[], torch.Tensor] | None = None
    # mixup/cutmix: the partner's label and the image's own weight; the label term is
    # lam * CE(y) + (1 - lam) * CE(y_partner)
    y_partner: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    _teacher_x: torch.Tensor | None = field(default=None, repr=False)

    @property
    def teacher_x(self) -> torch.Tensor | None:
        """The teacher's input (None: the teacher takes `x`)."""
        if self._teacher_x is None and self.teacher_view is not None:
            self._teacher_x = self.teacher_view()
        return self._teacher_x

    @property
    def mix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.lam is None else (self.y_partner, self.lam)


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
        randaug: RandAugment | None = None,
        mix: Mix | None = None,
        resolution: int | None = None,
        teacher_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
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
        # RandAugment and mixup/cutmix come on top of the data's crop/flip (training options, not data facts)
        self.policy = Augmentation(augment, randaug, mix) if augment is not None else None
        # images are augmented at their stored resolution; the model's view is resized to `resolution`
        self.resolution = resolution
        self.teacher_mean = self.teacher_std = None
        if teacher_norm is not None:  # also yield the teacher's view (stored resolution, its normalisation)
            self.teacher_mean = torch.tensor(teacher_norm[0], dtype=torch.float32).view(1, -1, 1, 1)
            self.teacher_std = torch.tensor(teacher_norm[1], dtype=torch.float32).view(1, -1, 1, 1)
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # variants > 0: every image has a fixed bank of `variants` augmentations and each epoch uses one of
        # them (fast knowledge distillation, Shen & Xing 2021), so teacher outputs per variant can be cached
        self.variants = variants
        self.bank_seed = bank_seed  # separate from `seed` so runs with different seeds share one bank (and cache)
        self._bank: ViewParams | None = None

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

    def normalize(self, images: torch.Tensor, mean: torch.Tensor | None = None,
                  std: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (or float in 0..255) images -> the model's normalised float input."""
        mean = self.mean if mean is None else mean
        std = self.std if std is None else std
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images / 255.0
        if x.shape[1] == 1 and self.channels == 3:
            if bool((mean == mean[:, :1]).all() and (std == std[:, :1]).all()):
                # grey stored, equal statistics: normalise one channel, then copy it (a third of the arithmetic)
                return ((x - mean[:, :1]) / std[:, :1]).expand(-1, 3, -1, -1).contiguous()
            x = x.expand(-1, 3, -1, -1)
        return (x - mean) / std

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
        if self.policy is not None and not self.variants:
            params = self._sample(len(order), self._generator_for_augment())
        for step in range(start_step, len(self)):
            chunk = torch.arange(step * self.global_batch, min((step + 1) * self.global_batch, len(order)))
            mine = chunk[self.rank :: self.world_size]
            idx = order[mine]
            yield self.make_batch(idx, variant[idx], _take(params, mine) if params is not None else None)

    def make_batch(self, idx: torch.Tensor, variant: torch.Tensor, params: ViewParams | None = None) -> Batch:
        """The batch of images `idx`: augmented with `params`, or their bank variants, or not at all."""
        labels = self.images.labels[idx]
        if self.policy is None:
            view = self.images.get_batch(idx)
        else:
            params = params if params is not None else self.bank_params(idx, variant)
            view = self.policy.apply(self.images.get_batch, idx, params)
        teacher_x = None
        if self.teacher_mean is not None:
            teacher_x = partial(self.normalize, view, self.teacher_mean, self.teacher_std)
        if self.resolution is not None and view.shape[-1] != self.resolution:
            view = F.interpolate(view.float(), size=(self.resolution, self.resolution), mode="bilinear",
                                 align_corners=False, antialias=True)
        batch = Batch(self.normalize(view), labels, idx, variant, teacher_x)
        if params is not None and params.mix is not None:
            batch.y_partner = self.images.labels[params.mix.partner]
            batch.lam = params.mix.lam
        return batch

    def _sample(self, n: int, generator: torch.Generator) -> ViewParams:
        size = tuple(  # CutMix boxes are drawn in pixels of the stored images (all the same size)
            self.images.get_batch(torch.zeros(1, dtype=torch.int64)).shape[-2:])
        return self.policy.sample(n, len(self.images), size, generator)

    def epoch_variants(self) -> torch.Tensor:
        """Variant of every image this epoch: each image cycles through all its variants, from its own offset."""
        n = len(self.images)
        if not self.variants or self.augment is None:
            return torch.zeros(n, dtype=torch.int64)
        offset = torch.randint(0, self.variants, (n,), generator=torch.Generator().manual_seed(self.seed + 99_991))
        return (offset + self.epoch) % self.variants

    def bank_params(self, index: torch.Tensor, variant: torch.Tensor) -> ViewParams:
        """The augmentation parameters of (image, variant) pairs; a pure function of the bank seed: the mix
        partner and lambda are part of them, so a mixed view replays exactly."""
        if self._bank is None:
            n, k = len(self.images), self.variants
            flat = self._sample(n * k, torch.Generator().manual_seed(self.bank_seed * 1_000_003 + 5_555_555))
            self._bank = map_params(flat, lambda t: t.view(n, k, *t.shape[1:]))
        return map_params(self._bank, lambda t: t[index, variant])

    def _generator_for_augment(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)


def _take(params, positions: torch.Tensor):
    return map_params(params, lambda t: t[positions])
