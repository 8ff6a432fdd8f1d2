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


def fold_batchnorm_in_place(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every Conv2d -> BatchNorm2d pair into the convolution of `model` itself (the BatchNorm becomes an
    Identity), keeping the model's class and module paths; returns the folded (conv, batchnorm) paths.

    Quantization needs this form: the int8 weights must be the folded ones a device runs, and NNCF cannot
    quantize the torch.fx GraphModule that fold_batchnorm returns. The pairs depend only on the architecture,
    so a rebuilt model folds the same ones."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    pairs = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(modules.get(prev.target), nn.Conv2d)
                and len(prev.users) == 1 and modules[node.target].track_running_stats):
            pairs.append((str(prev.target), str(node.target)))
    for conv_path, bn_path in pairs:
        _set_submodule(model, conv_path, fuse_conv_bn_eval(model.get_submodule(conv_path), model.get_submodule(bn_path)))
        _set_submodule(model, bn_path, nn.Identity())
    return pairs


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
