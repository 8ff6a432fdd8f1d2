"""The formats table: one row per export format. It drives dispatch and rejects bad combinations up front.

A row says what the format produces (suffix), which precisions and options it accepts, which Python modules
it needs (all from the `export` extra) and which converter builds it. Everything the user can get wrong about
format/precision/target is checked here, before a model or a dataset is loaded.

This module is the one source of truth for formats, precisions and runtimes: target validation
(edgekd/targets.py) and the CLI's --format/--precision choices are derived from it. It imports nothing heavy
(edgekd.export's __init__ imports nothing), so both can use it at import time.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import EdgekdError

if TYPE_CHECKING:
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

# every precision some format exports at, in this order (the CLI's --precision choices)
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.precisions))
# what a target deploys at (the profiler models these); dynamic-range is an export-only choice
TARGET_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
DEVICE_CLASSES: tuple[str, ...] = ("mcu", "cpu", "gpu")


@dataclass(frozen=True)
class Runtime:
    name: str
    device_classes: tuple[str, ...]  # the kinds of processor it runs on
    formats: tuple[str, ...]  # the export formats it consumes
    precisions: tuple[str, ...] | None = None  # None: every precision of those formats

    def consumes(self) -> dict[str, tuple[str, ...]]:
        """{format: precisions} this runtime can run."""
        return {f: tuple(p for p in FORMATS[f].precisions if self.precisions is None or p in self.precisions)
                for f in self.formats}


# What each runtime can actually consume. TFLite Micro only runs on MCUs and we only ship full-int8 models
# there; TensorRT only runs on NVIDIA GPUs and builds its engine from ONNX (or loads a prebuilt engine).
RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("tensorrt", ("gpu",), ("tensorrt", "onnx")),
        Runtime("tflite", ("cpu", "gpu"), ("tflite",)),
        Runtime("tflite-micro", ("mcu",), ("tflite",), ("int8",)),
    )
}
RUNTIME_FORMATS: dict[str, dict[str, tuple[str, ...]]] = {name: r.consumes() for name, r in RUNTIMES.items()}


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
