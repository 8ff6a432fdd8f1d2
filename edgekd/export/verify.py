"""Agreement between an exported model and the PyTorch model it came from, on held-out images.

fp32 artifacts are judged by the maximum absolute logit error (they should be numerically the same model);
quantized ones (fp16, dynamic-range, int8) by top-1 agreement with PyTorch, and accuracy is reported for
both. A failed check raises an EdgekdError: nothing is reported as exported before it passed.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import torch
from torch import nn

from ..errors import EdgekdError

FP32_TOLERANCE = 1e-3  # max abs logit error accepted for fp32 artifacts (measured errors are ~1e-5)
MIN_AGREEMENT = 0.9  # top-1 agreement with PyTorch accepted for quantized artifacts


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model = model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(x[i : i + batch_size])).float().numpy())
    return np.concatenate(out)


def onnxruntime_logits(path, x: np.ndarray, threads: int = 1, optimize: bool = True) -> np.ndarray:
    """Runs an ONNX file on the CPU (one image per call when the batch dimension is static).

    optimize=False runs the graph as written: for a QDQ model every QuantizeLinear/DequantizeLinear is executed
    in float, the semantics TensorRT implements, where ORT's own int8 fusions round differently."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are not the user's concern
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    step = spec.shape[0] if isinstance(spec.shape[0], int) else 256
    return np.concatenate([session.run(None, {spec.name: x[i : i + step]})[0] for i in range(0, len(x), step)])


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype=np.int8) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - zero_point) * scale


class LiteRT:
    """A .tflite model in LiteRT, one image per invoke.

    kernels="default" is what LiteRT runs on a CPU device (XNNPACK delegate and optimised kernels);
    kernels="reference" uses the reference kernels, the same code TFLite Micro's reference kernels follow, so
    TFLM must reproduce it (optimised int8 kernels round differently and can differ by several LSB)."""

    def __init__(self, path, kernels: str = "default", preserve: bool = False):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = {"default": OpResolverType.AUTO, "reference": OpResolverType.BUILTIN_REF}[kernels]
        with _quiet_stderr():  # LiteRT announces its XNNPACK delegate on the C stderr
            # preserve: keep every intermediate tensor readable after invoke (the per-layer error report)
            self.interpreter = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver,
                                           experimental_preserve_all_tensors=preserve)
            self.interpreter.allocate_tensors()
        self.kernels = kernels
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def io_spec(self) -> dict:
        def spec(d):
            scale, zero_point = d["quantization"]
            quant = {"scale": float(scale), "zero_point": int(zero_point)} if scale else None
            return {"name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                    "quantization": quant}
        return {"input": spec(self.input), "output": spec(self.output)}

    def quantize_input(self, x_nhwc: np.ndarray) -> np.ndarray:
        """Float NHWC images -> what the input tensor takes (int8 for a full-integer model)."""
        if self.input["dtype"] == np.float32:
            return x_nhwc.astype(np.float32)
        scale, zero_point = self.input["quantization"]
        return quantize(x_nhwc, scale, zero_point, self.input["dtype"])

    def raw(self, inputs: np.ndarray) -> np.ndarray:
        """Inputs already in the input tensor's dtype, (N, H, W, C) -> raw outputs (N, classes)."""
        out = []
        for x in inputs:
            self.interpreter.set_tensor(self.input["index"], x[None])
            self.interpreter.invoke()
            out.append(self.interpreter.get_tensor(self.output["index"])[0].copy())
        return np.stack(out)

    def logits(self, raw: np.ndarray) -> np.ndarray:
        if self.output["dtype"] == np.float32:
            return raw
        scale, zero_point = self.output["quantization"]
        return dequantize(raw, scale, zero_point)


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (C/C++ logging that Python's sys.stderr does not see) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement of `logits` with the reference logits (PyTorch) and accuracy of both on `labels`."""
    ref_top1, top1 = reference.argmax(1), logits.argmax(1)
    return {
        "images": int(len(labels)),
        "max_abs_logit_error": float(np.abs(logits - reference).max()),
        "top1_agreement": float((top1 == ref_top1).mean()),
        "accuracy": float((top1 == labels).mean()),
        "reference_accuracy": float((ref_top1 == labels).mean()),
    }


def check(metrics: dict, precision: str, what: str, *, fp32_tolerance: float = FP32_TOLERANCE,
          min_agreement: float = MIN_AGREEMENT, detail: str = "") -> dict:
    """Adds the criterion and its verdict to `metrics`; raises when the artifact does not pass it. `detail` ends
    the message (for int8: the layers that add the most error)."""
    if precision == "fp32":
        metrics["criterion"] = f"max abs logit error <= {fp32_tolerance:g}"
        if not metrics["max_abs_logit_error"] <= fp32_tolerance:  # also catches NaN
            raise EdgekdError(
                f"{what} differs from PyTorch by {metrics['max_abs_logit_error']:.3g} (max abs logit error, tolerance "
                f"{fp32_tolerance:g}) on {metrics['images']} test images: the conversion is wrong; report it with the manifest")
    else:
        metrics["criterion"] = f"top-1 agreement with PyTorch >= {min_agreement:g}"
        if not metrics["top1_agreement"] >= min_agreement:
            raise EdgekdError(
                f"{what} agrees with PyTorch on top-1 for only {metrics['top1_agreement']:.1%} of {metrics['images']} test "
                f"images (needs {min_agreement:.0%}): use more calibration images (--calib-images), a higher precision, "
                f"or a better-trained model{detail}")
    metrics["passed"] = True
    return metrics
