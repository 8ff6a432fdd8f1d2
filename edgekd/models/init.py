"""Student initialisation schemes, for robustness experiments like MLD's Table 1 (normal(0,1), normal(1,1), constant).

Spec: `default` (each layer's own init) | `xavier` | `normal:MEAN,STD` | `constant:VALUE`. The scheme applies to
every weight and bias of the conv and linear layers; BatchNorm keeps gamma=1, beta=0, as in the paper's setting
where the bad initialisation is in the layers that BatchNorm normalises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EdgekdError

SCHEMES = ("default", "xavier", "normal", "constant")


@dataclass(frozen=True)
class InitSpec:
    scheme: str
    mean: float = 0.0
    std: float = 1.0
    value: float = 0.0


def parse_init(spec: str) -> InitSpec:
    usage = "use default, xavier, normal:MEAN,STD or constant:VALUE"
    scheme, _, args = spec.strip().partition(":")
    if scheme not in SCHEMES:
        raise EdgekdError(f"unknown student init '{spec}': {usage}")
    try:
        numbers = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise EdgekdError(f"student init '{spec}' has a non-number argument: {usage}") from None
    expected = {"default": 0, "xavier": 0, "normal": 2, "constant": 1}[scheme]
    if len(numbers) != expected:
        raise EdgekdError(f"student init '{spec}' takes {expected} number(s): {usage}")
    if scheme == "normal":
        if numbers[1] < 0:
            raise EdgekdError(f"student init '{spec}': the standard deviation must be >= 0")
        return InitSpec(scheme, mean=numbers[0], std=numbers[1])
    if scheme == "constant":
        return InitSpec(scheme, value=numbers[0])
    return InitSpec(scheme)


@torch.no_grad()
def init_weights(model: nn.Module, spec: str) -> nn.Module:
    """Re-initialise the conv and linear layers of `model` in place (uses the global torch RNG)."""
    parsed = parse_init(spec)
    if parsed.scheme == "default":
        return model
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        for name in ("weight", "bias"):
            tensor = getattr(module, name)
            if tensor is None:
                continue
            if parsed.scheme == "normal":
                tensor.normal_(parsed.mean, parsed.std)
            elif parsed.scheme == "constant":
                tensor.fill_(parsed.value)
            elif name == "weight":
                nn.init.xavier_uniform_(tensor)
            else:
                tensor.zero_()
    return model
