"""Model registry and factory: `create_model(name, num_classes, **options)` builds any zoo model.

Family modules (mobilenet, efficientnet, mcunet, resnet) register their ModelInfo entries at import;
edgekd.models imports them all, so importing anything from edgekd.models fills MODELS.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import EdgekdError
from ..registry import Registry
from ..validate import build, setting

log = logging.getLogger("edgekd.models")

ROLES = ("student", "teacher")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    role: str  # the model's intended role; any model can be used as either student or teacher
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str
    pretrained_available: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"model role must be one of {ROLES}, got {self.role!r}")
        # A read-only copy, so no caller can change another caller's defaults.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def options(self) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(options_class(self.builder)))


MODELS = Registry[ModelInfo]("model", "`edgekd models` lists them")


def register_model(info: ModelInfo) -> ModelInfo:
    MODELS.register(info.name, info)
    return info


# what the builders' options must satisfy; their types and defaults come from each builder's signature
OPTION_RULES: dict[str, dict[str, Any]] = {
    "width_mult": {"above": 0, "hint": "channel multiplier"},
    "depth_mult": {"above": 0, "hint": "block-count multiplier"},
    "dropout": {"at_least": 0, "below": 1, "hint": "dropout before the classifier"},
}


@functools.cache
def options_class(builder: Callable[..., nn.Module]) -> type:
    """A builder's keyword-only options as a frozen dataclass (num_classes/in_chans are create_model's own)."""
    params = inspect.signature(builder, eval_str=True).parameters.values()
    fields = [(p.name, p.annotation, setting(p.default, **OPTION_RULES.get(p.name, {})))
              for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("num_classes", "in_chans")]
    return dataclasses.make_dataclass(f"{builder.__name__}_options", fields, frozen=True)


def list_models(role: str | None = None, family: str | None = None) -> list[str]:
    """Registered names, sorted; `role`/`family` filter on the declared values."""
    out = []
    for name in MODELS:
        info = MODELS.get(name)
        if (role is None or info.role == role) and (family is None or info.family == family):
            out.append(name)
    return out


def get_model_info(name: str) -> ModelInfo:
    return MODELS.get(name)


def _check_sizes(name: str, num_classes: Any, in_chans: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise EdgekdError(f"model '{name}' needs num_classes >= 2, got {num_classes!r}")
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise EdgekdError(f"model '{name}' needs in_chans >= 1, got {in_chans!r}")


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    input_size: int | None = None,
    pretrained: bool = False,
    **options: Any,
) -> nn.Module:
    """Build a registered model.

    The returned module has `feature_info`, `num_classes`, `model_config` (create_model(**model_config)
    rebuilds the same architecture; it never contains `pretrained`, weights travel in checkpoints),
    `forward_features` and `forward_head`. With pretrained=True it also has `pretrained_cfg` (source,
    input mean/std, whether the classifier was re-initialised); otherwise `pretrained_cfg` is None.
    """
    info = MODELS.get(name)
    edit = options.pop("edit", None)  # blocks deleted/inserted (edgekd.models.edit), applied after building
    # Every option is spelled out, so model_config still rebuilds this model if a default changes later.
    merged = dataclasses.asdict(build(options_class(info.builder), {**info.defaults, **options}, context=name,
                                      noun="model option"))
    _check_sizes(name, num_classes, in_chans)

    if pretrained:
        from . import pretrained as pretrained_mod

        pretrained_mod.prepare_options(info, in_chans, options, merged)

    model = info.builder(num_classes=num_classes, in_chans=in_chans, **merged)
    if edit:
        from .edit import apply_edit

        apply_edit(model, edit)
    model.model_config = {"name": name, "num_classes": num_classes, "in_chans": in_chans, **merged,
                          **({"edit": edit} if edit else {})}
    model.pretrained_cfg = None
    model.input_size = input_size  # the resolution it was built for (None: unknown); not part of model_config
    if input_size is not None:
        check_input_size(model, input_size)
        stride = model.feature_info[-1].reduction
        if merged.get("same_padding") and input_size % stride:
            # The static SAME pads equal TF's only while every stride-2 layer sees an even size.
            log.warning("%s: input size %d is not a multiple of %d; same_padding then differs slightly from TF",
                        name, input_size, stride)
    if pretrained:
        pretrained_mod.load_pretrained(model, name)
    return model


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's last Linear layer: the head a pretrained model gets fresh."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def _total_stride(info: ModelInfo, low_res_stem: bool) -> int:
    # Built on the meta device: only the structure is needed, no memory or init time.
    with torch.device("meta"):
        model = info.builder(num_classes=2, in_chans=3, **{**info.defaults, "low_res_stem": low_res_stem})
    return model.feature_info[-1].reduction


def check_input_size(model_or_name: nn.Module | str, input_size: int, low_res_stem: bool = False) -> None:
    """Raise EdgekdError if `input_size` (px) is smaller than the model's total stride.

    For a built model its own low_res_stem setting counts and the argument is ignored.
    """
    if isinstance(model_or_name, str):
        info = MODELS.get(model_or_name)
        name = info.name
        stride = _total_stride(info, low_res_stem)
    else:
        config = getattr(model_or_name, "model_config", {})
        name = config.get("name", type(model_or_name).__name__)
        low_res_stem = bool(config.get("low_res_stem", low_res_stem))
        stride = model_or_name.feature_info[-1].reduction
        info = MODELS.get(name) if name in MODELS else None
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise EdgekdError(f"input size for model '{name}' must be a positive number of pixels, got {input_size!r}")
    if input_size >= stride:
        return
    fix = f"use --resolution {stride} or larger"
    if not low_res_stem and info is not None:
        low_stride = _total_stride(info, True)
        if low_stride <= input_size:
            fix += f", or low_res_stem=True (total stride {low_stride}, fine from {low_stride} px)"
    raise EdgekdError(
        f"input size {input_size} px is too small for model '{name}': it needs at least {stride} px "
        f"(its total stride); {fix}"
    )
