"""Quantization that keeps accuracy: NNCF post-training quantization and quantization-aware training with
distillation (docs/quantize.md).

`quantize()` (run.py) is re-exported by edgekd.api; quantized checkpoints are read by `checkpoint.py`, which the
export pipeline uses. Nothing is imported here, so importing the package does not load NNCF.
"""
