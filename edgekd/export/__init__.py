"""Export: checkpoint -> ONNX / TFLite (int8 verified in TFLite Micro, C array) / TensorRT-ready bundle.

`export()` (pipeline.py) is re-exported by edgekd.api; the formats table is in formats.py; see docs/export.md.
Nothing is imported here, so that edgekd.targets and the CLI can read the formats table without loading the
pipeline (torch, the data module).
"""
