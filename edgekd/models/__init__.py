"""The model zoo: students for microcontrollers / Jetson and the teachers that distil into them.

    from edgekd.models import create_model
    model = create_model("mobilenetv3_small_050", num_classes=10, low_res_stem=True, input_size=32)
"""
from .layers import FeatureInfo
from .registry import (
    MODELS,
    ModelInfo,
    check_input_size,
    classifier_parameters,
    create_model,
    get_model_info,
    list_models,
)

# Importing the families registers their models in MODELS.
from . import efficientnet, mcunet, mobilenet, resnet  # noqa: E402,F401  (registration side effect)

__all__ = ["create_model", "list_models", "get_model_info", "ModelInfo", "FeatureInfo", "MODELS", "check_input_size", "classifier_parameters"]
