"""Distillation methods, one module each, registered by name (`edgekd methods` lists them)."""
from ..registry import Registry
from .base import DistillOutput, Distiller, FeatureTaps, MethodOptions, freeze
from .ce import CrossEntropy
from .kd import HintonKD, kd_loss

METHODS: Registry[type[Distiller]] = Registry("method", "`edgekd methods` lists them")
for _method in (CrossEntropy, HintonKD):
    METHODS.register(_method.name, _method)

__all__ = ["METHODS", "DistillOutput", "Distiller", "FeatureTaps", "MethodOptions", "freeze", "kd_loss"]
