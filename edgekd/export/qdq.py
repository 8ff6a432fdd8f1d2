"""int8 QDQ ONNX (explicit quantization: the form TensorRT consumes and ONNX Runtime runs), by two quantizers:

- "ort": ONNX Runtime's quantize_static on the plain ONNX, calibrated on the run's training images.
- "nncf": the NNCF model (a quantized run's own, or NNCF post-training quantization of a float run here),
  stripped to torch-native FakeQuantize modules and exported with the TorchScript exporter (the dynamo exporter
  fails on them, and NNCF's own modules export as a custom op ORT rejects).

Both give symmetric int8 (zero point 0, signed) on standard ONNX ops only, which TensorRT requires; that is
checked on the file. Each also writes the float ONNX it is compared with layer by layer (layer_errors.py): the
same graph without the quantize/dequantize pairs.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgekdError
from ..models.fold import fold_batchnorm_in_place
from .torch2onnx import export_onnx, io_spec


def quantize_ort(onnx_path: Path, out_path: Path, calib_x: np.ndarray, work: Path) -> dict:
    """Static int8 QDQ quantization with ONNX Runtime on normalised NCHW calibration images."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(range(len(calib_x)))

        def get_next(self):
            i = next(self.items, None)
            return None if i is None else {"input": calib_x[i : i + 1]}

    started = time.perf_counter()
    prepared = work / "prepared.onnx"
    quant_pre_process(str(onnx_path), str(prepared))  # shape inference + basic folding, as ORT recommends
    quantize_static(
        str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    ops = finish(out_path)
    return {"quantizer": "ort", "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel", "bias": "float",
            "calibration": "MinMax", "calibration_images": int(len(calib_x)), "ops": ops,
            "float_onnx": prepared, "quantize_s": round(time.perf_counter() - started, 2)}


def quantize_nncf(job, out_path: Path) -> dict:
    """QDQ ONNX from the NNCF model: the job's own (a quantized run) or NNCF PTQ of the float model."""
    from ..quantize import nncf_backend

    started = time.perf_counter()
    qmodel, state, float_model = nncf_model(job)
    example = torch.from_numpy(job.samples.test_x[:1])
    stripped = nncf_backend.strip(qmodel, example)
    onnx_info = export_onnx(stripped, out_path, resolution=job.resolution, channels=job.channels, fold=False)
    ops = finish(out_path)
    float_onnx = job.work / "float.onnx"
    export_onnx(float_model, float_onnx, resolution=job.resolution, channels=job.channels, fold=False)
    origin = (f"{state.get('method', 'nncf')} run: its own quantizers" if job.quantization else
              f"NNCF post-training quantization here, {state['calibration_images']} training images")
    return {"quantizer": "nncf", "tool": f"nncf {state['nncf_version']} (nncf.strip + TorchScript ONNX exporter)",
            "format": "QDQ", "origin": origin, **state["scheme"], "ops": ops, "float_onnx": float_onnx, "onnx": onnx_info,
            "float_reference": "the same weights unquantized (for the per-layer report)",
            "quantize_s": round(time.perf_counter() - started, 2)}


def nncf_model(job):
    """(fake-quantized NNCF model, its quantization state, its float counterpart) for the job, made once."""
    from ..quantize import nncf_backend

    if getattr(job, "_nncf", None) is None:
        if job.quantization:
            job._nncf = (job.model, job.quantization, nncf_backend.float_model(job.payload))
        else:
            x, step = job.samples.calib_x, nncf_backend.CALIBRATION_BATCH
            batches = [torch.from_numpy(x[i : i + step]) for i in range(0, len(x), step)]
            job.say(f"quantizing with NNCF (post-training, {len(x)} training images)")
            qmodel, state = nncf_backend.ptq(job.model, batches)
            folded = copy.deepcopy(job.model).eval()
            fold_batchnorm_in_place(folded)
            job._nncf = (qmodel, state, folded)
    return job._nncf


def fold_weight_quantizers(model) -> int:
    """QuantizeLinear nodes on constant weights become int8 initializers (what ORT's quantizer writes as well):
    the file shrinks to about a quarter and the graph means exactly the same (ONNX QuantizeLinear rounds half to
    even, as numpy.rint does). Returns how many were folded."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not all(n in initializers for n in node.input[:3]):
            continue
        x, scale, zp = (numpy_helper.to_array(initializers[n]) for n in node.input[:3])
        if zp.dtype != np.int8 or consumers.get(node.input[0], 0) != 1:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * x.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis % x.ndim] = scale.size
        q = np.clip(np.rint(x / scale.reshape(shape)) + zp.reshape(shape if zp.size > 1 else ()), -128, 127).astype(np.int8)
        model.graph.initializer.remove(initializers[node.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    used = {n for node in model.graph.node for n in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    return len(folded)


def finish(path: Path) -> dict[str, int]:
    """Checks a QDQ file is what TensorRT takes (standard ops, signed int8 with zero point 0) and returns its ops."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    fold_weight_quantizers(model)
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise EdgekdError(f"the QDQ model uses non-standard op domains {', '.join(foreign)}, which TensorRT cannot parse")
    # quant_pre_process declares ONNX Runtime's private opsets; no node uses them and TensorRT need not see them
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = initializers.get(node.input[2], constants.get(node.input[2]))
            if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
                raise EdgekdError(f"the QDQ model quantizes {node.input[0]} to {zp.dtype} with zero point "
                                  f"{zp.ravel()[:3].tolist()}: TensorRT takes signed int8 with zero point 0 only")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def make(job, out_path: Path) -> dict:
    """The int8 QDQ ONNX at `out_path` by the job's quantizer; returns what the manifest records about it
    (with "float_onnx": the float graph for the per-layer report)."""
    if job.choice.quantizer == "nncf":
        return quantize_nncf(job, out_path)
    onnx_path = job.work / "model.onnx"
    onnx_info = export_onnx(job.model, onnx_path, resolution=job.resolution, channels=job.channels)
    job.say(f"quantizing to QDQ int8 with ONNX Runtime on {len(job.samples.calib_x)} training images")
    return {**quantize_ort(onnx_path, out_path, job.samples.calib_x, job.work), "onnx": onnx_info}


def verify(job, path: Path, float_onnx: Path) -> dict:
    """A QDQ ONNX in ONNX Runtime twice against the PyTorch reference (for a quantized run its fake-quantized
    model): as written (graph optimizations off: TensorRT's semantics) and with ORT's int8 kernels; both must
    pass the agreement gate. Returns the verification section and the per-layer report."""
    from . import layer_errors
    from .verify import check, compare, onnxruntime_logits

    report = layer_errors.onnx_layer_errors(float_onnx, path, job.samples.test_x)
    detail = layer_errors.hint(report)
    sections = {}
    for key, optimize, runtime in (("onnxruntime", True, "onnxruntime (default graph optimizations: its int8 kernels)"),
                                   ("onnxruntime_qdq_as_written", False,
                                    "onnxruntime, graph optimizations off (each Q/DQ as written: TensorRT's semantics)")):
        started = time.perf_counter()
        logits = onnxruntime_logits(path, job.samples.test_x, optimize=optimize)
        metrics = compare(job.reference_logits, logits, job.samples.test_y)
        metrics.update(runtime=runtime, seconds=round(time.perf_counter() - started, 3))
        job.compare_with_float_source(metrics, logits)
        check(metrics, "int8", f"int8 QDQ ONNX {path.name} ({key})", min_agreement=job.min_agreement, detail=detail)
        sections[key] = metrics
        if key == "onnxruntime":
            job.default_logits = logits
    return {"verification": sections, "layer_errors": report}


def build(job) -> dict:
    """The `onnx` format at int8: the QDQ ONNX itself, verified as written and with ORT's int8 kernels, with its
    per-layer error report."""
    path = job.stage / f"{job.stem}.onnx"
    info = make(job, path)
    job.check_flash(path)
    checked = verify(job, path, info.pop("float_onnx"))
    return {"artifact": path, "onnx": info.pop("onnx"), "quantization": info, "ops": info["ops"], **checked,
            "io": io_spec(job, 1)}
