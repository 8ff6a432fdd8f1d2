"""QuantizeConfig: what `edgekd quantize` was asked to do, saved as quantize.yaml in the quantized run (the input
to --resume). Strict like TrainConfig: unknown keys and bad values are one-line errors."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import EdgekdError

CONFIG_NAME = "quantize.yaml"
METHODS = ("nncf-ptq", "nncf-qat")
TEACHERS = ("float", "run")  # the float student itself, or the teacher its run was distilled from


@dataclass(frozen=True)
class QuantizeConfig:
    source: str  # the float run directory (its best.pt is quantized)
    run_dir: str  # where the quantized run is written
    method: str = "nncf-qat"
    data: str | None = None  # None: the run's own data spec
    calib_images: int = 300  # training images NNCF's post-training quantization calibrates on
    # QAT: fine-tune the fake-quantized student with Hinton KD (edgekd.distill.kd) from `teacher`:
    # loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
    epochs: int = 2
    teacher: str = "float"
    temperature: float = 4.0
    alpha: float = 0.9
    lr: float = 0.005  # peak of a cosine schedule without warm-up (SGD, momentum 0.9), for a batch of 128
    batch_size: int = 128
    augment: bool = True  # the data's crop/flip, as in training
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_interval_s: float = 300.0
    # the source run's split settings (copied at the start: the splits must be the run's, also for export)
    split_seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None
    labels_per_class: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise EdgekdError(f"unknown quantization method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.teacher not in TEACHERS:
            raise EdgekdError(f"--teacher must be one of {', '.join(TEACHERS)} (the float student, or the teacher "
                              f"the run was distilled from), got '{self.teacher}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EdgekdError(f"device must be one of auto, cpu, cuda, got '{self.device}'")
        for name in ("calib_images", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise EdgekdError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise EdgekdError(f"KD temperature must be > 0 and alpha in [0, 1], got {self.temperature} and {self.alpha}")
        if self.lr <= 0:
            raise EdgekdError(f"learning rate must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes) -> "QuantizeConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: Path) -> "QuantizeConfig":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise EdgekdError(f"{path} does not exist: pass a directory written by `edgekd quantize`") from None
        except yaml.YAMLError as e:
            raise EdgekdError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix or delete it") from None
        if not isinstance(data, dict):
            raise EdgekdError(f"{path} must hold a mapping of quantize settings")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                raise EdgekdError(f"{path}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        try:
            return cls(**data)
        except TypeError as e:  # a required key is missing
            raise EdgekdError(f"{path}: {e}") from None


# the defaults, for the API's and the CLI's signatures (one place)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(QuantizeConfig)
                            if f.default is not dataclasses.MISSING}
