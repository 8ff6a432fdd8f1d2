"""EfficientNet-B0 (Tan & Le 2019) and EfficientNet-Lite0 (TF "efficientnet/lite", 2020).

B0: MBConv blocks with squeeze-excite and swish, stem/head/channels scaled by width_mult, repeats by
depth_mult. Lite0: the same block table without SE, ReLU6 everywhere, and - as in the TF Lite builder -
the stem (32) and head (1280) channels and the repeats of the first and last stage are never scaled,
because they dominate int8 accuracy and latency on edge accelerators.

`same_padding=True` reproduces TF "SAME" padding (explicit asymmetric ZeroPad2d before stride-2 convs);
create_model sets it automatically for the pretrained Lite0 weights, which were trained in TF.
"""
from __future__ import annotations

import math

from .layers import ConvBNAct, InvertedResidual, InvertedResidualNet, make_divisible
from .registry import ModelInfo, register_model

# (expand ratio, kernel, first stride, out channels, repeats) - the B0 / Lite0 block table.
_BLOCKS = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
BN_EPS = 1e-3  # TF's default, which the pretrained statistics assume


def _efficientnet(
    lite: bool, num_classes: int, in_chans: int, width_mult: float, depth_mult: float, low_res_stem: bool,
    dropout: float, same_padding: bool,
) -> InvertedResidualNet:
    act = "relu6" if lite else "swish"
    stem_chs = 32 if lite else make_divisible(32 * width_mult)
    stem = ConvBNAct(in_chans, stem_chs, 3, 1 if low_res_stem else 2, act=act, bn_eps=BN_EPS,
                     same_padding=same_padding)
    in_chs, stages = stem_chs, []
    for idx, (expand, k, stride, out, repeats) in enumerate(_BLOCKS):
        out_chs = make_divisible(out * width_mult)
        if not (lite and idx in (0, len(_BLOCKS) - 1)):
            repeats = int(math.ceil(repeats * depth_mult))
        stage = []
        for i in range(repeats):
            stage.append(InvertedResidual(
                in_chs, out_chs, k, stride if i == 0 else 1, in_chs * expand, act=act,
                # SE width is a quarter of the block *input* channels, as in the reference implementation.
                se_channels=0 if lite else max(1, int(in_chs * 0.25)), se_act="swish", se_gate="sigmoid",
                bn_eps=BN_EPS, same_padding=same_padding,
            ))
            in_chs = out_chs
        stages.append(stage)
    head_chs = 1280 if lite else make_divisible(1280 * width_mult)
    conv_head = ConvBNAct(in_chs, head_chs, 1, act=act, bn_eps=BN_EPS)
    return InvertedResidualNet(stem, stages, conv_head, num_classes, dropout)


def efficientnet_b0(
    *, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, depth_mult: float = 1.0,
    low_res_stem: bool = False, dropout: float = 0.2, same_padding: bool = False,
) -> InvertedResidualNet:
    return _efficientnet(False, num_classes, in_chans, width_mult, depth_mult, low_res_stem, dropout, same_padding)


def efficientnet_lite0(
    *, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, depth_mult: float = 1.0,
    low_res_stem: bool = False, dropout: float = 0.2, same_padding: bool = False,
) -> InvertedResidualNet:
    return _efficientnet(True, num_classes, in_chans, width_mult, depth_mult, low_res_stem, dropout, same_padding)


register_model(ModelInfo(
    "efficientnet_b0", "efficientnet", "student", efficientnet_b0, {},
    "EfficientNet-B0 (MBConv + squeeze-excite + swish); width_mult/depth_mult scale it",
))
register_model(ModelInfo(
    "efficientnet_lite0", "efficientnet", "student", efficientnet_lite0, {},
    "EfficientNet-Lite0 (no SE, ReLU6, fixed stem/head); ImageNet weights with pretrained=True",
    pretrained_available=True,
))
