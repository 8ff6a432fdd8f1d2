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
    quantizers: tuple[str, ...] = ()  # what can make this format's int8 artifact (QUANTIZERS), default first
    int8_converter: str | None = None  # when int8 takes another route than `converter`

    def load_converter(self, precision: str | None = None) -> Callable:
        route = self.int8_converter if precision == "int8" and self.int8_converter else self.converter
        module, _, fn = route.partition(":")
        return getattr(importlib.import_module(f"edgekd.export.{module}"), fn)


_ONNX = ("onnx", "onnxsim", "onnxruntime")

# Who turns a float model into int8. A quantized run (edgekd quantize) always exports through "nncf": its own
# quantizers are the point of it.
QUANTIZERS: dict[str, str] = {
    "onnx2tf": "onnx2tf full-integer quantization: the TFLite converter calibrates on the run's training images",
    "ort": "ONNX Runtime quantize_static: QDQ ONNX, symmetric int8, MinMax calibration on the run's training images",
    "nncf": "NNCF: a quantized run's own (PTQ or QAT) quantizers; a float run gets NNCF post-training quantization "
            "first. QDQ ONNX from the stripped NNCF model; TFLite: its int8-grid weights, activations calibrated by "
            "onnx2tf",
}
NNCF_MODULES = ("nncf", "torchao")  # the `nncf` extra

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ".onnx", ("fp32", "int8"), "fp32", ("dynamic_batch",), _ONNX, "torch2onnx:build",
               "ONNX opset 17, BatchNorm folded, simplified, checked by ONNX Runtime; int8 = QDQ ONNX",
               ("ort", "nncf"), "qdq:build"),
        Format("tflite", ".tflite", ("fp32", "fp16", "dynamic-range", "int8"), "fp32", (),
               _ONNX + ("onnx2tf", "tensorflow", "ai_edge_litert", "tflite_micro"), "onnx2tflite:build",
               "TFLite via onnx2tf; int8 = full-integer with int8 input/output, run in TFLite Micro, plus a C array",
               ("onnx2tf", "nncf")),
        Format("tensorrt", ".onnx", ("fp16", "int8"), "fp16", (), _ONNX + ("polygraphy", "onnx_graphsurgeon"),
               "onnx2trt:build",
               "TensorRT-ready ONNX (int8: QDQ) + reference data + build_engine.sh; the engine is built on the device",
               ("ort", "nncf")),
    )
}

# every precision some format exports at, in this order (the CLI's --precision choices)
# (the format with the most precisions first, so they read from fp32 down to int8)
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(
    p for f in sorted(FORMATS.values(), key=lambda f: -len(f.precisions)) for p in f.precisions))
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
    quantizer: str | None = None  # int8 only: a QUANTIZERS key


def choose(format: str | None, precision: str | None, target: Target | None, options: dict, *,
           quantizer: str | None = None, quantized: str | None = None) -> Choice:
    """Resolve format, precision and quantizer (flags first, then the target's defaults) and validate the
    combination. `quantized`: how the source was quantized (e.g. "nncf-qat"), None for a float model; such a
    source exports at int8, through its own quantizers."""
    if format is None:
        if target is None:
            raise EdgekdError("say what to export: pass --format onnx|tflite|tensorrt or --target NAME")
        format = target.export.format
    if format not in FORMATS:
        raise EdgekdError(f"unknown format '{format}'; use one of {', '.join(FORMATS)}")
    if quantizer is not None and quantizer not in QUANTIZERS:
        raise EdgekdError(f"unknown quantizer '{quantizer}'; use one of {', '.join(QUANTIZERS)}")
    fmt = FORMATS[format]
    if precision is None:
        same_format = target is not None and target.export.format == format
        precision = target.export.precision if same_format else fmt.default_precision
        if (quantized or quantizer) and "int8" in fmt.precisions:
            precision = "int8"  # a quantizer (or a quantized run) means int8
    if quantized and precision != "int8":
        raise EdgekdError(f"the model is quantized ({quantized}): it exports at int8 only (--precision int8); "
                          f"export its float run for {precision}")
    if precision not in fmt.precisions:
        hint = {
            ("onnx", "fp16"): "; ONNX export is fp32 (TensorRT picks fp16 on the device: --format tensorrt)",
            ("tensorrt", "fp32"): "; use --format onnx for a plain fp32 ONNX",
        }.get((format, precision), "")
        raise EdgekdError(f"format {format} does not support precision '{precision}'; "
                          f"use one of {', '.join(fmt.precisions)}{hint}")
    for key, value in options.items():
        if value and key not in fmt.options:
            allowed = f"only {', '.join(o.replace('_', '-') for o in fmt.options)}" if fmt.options else "no options"
            raise EdgekdError(f"format {format} does not take --{key.replace('_', '-')} (it accepts {allowed})")
    if precision == "int8" and options.get("dynamic_batch"):
        raise EdgekdError("an int8 QDQ ONNX has a static batch of 1: drop --dynamic-batch")
    if target is not None:
        consumable = RUNTIME_FORMATS[target.runtime]
        if format not in consumable or precision not in consumable[format]:
            wanted = "; ".join(f"--format {f} --precision {'|'.join(p)}" for f, p in consumable.items())
            raise EdgekdError(f"target {target.name} runs {target.runtime}, which cannot use {format} {precision}: "
                              f"use {wanted}")
    return Choice(fmt, precision, {k: v for k, v in options.items() if k in fmt.options},
                  _quantizer(fmt, precision, quantizer, quantized))


def _quantizer(fmt: Format, precision: str, quantizer: str | None, quantized: str | None) -> str | None:
    if precision != "int8":
        if quantizer is not None:
            raise EdgekdError(f"--quantizer makes int8 models; {fmt.name} {precision} is not quantized "
                              "(pass --precision int8)")
        return None
    if quantized:
        if quantizer not in (None, "nncf"):
            raise EdgekdError(f"the model is quantized ({quantized}): it exports through its own quantizers "
                              f"(--quantizer nncf); for --quantizer {quantizer} export its float run")
        return "nncf"
    if quantizer is None:
        return fmt.quantizers[0]
    if quantizer not in fmt.quantizers:
        makes = {"onnx2tf": "TFLite, not a QDQ ONNX", "ort": "a QDQ ONNX, not TFLite"}.get(quantizer, "other formats")
        raise EdgekdError(f"quantizer {quantizer} cannot make {fmt.name} int8 (it writes {makes}): use --quantizer "
                          f"{'|'.join(fmt.quantizers)}")
    return quantizer


def require_modules(fmt: Format, quantizer: str | None = None) -> None:
    """Name the pip extra when a converter's dependencies are missing (checked without importing them)."""
    missing = [m for m in fmt.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgekdError(f"format {fmt.name} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: {INSTALL_HINT}")
    missing = [m for m in NNCF_MODULES if quantizer == "nncf" and importlib.util.find_spec(m) is None]
    if missing:
        raise EdgekdError(f"--quantizer nncf needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not installed: pip install 'edgekd[nncf]'")
