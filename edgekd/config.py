"""Training configuration: typed dataclasses, strict YAML round-trip (validate.py: unknown keys are errors)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgekdError
from .validate import build, check, setting

CONTEXT = "config"  # what a config error names when there is no file


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = setting("sgd", choices=("sgd", "adamw"))
    # for a global batch of 128; scale linearly for other batch sizes
    lr: float = setting(0.05, above=0, hint="the peak learning rate")
    momentum: float = 0.9
    weight_decay: float = setting(5e-4, at_least=0)
    warmup_epochs: float = setting(1.0, at_least=0)
    # step: x0.1 at 30%, 60% and 90% of the phase (SSKD's stage schedule)
    schedule: str = setting("cosine", choices=("cosine", "constant", "step"))
    grad_clip: float = setting(0.0, at_least=0, hint="max global gradient norm; 0 disables")
    # the lr of everything but the final classifier is scaled by this: < 1 fine-tunes a pretrained body gently
    body_lr_scale: float = setting(1.0, above=0, at_most=1)

    def __post_init__(self):
        check(self, context=CONTEXT)


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    data: str = "fashion-mnist"
    target: str | None = None  # sets resolution, channels and model options
    resolution: int | None = None  # None: the target's, else 32
    channels: int | None = None  # None: the target's, else 3
    limit: int | None = setting(None, at_least=1, hint="cap on training images (quick runs)")
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
    teacher_epochs: int = setting(10, at_least=0)
    teacher_optim: OptimConfig = field(default_factory=OptimConfig)
    # the teacher is trained and queried at this resolution (>= the student's); the student gets the same
    # augmented view resized to its own. None: the student's resolution
    teacher_resolution: int | None = setting(None, at_least=8, hint="pixels")
    # cached teacher outputs (logits, and the feature maps a method's teacher_needs tap), see
    # edgekd/distill/teacher_outputs.py; auto: in memory if within budget, else on disk if it has room, else the
    # teacher runs live
    teacher_cache: str = setting("auto", choices=("auto", "memory", "disk", "off"))
    teacher_cache_dtype: str = setting("float32", choices=("float32", "float16"))  # float16: half the bytes
    teacher_cache_dir: str | None = None  # disk caches; default ~/.cache/edgekd/teacher-outputs
    # augmentations kept per image; 0: one per epoch of the phases served (as without a cache); no cache, no bank
    teacher_cache_variants: int = setting(0, at_least=0)
    teacher_cache_budget_mb: int = setting(2048, at_least=1)
    teacher_fold_bn: bool = True
    teacher_autocast: str = setting("off", choices=("off", "bf16", "fp16"))  # fp16: CUDA only
    teacher_compile: bool = False
    # the method when a teacher is given: DKD won the 8-epoch schedule of docs/benchmarks.md "Distillation pays"
    method: str = "dkd"
    method_options: dict = field(default_factory=dict)
    epochs: int = setting(10, at_least=1)
    batch_size: int = setting(128, at_least=1, hint="global batch, split across DDP ranks")
    # gradient accumulation: the global batch is split into this many forward passes
    micro_batches: int = setting(1, at_least=1)
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
    labels_per_class: int | float | None = None  # a count stays an int
    unlabeled: str | None = None
    seed: int = 0  # initialisation, batch order, augmentation
    split_seed: int = 0  # train/val/test split and --limit subset, fixed so runs with different seeds compare
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)
    channels_last: bool = True  # on CUDA
    checkpoint_interval_s: float = 300.0  # mid-epoch checkpoints at most this often

    def __post_init__(self):
        check(self, context=CONTEXT)
        # rules across fields (and two ranges worded together); per-field rules are declared with setting()
        if self.batch_size % self.micro_batches:
            raise EdgekdError(f"batch_size {self.batch_size} is not divisible by micro_batches {self.micro_batches}")
        if not 0 <= self.randaug_ops <= 4 or not 0 <= self.randaug_magnitude <= 10:
            raise EdgekdError(f"randaug_ops must be in 0..4 and randaug_magnitude in 0..10, got "
                              f"{self.randaug_ops} and {self.randaug_magnitude}")
        if self.mixup < 0 or self.cutmix < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise EdgekdError(f"mixup and cutmix alphas must be >= 0 and mix_prob in [0, 1], got mixup={self.mixup}, "
                              f"cutmix={self.cutmix}, mix_prob={self.mix_prob}")
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
    def from_dict(cls, data: dict[str, Any], source: str = CONTEXT) -> "TrainConfig":
        return build(cls, data, context=source)

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
        return cls.from_dict(data, str(path))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

