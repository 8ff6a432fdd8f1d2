"""PyTorch -> ONNX: opset 17, BatchNorm folded, constants folded and simplified, checked.

Every other format starts from this ONNX file (onnx2tf for TFLite, TensorRT's ONNX parser), so its input
is fixed here: NCHW float32, the run's resolution and channels, normalised with the run's mean/std.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import EdgekdError
from ..models.fold import fold_batchnorm_in_place

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, path: Path, *, resolution: int, channels: int, dynamic_batch: bool = False,
                fold: bool = True) -> dict:
    """Writes a checked, simplified ONNX file; returns what the manifest records about it.

    fold=False exports the model as it is: quantized models had their BatchNorm folded before quantizing, and
    torch.fx cannot trace their quantizers."""
    import onnx
    import onnxsim

    path = Path(path)
    folded, traced = _folded(model) if fold else (model.eval(), False)
    example = torch.zeros(1, channels, resolution, resolution)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but the dynamo exporter in torch 2.14 cannot write opset 17 for
        # these models (its down-conversion from 18 fails on ReduceMean) and specialises a batch of 1.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                folded, (example,), str(path), opset_version=OPSET, dynamo=False, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
            )
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise EdgekdError(f"PyTorch could not export the model to ONNX ({first}): the model uses an operation "
                              f"ONNX opset {OPSET} cannot express") from None
    graph = onnx.load(str(path))
    simplified, ok = onnxsim.simplify(graph)
    if not ok:
        raise EdgekdError(f"onnxsim could not validate the simplified {path.name}: export with a plain model "
                          "or report the model")
    onnx.checker.check_model(simplified, full_check=True)
    onnx.save(simplified, str(path))
    ops = Counter(node.op_type for node in simplified.graph.node)
    return {
        "opset": OPSET,
        "exporter": "torch.onnx (TorchScript)",
        "batchnorm_folded": "BatchNormalization" not in ops,
        "batchnorm_folded_in_pytorch": traced,
        "dynamic_batch": dynamic_batch,
        "nodes": int(sum(ops.values())),
        "ops": dict(sorted(ops.items())),
        "export_s": round(time.perf_counter() - started, 3),
    }


def _folded(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval copy with BatchNorm folded into the convolutions in place, so the ONNX node names keep the module
    paths ('/blocks/blocks.0/conv_dw/conv/Conv'; the per-layer error report shows them). An untraceable model is
    exported unfolded: onnxsim folds its BatchNorm into the convolutions anyway."""
    model = copy.deepcopy(model).eval()
    try:
        fold_batchnorm_in_place(model)
    except Exception:  # torch.fx cannot trace data-dependent control flow
        return model, False
    return model, True


def build(job) -> dict:
    """The `onnx` format: the ONNX file itself, verified in ONNX Runtime against PyTorch (int8: qdq.build)."""
    from .verify import check, compare, onnxruntime_logits

    path = job.stage / f"{job.stem}.onnx"
    info = export_onnx(job.model, path, resolution=job.resolution, channels=job.channels,
                       dynamic_batch=job.options.get("dynamic_batch", False))
    job.check_flash(path)
    started = time.perf_counter()
    logits = onnxruntime_logits(path, job.samples.test_x)
    metrics = compare(job.reference_logits, logits, job.samples.test_y)
    metrics.update(runtime="onnxruntime", seconds=round(time.perf_counter() - started, 3))
    check(metrics, "fp32", f"ONNX model {path.name}", fp32_tolerance=job.fp32_tolerance)
    batch = "batch" if info["dynamic_batch"] else 1
    return {
        "artifact": path,
        "onnx": info,
        "ops": info["ops"],
        "io": io_spec(job, batch),
        "verification": {"onnxruntime": metrics},
    }


def io_spec(job, batch) -> dict:
    return {
        "input": {"name": INPUT_NAME, "shape": [batch, job.channels, job.resolution, job.resolution],
                  "layout": "NCHW", "dtype": "float32", "quantization": None},
        "output": {"name": OUTPUT_NAME, "shape": [batch, job.num_classes], "dtype": "float32", "quantization": None},
    }
