"""The formats table: one row per export format. It drives dispatch and rejects bad combinations up front.

A row says what the format produces (suffix), which precisions and options it accepts, which Python modules
it needs (all from the `export` extra) and which converter builds it. Everything the user can get wrong about
format/precision/target is checked here, before a model or a dataset is loaded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from ..errors import EdgekdError
from ..targets import Target

EXTRA = "export"
INSTALL_HINT = f"pip install 'edgekd[{EXTRA}]'"


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    default_precision: str
    options: tuple[str, ...]  # keyword options of export() that this format accepts
    modules: tuple[str, ...]  # import names needed, all installed by the `export` extra
    converter: str  # "module:function" inside edgekd.export, imported only when used
    description: str

    def load_converter(self) -> Callable:
        module, _, fn = self.converter.partition(":")
        return getattr(importlib.import_module(f"edgekd.export.{module}"), fn)


_ONNX = ("onnx", "onnxruntime", "onnxsim")

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ".onnx", ("fp32",), "fp32", ("dynamic_batch",), _ONNX, "torch2onnx:build",
               "ONNX opset 17, BatchNorm folded, simplified, checked by ONNX Runtime"),
        Format("tflite", ".tflite", ("fp32", "fp16", "dynamic-range", "int8"), "fp32", (),
               _ONNX + ("onnx2tf", "tensorflow", "ai_edge_litert", "tflite_micro"), "onnx2tflite:build",
               "TFLite via onnx2tf; int8 = full-integer with int8 input/output, run in TFLite Micro, plus a C array"),
        Format("tensorrt", ".onnx", ("fp16", "int8"), "fp16", (), _ONNX + ("polygraphy", "onnx_graphsurgeon"),
               "onnx2trt:build",
               "TensorRT-ready ONNX (int8: QDQ) + reference data + build_engine.sh; the engine is built on the device"),
    )
}

# what each target runtime consumes (the targets' own rules say the same for their defaults)
RUNTIME_FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    "tflite-micro": {"tflite": ("int8",)},
    "tflite": {"tflite": FORMATS["tflite"].precisions},
    "tensorrt": {"tensorrt": FORMATS["tensorrt"].precisions, "onnx": FORMATS["onnx"].precisions},
}


@dataclass(frozen=True)
class Choice:
    format: Format
    precision: str
    options: dict


def choose(format: str | None, precision: str | None, target: Target | None, options: dict) -> Choice:
    """Resolve format and precision (flags first, then the target's defaults) and validate the combination."""
    if format is None:
        if target is None:
            raise EdgekdError("say what to export: pass --format onnx|tflite|tensorrt or --target NAME")
        format = target.export.format
    if format not in FORMATS:
        raise EdgekdError(f"unknown format '{format}'; use one of {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    if precision is None:
        same_format = target is not None and target.export.format == format
        precision = target.export.precision if same_format else fmt.default_precision
    if precision not in fmt.precisions:
        hint = {
            ("onnx", "int8"): "; for an int8 ONNX use --format tensorrt --precision int8 (QDQ)",
            ("onnx", "fp16"): "; ONNX export is fp32 (TensorRT picks fp16 on the device: --format tensorrt)",
            ("tensorrt", "fp32"): "; use --format onnx for a plain fp32 ONNX",
        }.get((format, precision), "")
        raise EdgekdError(f"format {format} does not support precision '{precision}'; "
                          f"use one of {', '.join(fmt.precisions)}{hint}")
    for key, value in options.items():
        if value and key not in fmt.options:
            allowed = f"only {', '.join(o.replace('_', '-') for o in fmt.options)}" if fmt.options else "no options"
            raise EdgekdError(f"format {format} does not take --{key.replace('_', '-')} (it accepts {allowed})")
    if target is not None:
        consumable = RUNTIME_FORMATS[target.runtime]
        if format not in consumable or precision not in consumable[format]:
            wanted = "; ".join(f"--format {f} --precision {'|'.join(p)}" for f, p in consumable.items())
            raise EdgekdError(f"target {target.name} runs {target.runtime}, which cannot use {format} {precision}: "
                              f"use {wanted}")
    return Choice(fmt, precision, {k: v for k, v in options.items() if k in fmt.options})


def require_modules(fmt: Format) -> None:
    """Name the pip extra when a converter's dependencies are missing (checked without importing them)."""
    missing = [m for m in fmt.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgekdError(f"format {fmt.name} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: {INSTALL_HINT}")
