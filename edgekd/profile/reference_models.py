"""Published benchmark models that the latency model of each target is calibrated against.

Only architectures whose definition is public and simple enough to rebuild exactly are here; zoo models
(ResNet-18/34/50, MobileNetV2 at a width) are used directly. Weights do not matter for cost, so none are loaded.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import EdgekdError


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class _Classifier(nn.Module):
    def __init__(self, features: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def mlperf_resnet8(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """MLPerf Tiny image classification ResNet-8 (keras_model.py: filters 16/32/64), 32x32x3, 12.5M MACs."""
    layers = [*_conv_bn_relu(in_chans, 16, 3, 1), _Residual(16, 16, 1), _Residual(16, 32, 2), _Residual(32, 64, 2)]
    return _Classifier(nn.Sequential(*layers), 64, num_classes)


def mobilenetv1(alpha: float = 0.25, num_classes: int = 2, in_chans: int = 3) -> nn.Module:
    """MobileNetV1 (Keras layout: 13 depthwise-separable blocks); alpha 0.25 at 96 px is MLPerf Tiny VWW."""
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    cin = int(32 * alpha)
    layers = _conv_bn_relu(in_chans, cin, 3, 2)
    for c, stride in plan:
        cout = int(c * alpha)
        layers += _conv_bn_relu(cin, cin, 3, stride, groups=cin) + _conv_bn_relu(cin, cout, 1, 1)
        cin = cout
    return _Classifier(nn.Sequential(*layers), cin, num_classes)


def _zoo(name: str, **options) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
        from ..models import create_model

        return create_model(name, num_classes, in_chans=in_chans, **options)
    return build


REFERENCE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlperf-resnet8": mlperf_resnet8,
    "mlperf-vww-mobilenetv1-0.25": lambda num_classes=2, in_chans=3: mobilenetv1(0.25, num_classes, in_chans),
    "mobilenetv1-1.0": lambda num_classes=1000, in_chans=3: mobilenetv1(1.0, num_classes, in_chans),
    "mobilenetv2-0.3": _zoo("mobilenetv2_035", width_mult=0.3),
    "mobilenetv2-1.0": _zoo("mobilenetv2_100"),
    "resnet18": _zoo("resnet18"),
    "resnet34": _zoo("resnet34"),
    "resnet50": _zoo("resnet50"),
}


def build_reference(name: str, num_classes: int, in_chans: int, options=None, resolution: int | None = None) -> nn.Module:
    """A published model by its name here, or a zoo model with its create_model options (a model measured on the
    device by `edgekd profile --calibrate`)."""
    from ..models import MODELS, create_model

    if name in REFERENCE_MODELS and not options:
        return REFERENCE_MODELS[name](num_classes=num_classes, in_chans=in_chans).eval()
    if name in MODELS:
        return create_model(name, num_classes, in_chans=in_chans, input_size=resolution, **dict(options or {})).eval()
    raise EdgekdError(f"unknown reference model '{name}' (known: {', '.join(REFERENCE_MODELS)} and the zoo's models)")
