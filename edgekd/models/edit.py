"""Architecture edits: a model with blocks deleted or inserted, e.g. a student made from its teacher (MLD).

Spec: `delete:3,5;insert:7` - block indices count every block of the model in forward order from 0 (inverted
residuals of `blocks.*` for the MobileNet/EfficientNet/MCUNet family, the residual blocks of layer1..layer4 for
ResNets; `edgekd.models.edit.describe_blocks` lists them). Only shape-preserving blocks (a residual connection
without downsampling) can be deleted or inserted, and no stage may lose its last block. An inserted block is a
copy of the one it follows with its last BatchNorm scale zeroed, so it starts as the identity: the edited model
computes exactly what it did before the insertion. Every other weight is kept. `create_model(..., edit=SPEC)`
rebuilds the edited architecture, so checkpoints of edited models load like any other.
"""
from __future__ import annotations

import copy
import re

from torch import nn

from ..errors import EdgekdError

_SPEC = re.compile(r"^(delete|insert):\d+(,\d+)*$")


def parse_edit(spec: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"delete": [], "insert": []}
    for part in filter(None, (p.strip() for p in str(spec).split(";"))):
        if not _SPEC.match(part):
            raise EdgekdError(f"bad architecture edit '{spec}': write delete:I[,J...] and/or insert:I[,J...] "
                              "separated by ';' (block indices from `edgekd.models.edit.describe_blocks`)")
        kind, indices = part.split(":")
        out[kind] += [int(i) for i in indices.split(",")]
    if not out["delete"] and not out["insert"]:
        raise EdgekdError(f"architecture edit '{spec}' deletes and inserts nothing")
    if set(out["delete"]) & set(out["insert"]):
        raise EdgekdError(f"architecture edit '{spec}' both deletes and inserts the same block")
    return out


def _stages(model: nn.Module) -> list[nn.Sequential]:
    if hasattr(model, "blocks") and isinstance(model.blocks, nn.Sequential):
        return [stage for stage in model.blocks]
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(layer, nn.Sequential) for layer in layers):
        return layers
    raise EdgekdError(f"{type(model).__name__} has no stages of blocks to edit (blocks.* or layer1..layer4)")


def _preserves_shape(block: nn.Module) -> bool:
    if hasattr(block, "has_skip"):
        return bool(block.has_skip)
    return hasattr(block, "downsample") and block.downsample is None


def _last_norm(block: nn.Module) -> nn.BatchNorm2d:
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise EdgekdError(f"block {type(block).__name__} has no BatchNorm to start an inserted copy as identity")
    return norms[-1]


def describe_blocks(model: nn.Module) -> list[str]:
    """One line per block: index, stage, whether it can be deleted/inserted."""
    out, index = [], 0
    for s, stage in enumerate(_stages(model)):
        for b, block in enumerate(stage):
            out.append(f"{index}: stage {s} block {b} ({type(block).__name__}"
                       f"{', editable' if _preserves_shape(block) else ''})")
            index += 1
    return out


def apply_edit(model: nn.Module, spec: str) -> nn.Module:
    """Edits `model` in place (its weights are kept) and returns it."""
    edit = parse_edit(spec)
    stages = _stages(model)
    slots = [(s, b) for s, stage in enumerate(stages) for b in range(len(stage))]
    for index in edit["delete"] + edit["insert"]:
        if index >= len(slots):
            raise EdgekdError(f"architecture edit '{spec}': block {index} does not exist (the model has {len(slots)})")
        s, b = slots[index]
        if not _preserves_shape(stages[s][b]):
            raise EdgekdError(f"architecture edit '{spec}': block {index} changes the feature shape (stride or "
                              "channels), so it cannot be deleted or repeated; edit a residual block")
    for s, stage in enumerate(stages):
        new = []
        for b, block in enumerate(stage):
            index = slots.index((s, b))
            if index not in edit["delete"]:
                new.append(block)
            if index in edit["insert"]:
                twin = copy.deepcopy(block)
                nn.init.zeros_(_last_norm(twin).weight)  # residual + zero branch: starts as the identity
                new.append(twin)
        if not new:
            raise EdgekdError(f"architecture edit '{spec}' deletes every block of stage {s}; keep at least one")
        for i in range(len(stage) - 1, -1, -1):
            del stage[i]
        for block in new:
            stage.append(block)
    return model
