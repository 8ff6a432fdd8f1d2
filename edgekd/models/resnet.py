"""ResNet-18/34/50 teachers with torchvision's module names (conv1, bn1, layer1..4, fc, downsample.0/1).

Identical names and shapes at width 1.0 mean a torchvision ResNet state_dict (e.g. one fine-tuned by a
user elsewhere) loads unchanged with the default stem. low_res_stem gives the CIFAR-style stem
(3x3 stride-1 conv, no max-pool) for 32-96 px inputs; maxpool stays as an Identity so names don't move.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import EdgeNet, collapse_feature_info, make_divisible
from .registry import ModelInfo, register_model


def _downsample(in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_chs, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's "ResNet v1.5": the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(EdgeNet):
    def __init__(self, block: type, layers: list[int], num_classes: int, in_chans: int, width_mult: float,
                 low_res_stem: bool, dropout: float):
        super().__init__()
        stem_chs = make_divisible(64 * width_mult)
        if low_res_stem:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.relu = nn.ReLU(inplace=True)
        reduction = 1 if low_res_stem else 2
        taps = [("relu", stem_chs, reduction)]
        reduction *= 1 if low_res_stem else 2  # max-pool
        in_chs = stem_chs
        for i, n in enumerate(layers):
            planes = make_divisible(64 * 2**i * width_mult)
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(in_chs, planes, stride if j == 0 else 1))
                in_chs = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            reduction *= stride
            taps.append((f"layer{i + 1}", in_chs, reduction))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)  # no parameters, so state_dict names stay torchvision's
        self.fc = nn.Linear(in_chs, num_classes)
        self.num_classes = num_classes
        self.feature_info = collapse_feature_info(taps)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.avgpool(features).flatten(1)))


def _builder(block: type, layers: list[int]):
    def build(*, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, low_res_stem: bool = False,
              dropout: float = 0.0) -> ResNet:
        return ResNet(block, layers, num_classes, in_chans, width_mult, low_res_stem, dropout)

    return build


resnet18 = _builder(BasicBlock, [2, 2, 2, 2])
resnet34 = _builder(BasicBlock, [3, 4, 6, 3])
resnet50 = _builder(Bottleneck, [3, 4, 6, 3])

for _name, _fn, _desc in [
    ("resnet18", resnet18, "ResNet-18 teacher (torchvision layer names)"),
    ("resnet34", resnet34, "ResNet-34 teacher (torchvision layer names)"),
    ("resnet50", resnet50, "ResNet-50 teacher (torchvision layer names, v1.5 bottlenecks)"),
]:
    register_model(ModelInfo(_name, "resnet", "teacher", _fn, {}, _desc))
