"""Export: checkpoint -> ONNX / TFLite (int8 verified in TFLite Micro, C array) / TensorRT-ready bundle.

`export()` is re-exported by edgekd.api; the formats table is in formats.py; see docs/export.md.
"""
from .pipeline import Artifact, export

__all__ = ["Artifact", "export"]
