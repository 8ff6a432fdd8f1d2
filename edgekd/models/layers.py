"""Building blocks shared by the model families.

Everything here is chosen to export cleanly to ONNX -> TFLite (Micro) int8 and TensorRT:
- activations are ReLU, ReLU6, SiLU or the hard variants written with relu6, never nn.Hardsigmoid /
  nn.Hardswish (onnx2tf turns nn.Hardsigmoid into RELU_0_TO_1, which TFLite Micro does not implement);
- TF "SAME" padding, needed to reproduce TF-trained weights, is an explicit ZeroPad2d before the conv
  (exports as PAD + CONV_2D) rather than padding computed in forward from the input shape.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FeatureInfo:
    """A stage-boundary tap point: hooking `module` (a path from named_modules()) yields (B, channels, H/r, W/r)."""

    module: str
    channels: int
    reduction: int


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor` (8 suits int8 SIMD kernels), never more than 10% down.

    Same rule as the TF EfficientNet/MobileNet reference code (and torchvision's _make_divisible), so
    width-scaled models keep the published channel counts.
    """
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


class HardSigmoid(nn.Module):
    """relu6(x + 3) / 6: exports as ADD/RELU6/MUL, which TFLite Micro runs (nn.Hardsigmoid does not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class HardSwish(nn.Module):
    """x * relu6(x + 3) / 6, written out for the same export reason as HardSigmoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hswish": HardSwish,
    "swish": nn.SiLU,
    "hsigmoid": HardSigmoid,
    "sigmoid": nn.Sigmoid,
}


def create_act(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    return _ACTIVATIONS[name]()


def same_pad_amounts(kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding that TF "SAME" applies to an even-sized input.

    TF pads total = max((ceil(i/s) - 1) * s + k - i, 0), the extra pixel going after (right/bottom).
    For stride 1 that is k-1 split evenly (what PyTorch's padding=k//2 does already); for stride 2 and
    an even input it is k-2, i.e. (0,1) for k=3 and (1,2) for k=5. Inputs whose size is divisible by the
    model's total stride keep every stride-2 input even, so a static pad is exact there.
    """
    total = kernel_size - stride if stride > 1 else kernel_size - 1
    total = max(total, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, children named conv/bn/act (and pad in SAME mode)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
        bn_eps: float = 1e-5,
        same_padding: bool = False,
    ):
        layers: list[tuple[str, nn.Module]] = []
        padding = kernel_size // 2
        if same_padding and stride > 1:
            before, after = same_pad_amounts(kernel_size, stride)
            layers.append(("pad", nn.ZeroPad2d((before, after, before, after))))
            padding = 0
        layers.append(("conv", nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)))
        layers.append(("bn", nn.BatchNorm2d(out_chs, eps=bn_eps)))
        layers.append(("act", create_act(act)))
        super().__init__(OrderedDict(layers))
        self.out_channels = out_chs
        self.stride = stride


class SqueezeExcite(nn.Module):
    """Channel attention: global mean -> 1x1 reduce -> act -> 1x1 expand -> gate -> scale the input."""

    def __init__(self, channels: int, rd_channels: int, act: str = "relu", gate: str = "sigmoid"):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = create_act(act)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = create_act(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * self.gate(s)


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 linear projection (+ skip).

    The expand conv is omitted when mid_chs == in_chs (expand ratio 1), as in MobileNetV2 / EfficientNet.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        mid_chs: int,
        act: str = "relu6",
        se_channels: int = 0,
        se_act: str = "relu",
        se_gate: str = "sigmoid",
        bn_eps: float = 1e-5,
        same_padding: bool = False,
    ):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        if mid_chs != in_chs:
            self.conv_pw = ConvBNAct(in_chs, mid_chs, 1, act=act, bn_eps=bn_eps)
        else:
            self.conv_pw = nn.Identity()
        self.conv_dw = ConvBNAct(mid_chs, mid_chs, kernel_size, stride, groups=mid_chs, act=act, bn_eps=bn_eps,
                                 same_padding=same_padding)
        self.se = SqueezeExcite(mid_chs, se_channels, se_act, se_gate) if se_channels > 0 else nn.Identity()
        self.conv_pwl = ConvBNAct(mid_chs, out_chs, 1, act=None, bn_eps=bn_eps)
        self.out_channels = out_chs
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + y if self.has_skip else y


def collapse_feature_info(taps: list[tuple[str, int, int]]) -> list[FeatureInfo]:
    """Keep the last tap of each resolution: that module's output is the stage's final feature map.

    `taps` are (module path, channels, reduction) in forward order; reductions never decrease.
    """
    by_reduction: "OrderedDict[int, FeatureInfo]" = OrderedDict()
    for module, channels, reduction in taps:
        by_reduction[reduction] = FeatureInfo(module, channels, reduction)
    return list(by_reduction.values())


class EdgeNet(nn.Module):
    """Common interface of every zoo model: forward = forward_head(forward_features(x)).

    Families set `feature_info` and `num_classes`; create_model sets `model_config`.
    """

    feature_info: list[FeatureInfo]
    num_classes: int
    model_config: dict

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation for mobile nets: kaiming fan-out convs, unit BN, small linear weights."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_classifier(linear: nn.Linear) -> None:
    """Re-initialise a classifier the way init_weights does (used when pretrained weights change num_classes)."""
    nn.init.normal_(linear.weight, 0, 0.01)
    nn.init.zeros_(linear.bias)


class InvertedResidualNet(EdgeNet):
    """stem -> blocks (stages of inverted residuals) -> conv_head -> pool -> [fc_head] -> dropout -> classifier.

    Shared by MobileNet, EfficientNet and MCUNet. feature_info is derived from the strides, so it stays
    right for low_res_stem and any stage layout.
    """

    def __init__(
        self,
        stem: ConvBNAct,
        stages: list[list[InvertedResidual]],
        conv_head: ConvBNAct,
        num_classes: int,
        dropout: float,
        head_hidden: int = 0,
        head_act: str | None = None,
    ):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*[nn.Sequential(*stage) for stage in stages])
        self.conv_head = conv_head
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        if head_hidden:
            # MobileNetV3's pre-classifier Linear + hard-swish (applied after pooling, so it is cheap).
            self.fc_head = nn.Sequential(
                OrderedDict(fc=nn.Linear(conv_head.out_channels, head_hidden), act=create_act(head_act))
            )
        else:
            self.fc_head = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_hidden or conv_head.out_channels, num_classes)
        self.num_classes = num_classes

        reduction = stem.stride
        taps = [("stem", stem.out_channels, reduction)]
        for i, stage in enumerate(stages):
            for block in stage:
                reduction *= block.stride
            taps.append((f"blocks.{i}", stage[-1].out_channels, reduction))
        taps.append(("conv_head", conv_head.out_channels, reduction))
        self.feature_info = collapse_feature_info(taps)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(features).flatten(1)
        return self.classifier(self.dropout(self.fc_head(x)))
