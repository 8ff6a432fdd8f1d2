"""QuantizeConfig: what `edgekd quantize` was asked to do, saved as quantize.yaml in the quantized run (the input
to --resume). Strict like TrainConfig, by the same validator (edgekd/validate.py): unknown keys and bad values
are one-line errors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import EdgekdError
from ..validate import build, check, setting

CONFIG_NAME = "quantize.yaml"
METHODS = ("nncf-ptq", "nncf-qat")
TEACHERS = ("float", "run")  # the float student itself, or the teacher its run was distilled from
CONTEXT = "quantize config"  # what an error names when there is no file


@dataclass(frozen=True)
class QuantizeConfig:
    source: str  # the float run directory (its best.pt is quantized)
    run_dir: str  # where the quantized run is written
    method: str = setting("nncf-qat", choices=METHODS)
    data: str | None = None  # None: the run's own data spec
    calib_images: int = setting(300, at_least=1, hint="training images NNCF's post-training quantization calibrates on")
    # QAT: fine-tune the fake-quantized student with Hinton KD (edgekd.distill.kd) from `teacher`:
    # loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)
    epochs: int = setting(2, at_least=1)
    teacher: str = setting("float", choices=TEACHERS,
                           hint="the float student, or the teacher the run was distilled from")
    temperature: float = setting(4.0, above=0, hint="the KD temperature")
    alpha: float = setting(0.9, at_least=0, at_most=1, hint="the weight of the KD term")
    # AdamW: SGD at a rate that moved the weights enough to help blew the loss up on BatchNorm-folded students
    # (docs/quantize.md, "Optimiser")
    optimizer: str = setting("adamw", choices=("adamw", "sgd"))
    # peak of a cosine schedule without warm-up, for a batch of 128
    lr: float = setting(1e-5, above=0, hint="the peak learning rate")
    batch_size: int = setting(128, at_least=1)
    augment: bool = True  # the data's crop/flip, as in training
    seed: int = 0
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    checkpoint_interval_s: float = 300.0
    # the source run's split settings (copied at the start: the splits must be the run's, also for export)
    split_seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None
    labels_per_class: float | None = None

    def __post_init__(self):
        check(self, context=CONTEXT)

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
        return build(cls, data, context=str(path))


# the defaults, for the API's and the CLI's signatures (one place)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(QuantizeConfig)
                            if f.default is not dataclasses.MISSING}
