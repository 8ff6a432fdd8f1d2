"""Distillation methods, one module each, registered by name (`edgekd methods` lists them)."""
from ..registry import Registry
from .ab import ActivationBoundaries
from .at import AttentionTransfer
from .base import DistillOutput, Distiller, MethodOptions, freeze
from .byot import BeYourOwnTeacher
from .ce import CrossEntropy
from .distpro import DistPro
from .dist import DIST
from .dkd import DecoupledKD
from .dml import DeepMutualLearning
from .fitnet import FitNet
from .fm import FunctionMatching
from .fsp import FSP
from .kd import HintonKD
from .logit_l2 import LogitL2
from .losses import kd_loss
from .metadistiller import MetaDistiller
from .mld import MaskedLayerDistillation
from .netaug import NetAug, NetAugKD
from .nst import NeuronSelectivityTransfer
from .rkd import RelationalKD
from .sskd import SSKDMultiLoss, StageByStageKD

METHODS: Registry[type[Distiller]] = Registry("method", "`edgekd methods` lists them")
for _method in (CrossEntropy, HintonKD, FunctionMatching, DecoupledKD, DIST, LogitL2, FitNet, AttentionTransfer, NeuronSelectivityTransfer,
                ActivationBoundaries, FSP, RelationalKD, DeepMutualLearning, BeYourOwnTeacher, StageByStageKD,
                SSKDMultiLoss, NetAug, NetAugKD, MetaDistiller,
                MaskedLayerDistillation, DistPro):
    METHODS.register(_method.name, _method)

__all__ = ["METHODS", "DistillOutput", "Distiller", "MethodOptions", "freeze", "kd_loss"]


def takes_only_logits(method: str) -> bool:
    """Whether every phase of `method` takes only the teacher's logits (cacheable once, any teacher resolution)."""
    from .step import LOGITS

    return METHODS.get(method).teacher_needs == LOGITS
