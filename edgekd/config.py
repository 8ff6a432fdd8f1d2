"""Training configuration: typed dataclasses, strict YAML round-trip (unknown keys are errors)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgekdError


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05  # for a global batch of 128; scale linearly for other batch sizes
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    # the lr of everything but the final classifier is scaled by this: < 1 fine-tunes a pretrained body gently
    body_lr_scale: float = 1.0

    def __post_init__(self):
        _choice("optimizer", self.optimizer, ("sgd", "adamw"))
        _choice("schedule", self.schedule, ("cosine", "constant"))
        if self.lr <= 0:
            raise EdgekdError(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise EdgekdError("weight_decay, warmup_epochs and grad_clip must be >= 0")
        if not 0.0 < self.body_lr_scale <= 1.0:
            raise EdgekdError(f"body_lr_scale must be in (0, 1], got {self.body_lr_scale}")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    data: str = "fashion-mnist"
    target: str | None = None  # sets resolution, channels and model options
    resolution: int | None = None  # None: the target's, else 32
    channels: int | None = None  # None: the target's, else 3
    limit: int | None = None  # cap on training images (quick runs)
    val_fraction: float = 0.1
    # unreadable image files are skipped (listed in the run's skipped-files.txt, at most
    # edgekd.data.sources.MAX_UNREADABLE_FRACTION of a folder); strict: the first one stops the load
    strict_data: bool = False
    student: str = "mobilenetv3_small_050"
    student_options: dict = field(default_factory=dict)
    # the student is the teacher's architecture and weights with these blocks deleted/inserted (edgekd.models.edit)
    student_edit: str = ""
    student_init: str = "default"  # default | xavier | normal:MEAN,STD | constant:VALUE (edgekd.models.init)
    teacher: str | None = "resnet18"  # zoo name (trained first), checkpoint path or run dir; None: no teacher
    teacher_options: dict = field(default_factory=dict)
    teacher_pretrained: bool = False  # start the teacher from offline ImageNet weights (efficientnet_lite0)
    teacher_epochs: int = 10
    teacher_optim: OptimConfig = field(default_factory=OptimConfig)
    # the teacher is trained and queried at this resolution (>= the student's); the student gets the same
    # augmented view resized to its own. None: the student's resolution
    teacher_resolution: int | None = None
    # cached teacher outputs (logits, and the feature maps a method's teacher_needs tap):
    # see edgekd/distill/teacher_outputs.py
    teacher_cache: str = "auto"  # auto (memory if within budget, else live) | memory | disk | off
    teacher_cache_dir: str | None = None  # disk caches; default ~/.cache/edgekd/teacher-outputs
    teacher_cache_variants: int = 0  # augmentations kept per image; 0: one per epoch (as without a cache)
    teacher_cache_budget_mb: int = 2048
    teacher_fold_bn: bool = True
    teacher_autocast: str = "off"  # off | bf16 | fp16 (CUDA)
    teacher_compile: bool = False
    method: str = "kd"
    method_options: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128  # global batch, split across DDP ranks
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many forward passes
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: bool = True
    # on top of crop/flip (student training; see edgekd/data/augment.py): RandAugment N ops at magnitude M/10,
    # and mixup/cutmix per image (alpha 0 = off) mixed with probability mix_prob
    randaug_ops: int = 0
    randaug_magnitude: int = 9
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    # label-scarce training: keep N labels per class (or a fraction < 1); unlabeled images from another source
    # or "rest" (the withheld ones) are distilled from the teacher, never seen by a label loss
    labels_per_class: float | None = None
    unlabeled: str | None = None
    seed: int = 0  # initialisation, batch order, augmentation
    split_seed: int = 0  # train/val/test split and --limit subset, fixed so runs with different seeds compare
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)
    channels_last: bool = True  # on CUDA
    checkpoint_interval_s: float = 300.0  # mid-epoch checkpoints at most this often

    def __post_init__(self):
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("teacher_cache", self.teacher_cache, ("auto", "memory", "disk", "off"))
        _choice("teacher_autocast", self.teacher_autocast, ("off", "bf16", "fp16"))
        if self.teacher_cache_variants < 0 or self.teacher_cache_budget_mb < 1:
            raise EdgekdError("teacher_cache_variants must be >= 0 and teacher_cache_budget_mb >= 1")
        for name in ("epochs", "batch_size", "micro_batches"):
            if getattr(self, name) < 1:
                raise EdgekdError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.teacher_epochs < 0:
            raise EdgekdError(f"teacher_epochs must be >= 0, got {self.teacher_epochs}")
        if self.batch_size % self.micro_batches:
            raise EdgekdError(f"batch_size {self.batch_size} is not divisible by micro_batches {self.micro_batches}")
        if self.limit is not None and self.limit < 1:
            raise EdgekdError(f"limit must be >= 1, got {self.limit}")
        if not 0 <= self.randaug_ops <= 4 or not 0 <= self.randaug_magnitude <= 10:
            raise EdgekdError(f"randaug_ops must be in 0..4 and randaug_magnitude in 0..10, got "
                              f"{self.randaug_ops} and {self.randaug_magnitude}")
        if self.mixup < 0 or self.cutmix < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise EdgekdError(f"mixup and cutmix alphas must be >= 0 and mix_prob in [0, 1], got mixup={self.mixup}, "
                              f"cutmix={self.cutmix}, mix_prob={self.mix_prob}")
        if self.teacher_resolution is not None and self.teacher_resolution < 8:
            raise EdgekdError(f"teacher_resolution must be >= 8 pixels, got {self.teacher_resolution}")
        if self.unlabeled is not None and self.teacher is None:
            raise EdgekdError("unlabeled images are learned from the teacher's outputs: pass --teacher")
        from .models.init import parse_init

        if parse_init(self.student_init).scheme != "default" and self.student_edit:
            raise EdgekdError("student_init and student_edit exclude each other: an edited student inherits the teacher's weights")
        if self.student_edit:
            from .models.edit import parse_edit

            parse_edit(self.student_edit)
            if not self.teacher:
                raise EdgekdError("student_edit makes the student from the teacher: pass --teacher")

    @property
    def mix(self):
        """The mixup/cutmix policy, or None when both are off."""
        from .data.augment import Mix

        if self.mixup == 0 and self.cutmix == 0:
            return None
        return Mix(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.mix_prob)

    @property
    def randaug(self):
        from .data.augment import RandAugment

        return RandAugment(self.randaug_ops, self.randaug_magnitude) if self.randaug_ops else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        return _build(cls, data, source)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise EdgekdError(f"{path} does not exist: pass a run directory written by `edgekd train`") from None
        except yaml.YAMLError as e:
            raise EdgekdError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix or delete it") from None
        if not isinstance(data, dict):
            raise EdgekdError(f"{path} must hold a mapping of config keys")
        return cls.from_dict(data, str(path))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise EdgekdError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")


def _build(cls, data: dict[str, Any], source: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise EdgekdError(f"{source}: unknown key '{key}'{hint}")
        if known[key].type in ("OptimConfig", OptimConfig) and isinstance(value, dict):
            value = _build(OptimConfig, value, f"{source}:{key}")
        kwargs[key] = value
    return cls(**kwargs)
