"""`load_data`: a source spec -> train/val/test ImageSets at the training resolution, stats and loaders.

Everything is decided once at load: resizing (antialiased bilinear, rounded back to uint8), splits
(stratified, deterministic in `seed`), normalization statistics (exact, from the train split's histogram).
Grey sources stay 1-channel in memory; BatchLoader expands them when the model wants 3 channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import EdgekdError
from .augment import CropFlip, Mix, RandAugment
from .imageset import ConcatImageSet, ImageSet, LabelsReplaced, TensorImageSet
from .loader import UNLABELED, BatchLoader
from .sources import DEFAULT_CACHE_DIR, DEFAULT_MEMORY_BUDGET, LoadContext, SourceData, load_source

SPLITS = ("train", "val", "test")
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024
STATS_SAMPLE = 4096  # images decoded for mean/std when the train split is lazy (decoding all could take hours)
# separate random streams so e.g. changing val_fraction does not reshuffle the test split
_STREAM_TEST, _STREAM_VAL, _STREAM_LIMIT, _STREAM_STATS, _STREAM_LABELS = 1, 2, 3, 4, 5
UNLABELED_REST = "rest"  # --unlabeled rest: the train images whose labels --labels-per-class withheld


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    source_channels: int


@dataclass
class DataModule:
    info: DatasetInfo
    train: ImageSet
    val: ImageSet
    test: ImageSet
    resolution: int
    channels: int  # what the model gets
    mean: tuple[float, ...]  # length == channels, in [0, 1] pixel units
    std: tuple[float, ...]
    augment: CropFlip | None
    spec: str = ""
    seed: int = 0
    # indices of each split into the source split it was cut from (see `split_origin`)
    split_indices: dict[str, torch.Tensor] = field(default_factory=dict)
    split_origin: dict[str, str] = field(default_factory=dict)  # e.g. {"val": "train", "test": "test"}
    lazy: bool = False  # images decoded from files per batch (imagefolder above the memory budget)
    # images used without labels (label UNLABELED): from --unlabeled, at this resolution and stored channels
    unlabeled: ImageSet | None = None
    labels_per_class: float | None = None  # what kept only part of the train labels (None: all kept)
    unlabeled_spec: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of unreadable image files left out (imagefolder)

    def split(self, name: str) -> ImageSet:
        if name not in SPLITS:
            raise EdgekdError(f"unknown split '{name}'; use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool | None = None,
        augment: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        variants: int = 0,
        bank_seed: int = 0,
        randaug: RandAugment | None = None,
        mix: Mix | None = None,
        with_unlabeled: bool = False,
        resolution: int | None = None,
        teacher_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> BatchLoader:
        """Shuffle and augment default to on for "train" and off otherwise.

        Under DDP pass drop_last=True for training: otherwise the last global batch can leave a rank with
        a smaller (even empty) shard. `with_unlabeled` appends the unlabeled images to the train split (label
        UNLABELED). `resolution`, `mean`/`std` and `teacher_norm` serve another module's model from these images:
        the student's view resized to its resolution and normalisation, the teacher's view as stored."""
        images = self.split(split)
        if with_unlabeled and split == "train" and self.unlabeled is not None:
            images = ConcatImageSet([images, self.unlabeled])
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        is_train = split == "train"
        use_augment = is_train if augment is None else augment
        return BatchLoader(
            images,
            batch_size,
            mean=self.mean if mean is None else mean,
            std=self.std if std is None else std,
            channels=self.channels,
            shuffle=is_train if shuffle is None else shuffle,
            augment=self.augment if use_augment else None,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            variants=variants,
            bank_seed=bank_seed,
            randaug=randaug,
            mix=mix,
            resolution=resolution,
            teacher_norm=teacher_norm,
        )

    def describe(self) -> dict:
        return {
            "name": self.info.name,
            "spec": self.spec,
            "num_classes": self.info.num_classes,
            "class_names": list(self.info.class_names),
            "sizes": {s: len(self.split(s)) for s in SPLITS},
            "split_origin": dict(self.split_origin),
            "seed": self.seed,
            "resolution": self.resolution,
            "channels": self.channels,
            "source_channels": self.info.source_channels,
            "mean": [round(m, 6) for m in self.mean],
            "std": [round(s, 6) for s in self.std],
            "augment": None if self.augment is None else {"pad": self.augment.pad, "hflip": self.augment.hflip},
            "storage": "lazy" if self.lazy else "memory",
            **({"labels_per_class": self.labels_per_class} if self.labels_per_class is not None else {}),
            **({"unlabeled": {"spec": self.unlabeled_spec, "images": len(self.unlabeled)}}
               if self.unlabeled is not None else {}),
        }


# ---------------------------------------------------------------- image ops

def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, resolution, resolution): antialiased bilinear on float, rounded back."""
    n, c, h, w = images.shape
    if (h, w) == (resolution, resolution):
        return images
    out = torch.empty((n, c, resolution, resolution), dtype=torch.uint8)
    # ~2M pixels per call: bounded float memory, few enough calls that intra-op thread sync stays cheap
    # (256-image chunks took 6-11 s instead of 0.4 s for 60k 28->32 when other processes shared the 2 cores)
    chunk = max(1, (1 << 21) // (c * max(h * w, resolution * resolution)))
    for i in range(0, n, chunk):
        x = images[i : i + chunk].float()
        y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = y.round_().clamp_(0, 255)
    return out


def rgb_to_grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, 1, H, W) with ITU-R 601 luma weights (what PIL's convert("L") uses)."""
    out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for i in range(0, len(images), 4096):
        out[i : i + 4096] = (images[i : i + 4096].float() * w).sum(1, keepdim=True).round_().clamp_(0, 255)
    return out


def channel_histograms(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> int64 (C, 256) pixel-value counts."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])])


def stats_from_histograms(hist: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] units (counting pixel values avoids float accumulation error)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    h = hist.to(torch.float64)
    total = h.sum(1)
    mean = (h * values).sum(1) / total
    var = (h * (values[None, :] - mean[:, None]) ** 2).sum(1) / total
    return tuple(mean.tolist()), tuple(var.clamp(min=0).sqrt().tolist())


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return stats_from_histograms(channel_histograms(images))


def _lazy_stats(images: ImageSet, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = torch.randperm(len(images), generator=_generator(seed, _STREAM_STATS))[:STATS_SAMPLE].sort().values
    hist = None
    for chunk in sample.split(256):  # bounded memory even at 1024 px
        h = channel_histograms(images.get_batch(chunk))
        hist = h if hist is None else hist + h
    return stats_from_histograms(hist)


# ---------------------------------------------------------------- splits

def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def stratified_pick(labels: torch.Tensor, n_pick: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..N-1 into (rest, picked) with len(picked) == n_pick, classes in proportion.

    Per-class quotas use largest remainders, so totals are exact and every class keeps its share (+-1).
    Both outputs are sorted."""
    n = len(labels)
    n_pick = max(0, min(n, n_pick))
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = counts.to(torch.float64) * n_pick / max(n, 1)
    k = quota.floor().to(torch.int64)
    short = n_pick - int(k.sum())
    if short > 0:
        remainder = quota - k
        order = torch.argsort(-remainder, stable=True)  # ties -> lower class id, deterministic
        k[order[:short]] += 1
    perm = torch.randperm(n, generator=generator)
    # rank of each permuted element within its class; the first k[class] of each class are picked
    cls = inverse[perm]
    by_class = torch.argsort(cls, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - starts[cls[by_class]]
    chosen = rank < k[cls]
    picked = perm[chosen].sort().values
    rest = perm[~chosen].sort().values
    return rest, picked


def _count(fraction: float, n: int) -> int:
    return int(round(fraction * n))


# ---------------------------------------------------------------- load_data

def _validate(resolution: int, channels: int, val_fraction: float, test_fraction: float, limit: int | None) -> None:
    valid_type = isinstance(resolution, int) and not isinstance(resolution, bool)
    if not valid_type or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise EdgekdError(f"resolution {resolution} out of range; use {MIN_RESOLUTION}..{MAX_RESOLUTION} pixels")
    if channels not in (1, 3):
        raise EdgekdError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise EdgekdError(f"{name} must be in [0, 1), got {f}")
    if limit is not None and limit < 1:
        raise EdgekdError(f"limit must be a positive number of train images, got {limit}")


def _to_imageset(images, labels: torch.Tensor, resolution: int, channels: int) -> ImageSet:
    if not isinstance(images, torch.Tensor):
        return images  # lazy: decoded at the resolution and channel count already
    if channels == 1 and images.shape[1] == 3:
        images = rgb_to_grey(images)  # before resizing: a third of the work
    return TensorImageSet(resize_uint8(images, resolution), labels)


def load_data(
    spec: str,
    *,
    resolution: int,
    channels: int = 3,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
    root: Path | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    labels_per_class: float | None = None,
    unlabeled: str | None = None,
    strict: bool = False,
) -> DataModule:
    """Load `spec` (see edgekd.data.sources) into a DataModule.

    val is carved from train (stratified); sources without a test split get a stratified test split first
    (test_fraction of all images). `limit` caps the train split (stratified), leaving val/test as they are so
    quick runs are scored on the same images as full ones. `root` is where downloads are cached
    (default $EDGEKD_CACHE_DIR, else ~/.cache/edgekd). `memory_budget` (bytes) decides in-memory vs lazy for imagefolder.
    `labels_per_class` (N >= 1 images per class, or a fraction < 1 of the train split, stratified) keeps only
    those labels; `unlabeled` adds images without labels: another source's train split (its labels ignored),
    or "rest" for the train images whose labels were withheld. Image files that cannot be decoded are left
    out and listed in `skipped` (at most sources.MAX_UNREADABLE_FRACTION of them); `strict` makes one an error.
    """
    _validate(resolution, channels, val_fraction, test_fraction, limit)
    _validate_label_options(labels_per_class, unlabeled)
    ctx = LoadContext(resolution, channels, memory_budget, Path(root) if root is not None else DEFAULT_CACHE_DIR,
                      strict=strict)
    source: SourceData = load_source(spec, ctx)
    sets = _image_sets(spec, source, resolution, channels)
    splits = _split(sets, seed, val_fraction, test_fraction, limit, labels_per_class)
    train = splits.train_all.subset(splits.train_idx) if len(splits.train_idx) < len(splits.train_all) else splits.train_all
    fixes = {"train": "lower val_fraction/test_fraction", "val": "raise val_fraction", "test": "raise test_fraction"}
    for name, part in (("train", train), ("val", splits.val), ("test", splits.test)):
        if len(part) == 0:
            raise EdgekdError(
                f"the {name} split of {spec} is empty ({len(splits.train_all)} train images, val_fraction={val_fraction}, "
                f"test_fraction={test_fraction}); add images or {fixes[name]}"
            )
    lazy = not isinstance(train, TensorImageSet)
    mean, std = _normalisation(spec, train, seed, channels, source.channels)
    return DataModule(
        info=DatasetInfo(source.name, len(source.class_names), tuple(source.class_names), source.channels),
        train=train,
        val=splits.val,
        test=splits.test,
        resolution=resolution,
        channels=channels,
        mean=mean,
        std=std,
        augment=CropFlip(pad=resolution // 8, hflip=source.hflip),
        spec=spec,
        seed=seed,
        split_indices=splits.indices,
        split_origin=splits.origin,
        lazy=lazy,
        unlabeled=_unlabeled_set(unlabeled, splits, train, ctx),
        labels_per_class=labels_per_class,
        unlabeled_spec=unlabeled,
        skipped=source.skipped,
    )


def _image_sets(spec: str, source: SourceData, resolution: int, channels: int) -> dict[str, ImageSet]:
    """The source's splits as image sets at the training resolution, labels checked against the classes."""
    num_classes = len(source.class_names)
    for s, part in source.splits.items():
        if len(part) and int(part.labels.max()) >= num_classes:
            top = int(part.labels.max())
            raise EdgekdError(f"{spec}: {s} label {top} >= {num_classes} classes; the data is corrupt")
    return {s: _to_imageset(p.images, p.labels, resolution, channels) for s, p in source.splits.items()}


@dataclass
class _Splits:
    train_all: ImageSet  # the source's train split; train/val (and test, without a source test split) index it
    train_idx: torch.Tensor
    val: ImageSet
    test: ImageSet
    indices: dict[str, torch.Tensor]
    origin: dict[str, str]
    withheld: torch.Tensor | None  # train images whose labels labels_per_class withheld


def _split(sets: dict[str, ImageSet], seed: int, val_fraction: float, test_fraction: float, limit: int | None,
           labels_per_class: float | None) -> _Splits:
    """Test (when the source has none), then val, carved stratified from train; then the limit and the labels kept."""
    indices: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    train_all = sets["train"]
    train_idx = torch.arange(len(train_all))
    if "test" in sets:
        test = sets["test"]
        indices["test"], origin["test"] = torch.arange(len(test)), "test"
    else:
        train_idx, test_idx = stratified_pick(
            train_all.labels, _count(test_fraction, len(train_all)), _generator(seed, _STREAM_TEST)
        )
        test = train_all.subset(test_idx)
        indices["test"], origin["test"] = test_idx, "train"
    if "val" in sets:
        val = sets["val"]
        indices["val"], origin["val"] = torch.arange(len(val)), "val"
    else:
        keep, pick = stratified_pick(
            train_all.labels[train_idx], _count(val_fraction, len(train_idx)), _generator(seed, _STREAM_VAL)
        )
        indices["val"], origin["val"] = train_idx[pick], "train"
        train_idx = train_idx[keep]
        val = train_all.subset(indices["val"])
    if limit is not None and limit < len(train_idx):
        _, pick = stratified_pick(train_all.labels[train_idx], limit, _generator(seed, _STREAM_LIMIT))
        train_idx = train_idx[pick]
    withheld = None
    if labels_per_class is not None:
        train_idx, withheld = _keep_labels(train_all.labels, train_idx, labels_per_class, seed)
    indices["train"], origin["train"] = train_idx, "train"
    return _Splits(train_all, train_idx, val, test, indices, origin, withheld)


def _normalisation(spec: str, train: ImageSet, seed: int, channels: int,
                   source_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the train split, for the channels the model gets."""
    lazy = not isinstance(train, TensorImageSet)
    mean, std = _lazy_stats(train, seed) if lazy else channel_stats(train.images)
    stored = 1 if channels == 1 or source_channels == 1 else 3
    if stored == 1 and channels == 3:  # BatchLoader expands grey to 3 identical channels
        mean, std = mean * 3, std * 3
    if min(std) == 0.0:
        raise EdgekdError(f"the train split of {spec} has constant pixels (std 0); the images are blank or corrupt")
    return mean, std


def _unlabeled_set(unlabeled: str | None, splits: _Splits, train: ImageSet, ctx: LoadContext) -> ImageSet | None:
    if unlabeled is None:
        return None
    if unlabeled == UNLABELED_REST:
        if splits.withheld is None or len(splits.withheld) == 0:
            raise EdgekdError("--unlabeled rest uses the train images whose labels --labels-per-class withheld; "
                              "there are none: pass --labels-per-class N")
        rest = splits.train_all.subset(splits.withheld)
        return LabelsReplaced(rest, torch.full((len(rest),), UNLABELED))
    stored_channels = train.images.shape[1] if isinstance(train, TensorImageSet) else None
    return _load_unlabeled(unlabeled, ctx, stored_channels)


def _validate_label_options(labels_per_class: float | None, unlabeled: str | None) -> None:
    if labels_per_class is not None:
        if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, (int, float)) or labels_per_class <= 0:
            raise EdgekdError(f"labels_per_class must be a count >= 1 or a fraction in (0, 1), got {labels_per_class!r}")
        if labels_per_class >= 1 and labels_per_class != int(labels_per_class):
            raise EdgekdError(f"labels_per_class {labels_per_class} is neither a whole count nor a fraction below 1")
    if unlabeled is not None and not str(unlabeled).strip():
        raise EdgekdError("--unlabeled is empty: pass a data source (e.g. imagefolder:PATH) or 'rest'")


def _keep_labels(labels: torch.Tensor, train_idx: torch.Tensor, per_class: float,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, withheld) train indices: N per class (every class keeps min(N, its count)) or a stratified fraction."""
    generator = _generator(seed, _STREAM_LABELS)
    sub = labels[train_idx]
    if per_class < 1:
        rest, keep = stratified_pick(sub, _count(per_class, len(sub)), generator)
        if len(keep) == 0:
            raise EdgekdError(f"labels_per_class {per_class} keeps no label of {len(sub)} train images: raise it")
        return train_idx[keep], train_idx[rest]
    perm = torch.randperm(len(sub), generator=generator)
    keep = torch.zeros(len(sub), dtype=torch.bool)
    for c in torch.unique(sub):
        members = perm[sub[perm] == c]
        keep[members[: int(per_class)]] = True
    return train_idx[keep], train_idx[~keep]


def _load_unlabeled(spec: str, ctx: LoadContext, stored_channels: int | None) -> ImageSet:
    """Another source's train split as unlabeled images, converted to the labelled images' stored channels."""
    try:
        source = load_source(spec, ctx)
    except EdgekdError as e:
        raise EdgekdError(f"--unlabeled {spec}: {e}") from None
    images = source.splits["train"].images
    if not isinstance(images, torch.Tensor) or stored_channels is None:
        raise EdgekdError(f"--unlabeled {spec}: unlabeled images must fit in memory beside labelled in-memory data; "
                          "use a smaller folder (or fewer images)")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise EdgekdError(f"--unlabeled {spec}: images with {images.shape[1] if images.ndim == 4 else '?'} channels "
                          "cannot be converted; use grey (1) or RGB (3) images")
    if stored_channels == 1 and images.shape[1] == 3:
        images = rgb_to_grey(images)
    elif stored_channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    images = resize_uint8(images, ctx.resolution)
    return TensorImageSet(images, torch.full((len(images),), UNLABELED, dtype=torch.int64))
