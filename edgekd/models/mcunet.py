"""mcunet_tiny: an MCUNet-class network for microcontrollers (~256 KB SRAM at 64 px, int8).

Where the structure comes from:
- MCUNet (Lin et al., "MCUNet: Tiny Deep Learning on IoT Devices", NeurIPS 2020) searches a
  MnasNet/ProxylessNAS-style space of inverted-residual blocks whose per-block choices are depthwise
  kernel size {3, 5, 7} and expand ratio {3, 4, 6} (paper Sec. 3 and appendix).
- The macro layout is that of the released mcunet-in0 / mcunet-vww0 ("10fps" on STM32F746) models
  as reproduced in MIT Han Lab code: a 3x3 stride-2 stem of 16 channels, a depthwise-separable block
  to 8 channels, five inverted-residual stages of 16/24/40/48/96 channels with strides 2/2/2/1/2,
  a 160-channel head and ReLU6 activations.
- The per-block (expand, kernel) choices below are our own pick inside that space, following the
  pattern of the searched nets (small expand ratios and large kernels at high resolution, where
  activation memory is the bottleneck; larger expand ratios deeper, where memory is cheap). This is not
  the searched mcunet-in0/vww0 per-block configuration and no MCUNet weights are used.

Memory at 64x64 int8 input (default stem; the same at 32 px with low_res_stem): the largest per-layer
input+output is 48 KB (the first stage's 3x expansion at 32x32, counted before BN folding), leaving most
of 256 KB SRAM for the interpreter arena; about 335 K parameters at 10 classes (~0.33 MB int8 flash).
tests/test_models.py checks the activation peak < 128 KB and the weights < 1 MB.
"""
from __future__ import annotations

from .layers import ConvBNAct, InvertedResidual, InvertedResidualNet, make_divisible
from .registry import ModelInfo, register_model

# Per stage: (out channels, first stride, [(expand ratio, kernel), ...]).
_STAGES = [
    (16, 2, [(3, 7), (3, 3)]),
    (24, 2, [(4, 7), (3, 3), (4, 5)]),
    (40, 2, [(6, 3), (4, 5), (4, 5)]),
    (48, 1, [(6, 5), (4, 3)]),
    (96, 2, [(6, 7), (4, 3), (3, 5)]),
]


def mcunet_tiny(
    *, num_classes: int, in_chans: int = 3, width_mult: float = 1.0, low_res_stem: bool = False, dropout: float = 0.1
) -> InvertedResidualNet:
    stem_chs = make_divisible(16 * width_mult)
    stem = ConvBNAct(in_chans, stem_chs, 3, 1 if low_res_stem else 2, act="relu6")
    # First block: depthwise-separable (expand ratio 1) down to 8 channels, as in the MCUNet nets.
    first = InvertedResidual(stem_chs, make_divisible(8 * width_mult), 3, 1, stem_chs, act="relu6")
    in_chs, stages = first.out_channels, [[first]]
    for out, stride, blocks in _STAGES:
        out_chs = make_divisible(out * width_mult)
        stage = []
        for i, (expand, k) in enumerate(blocks):
            stage.append(InvertedResidual(in_chs, out_chs, k, stride if i == 0 else 1, in_chs * expand, act="relu6"))
            in_chs = out_chs
        stages.append(stage)
    conv_head = ConvBNAct(in_chs, make_divisible(160 * width_mult), 1, act="relu6")
    return InvertedResidualNet(stem, stages, conv_head, num_classes, dropout)


register_model(ModelInfo(
    "mcunet_tiny", "mcunet", "student", mcunet_tiny, {},
    "MCUNet-class tiny net (kernels 3/5/7, expand 3/4/6) for ~256 KB SRAM microcontrollers at 64 px",
))
