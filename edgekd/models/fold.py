"""BatchNorm folding, shared by the teacher runner (speed) and the ONNX export (a leaner graph)."""
from __future__ import annotations

import copy

from torch import nn


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode copy with every Conv2d -> BatchNorm2d pair folded into the convolution; (copy, folded?).

    A model torch.fx cannot trace (data-dependent control flow) comes back as a plain eval copy with False:
    the caller decides whether that is an error."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model), True
    except Exception:  # data-dependent control flow cannot be traced by torch.fx
        return model, False
