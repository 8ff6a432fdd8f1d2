"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3-Small/-Large (Howard et al. 2019).

Channel rules follow torchvision, so at width 1.0 and 1000 classes the parameter counts equal
torchvision's mobilenet_v2 / mobilenet_v3_small / mobilenet_v3_large. MobileNetV3's hard-sigmoid and
hard-swish are the relu6 forms from layers.py (export-friendly for TFLite Micro).
"""
from __future__ import annotations

from .layers import ConvBNAct, InvertedResidual, InvertedResidualNet, make_divisible
from .registry import ModelInfo, register_model

WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0}


# MobileNetV2: (expand ratio t, channels c, repeats n, first stride s), Table 2 of the paper.
_V2_SETTINGS = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def mobilenetv2(
    *, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, low_res_stem: bool = False, dropout: float = 0.2
) -> InvertedResidualNet:
    stem_chs = make_divisible(32 * width_mult)
    stem = ConvBNAct(in_chans, stem_chs, 3, 1 if low_res_stem else 2, act="relu6")
    in_chs, stages = stem_chs, []
    for t, c, n, s in _V2_SETTINGS:
        out_chs = make_divisible(c * width_mult)
        stage = []
        for i in range(n):
            stage.append(InvertedResidual(in_chs, out_chs, 3, s if i == 0 else 1, int(round(in_chs * t)), act="relu6"))
            in_chs = out_chs
        stages.append(stage)
    # torchvision keeps the 1280-channel head at widths < 1 (it carries most of the accuracy).
    conv_head = ConvBNAct(in_chs, make_divisible(1280 * max(1.0, width_mult)), 1, act="relu6")
    return InvertedResidualNet(stem, stages, conv_head, num_classes, dropout)


# MobileNetV3: (kernel, expanded channels, out channels, squeeze-excite, activation, stride), Tables 1-2.
_V3_SMALL = [
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hswish", 2),
    (5, 240, 40, True, "hswish", 1),
    (5, 240, 40, True, "hswish", 1),
    (5, 120, 48, True, "hswish", 1),
    (5, 144, 48, True, "hswish", 1),
    (5, 288, 96, True, "hswish", 2),
    (5, 576, 96, True, "hswish", 1),
    (5, 576, 96, True, "hswish", 1),
]
_V3_LARGE = [
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hswish", 2),
    (3, 200, 80, False, "hswish", 1),
    (3, 184, 80, False, "hswish", 1),
    (3, 184, 80, False, "hswish", 1),
    (3, 480, 112, True, "hswish", 1),
    (3, 672, 112, True, "hswish", 1),
    (5, 672, 160, True, "hswish", 2),
    (5, 960, 160, True, "hswish", 1),
    (5, 960, 160, True, "hswish", 1),
]


def _mobilenetv3(
    config: list, head_hidden: int, num_classes: int, in_chans: int, width_mult: float, low_res_stem: bool,
    dropout: float,
) -> InvertedResidualNet:
    bn_eps = 1e-3  # as torchvision/TF MobileNetV3
    stem_chs = make_divisible(16 * width_mult)
    stem = ConvBNAct(in_chans, stem_chs, 3, 1 if low_res_stem else 2, act="hswish", bn_eps=bn_eps)
    in_chs, stages = stem_chs, []
    for k, exp, out, se, act, stride in config:
        mid_chs, out_chs = make_divisible(exp * width_mult), make_divisible(out * width_mult)
        block = InvertedResidual(
            in_chs, out_chs, k, stride, mid_chs, act=act,
            se_channels=make_divisible(mid_chs // 4) if se else 0, se_act="relu", se_gate="hsigmoid", bn_eps=bn_eps,
        )
        # A new stage starts at every downsampling block, so stages are resolution levels.
        if stride > 1 or not stages:
            stages.append([])
        stages[-1].append(block)
        in_chs = out_chs
    conv_head = ConvBNAct(in_chs, 6 * in_chs, 1, act="hswish", bn_eps=bn_eps)
    return InvertedResidualNet(
        stem, stages, conv_head, num_classes, dropout,
        head_hidden=make_divisible(head_hidden * width_mult), head_act="hswish",
    )


def mobilenetv3_small(
    *, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, low_res_stem: bool = False, dropout: float = 0.2
) -> InvertedResidualNet:
    return _mobilenetv3(_V3_SMALL, 1024, num_classes, in_chans, width_mult, low_res_stem, dropout)


def mobilenetv3_large(
    *, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, low_res_stem: bool = False, dropout: float = 0.2
) -> InvertedResidualNet:
    return _mobilenetv3(_V3_LARGE, 1280, num_classes, in_chans, width_mult, low_res_stem, dropout)


for _suffix, _w in WIDTHS.items():
    register_model(ModelInfo(
        f"mobilenetv2_{_suffix}", "mobilenet", "student", mobilenetv2, {"width_mult": _w},
        f"MobileNetV2 x{_w} (inverted residuals, ReLU6)",
    ))
    register_model(ModelInfo(
        f"mobilenetv3_small_{_suffix}", "mobilenet", "student", mobilenetv3_small, {"width_mult": _w},
        f"MobileNetV3-Small x{_w} (SE, hard-swish in relu6 form)",
    ))
    register_model(ModelInfo(
        f"mobilenetv3_large_{_suffix}", "mobilenet", "student", mobilenetv3_large, {"width_mult": _w},
        f"MobileNetV3-Large x{_w} (SE, hard-swish in relu6 form)",
    ))
