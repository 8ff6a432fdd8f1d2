"""ONNX -> TFLite with onnx2tf, run in a subprocess.

Why a subprocess: TensorFlow prints pages of CUDA/absl noise on import and keeps ~1 GB after a conversion;
in a child process its output goes to a log file and its memory goes away. The child gets no network: onnx2tf
downloads a sample calibration file for image inputs even when it is given real data, so a placeholder is
written under that name in its working directory, and proxies point nowhere so any other download attempt
fails instead of reaching out. The real calibration images are the run's training images, normalised by
onnx2tf with the run's mean/std (-cind).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import EdgekdError

# what onnx2tf writes for each precision, given an input file named model.onnx
OUTPUT_FILES = {
    "fp32": "model_float32.tflite",
    "fp16": "model_float16.tflite",
    "dynamic-range": "model_dynamic_range_quant.tflite",
    "int8": "model_full_integer_quant.tflite",
}
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf's download target
TIMEOUT_S = 1800


def onnx2tf_command(onnx_path: Path, out_dir: Path, precision: str, calib_file: Path | None,
                    mean, std) -> list[str]:
    cmd = [sys.executable, "-m", "onnx2tf", "-i", str(onnx_path), "-o", str(out_dir), "-v", "warn"]
    if precision == "dynamic-range":
        cmd += ["-odrqt", "-qt", "per-channel"]
    elif precision == "int8":
        # full-integer model with int8 input and output (what TFLite Micro kernels need), per-channel weights
        cmd += ["-oiqt", "-qt", "per-channel", "-iqd", "int8", "-oqd", "int8",
                "-cind", "input", str(calib_file), _literal(mean), _literal(std)]
    return cmd


def _literal(values) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _environment() -> dict:
    env = dict(os.environ)
    # onnx2tf shells out to `onnxsim`; without the venv's bin on PATH it silently skips that step
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1", PYTHONWARNINGS="ignore",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", no_proxy="")
    return env


def convert(onnx_path: Path, work_dir: Path, precision: str, *, calib_pixels_nchw: np.ndarray | None = None,
            mean=(0.0,), std=(1.0,)) -> tuple[Path, dict]:
    """Converts `onnx_path` (static shape) and returns (the .tflite for `precision`, conversion info).

    `calib_pixels_nchw`: float32 images in [0, 1] (pixel / 255), needed for int8; onnx2tf normalises them
    with `mean`/`std`, exactly as training did.
    """
    if precision not in OUTPUT_FILES:
        raise EdgekdError(f"TFLite precision '{precision}' is not one of {', '.join(OUTPUT_FILES)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = work_dir / "model.onnx"
    if Path(onnx_path).resolve() != model.resolve():
        shutil.copyfile(onnx_path, model)
    np.save(work_dir / SAMPLE_FILE, np.zeros((20, 128, 128, 3), np.float32))
    calib_file = None
    if precision == "int8":
        if calib_pixels_nchw is None or len(calib_pixels_nchw) == 0:
            raise EdgekdError("int8 TFLite needs calibration images; pass calib_images > 0")
        calib_file = work_dir / "calibration.npy"
        np.save(calib_file, np.ascontiguousarray(calib_pixels_nchw.transpose(0, 2, 3, 1), dtype=np.float32))
    out_dir = work_dir / "onnx2tf"
    cmd = onnx2tf_command(model, out_dir, precision, calib_file, mean, std)
    log = work_dir / "onnx2tf.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=work_dir, env=_environment(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - started
    result = out_dir / OUTPUT_FILES[precision]
    if rc != 0 or not result.is_file():
        kept = _keep_log(log)
        reason = "timed out" if rc == "timeout" else f"exit {rc}" if rc != 0 else f"no {result.name} written"
        raise EdgekdError(f"onnx2tf failed ({reason}: {_last_error(log)}); full log: {kept}")
    return result, {"tool": "onnx2tf", "command": " ".join(_shown(cmd, work_dir)), "convert_s": round(seconds, 1)}


def _shown(cmd: list[str], work_dir: Path) -> list[str]:
    """The command as a user could re-run it from the work directory."""
    shown = ["onnx2tf"] + cmd[3:]
    return [a.replace(str(work_dir) + os.sep, "") for a in shown]


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line.lower().split(":")[0]:
            return line[:200]
    return lines[-1][:200] if lines else "no output"


def _keep_log(log: Path) -> str:
    """The work directory is deleted on failure; the log survives in the temp dir for the bug report."""
    fd, kept = tempfile.mkstemp(prefix="edgekd-onnx2tf-", suffix=".log")
    os.close(fd)
    shutil.copyfile(log, kept)
    return kept


def build(job) -> dict:
    """The `tflite` format: ONNX -> onnx2tf -> .tflite, verified in LiteRT; int8 also in TFLite Micro + C array."""
    from . import tflm
    from .torch2onnx import export_onnx
    from .verify import LiteRT, check, compare

    onnx_path = job.work / "model.onnx"
    quantization = None
    if job.precision == "int8" and job.choice.quantizer == "nncf":
        model, quantization = _nncf_weights(job)
        onnx_info = export_onnx(model, onnx_path, resolution=job.resolution, channels=job.channels, fold=False)
    else:
        onnx_info = export_onnx(job.model, onnx_path, resolution=job.resolution, channels=job.channels)
        if job.precision == "int8":
            quantization = {"quantizer": "onnx2tf", "weights": "int8 symmetric per-channel, from the float weights",
                            "activations": f"int8 per-tensor, calibrated by onnx2tf on {len(job.samples.calib_pixels)} "
                                           "training images"}
    calibration = f", calibrating on {len(job.samples.calib_pixels)} training images" if job.precision == "int8" else ""
    job.say(f"converting with onnx2tf ({job.precision}{calibration}; about a minute)")
    converted, info = convert(onnx_path, job.work / "tflite", job.precision, calib_pixels_nchw=job.samples.calib_pixels,
                              mean=job.samples.mean, std=job.samples.std)
    artifact = job.stage / f"{job.stem}.tflite"
    shutil.copyfile(converted, artifact)
    job.check_flash(artifact)

    started = time.perf_counter()
    runtime = LiteRT(artifact)
    io = runtime.io_spec()
    io["input"]["layout"] = "NHWC"
    io["input"]["normalisation"] = job.normalisation
    if job.precision == "int8" and not (io["input"]["dtype"] == io["output"]["dtype"] == "int8"):
        raise EdgekdError(f"onnx2tf wrote {io['input']['dtype']} input / {io['output']['dtype']} output instead of int8: "
                          "check the onnx2tf version (pinned in the export extra)")
    inputs = runtime.quantize_input(job.samples.test_x.transpose(0, 2, 3, 1))
    raw = runtime.raw(inputs)
    logits = runtime.logits(raw)
    metrics = compare(job.reference_logits, logits, job.samples.test_y)
    metrics.update(runtime="ai-edge-litert (default CPU kernels, XNNPACK)", seconds=round(time.perf_counter() - started, 3))
    job.compare_with_float_source(metrics, logits)
    report = None
    if job.precision == "int8":  # before the gate, so that a failure names the layers
        from . import layer_errors

        report = layer_errors.tflite_layer_errors(converted.parent / OUTPUT_FILES["fp32"], artifact,
                                                  job.samples.test_x.transpose(0, 2, 3, 1), onnx_path)
        job.layer_hint = layer_errors.hint(report)
    check(metrics, job.precision, f"TFLite {job.precision} model", fp32_tolerance=job.fp32_tolerance,
          min_agreement=job.min_agreement, detail=job.layer_hint)
    result = {
        "artifact": artifact,
        "onnx": onnx_info,
        "conversion": info,
        "ops": tflm.list_ops(artifact),
        "io": io,
        "verification": {"litert": metrics},
    }
    if quantization is not None:
        result["quantization"] = quantization
    if report is not None:
        result["layer_errors"] = report
    if job.precision == "int8":
        result.update(tflm.build_micro(job, artifact, inputs, raw, io))
    return result


def _nncf_weights(job):
    """The NNCF model's weights on its int8 grid (QAT-trained for a quantized run) in the plain folded model.

    onnx2tf 1.29 takes a QDQ ONNX but replaces every QuantizeLinear that feeds only DequantizeLinear by its
    input (ops/QuantizeLinear.py, bypass_fake_quant): weights keep their values, activation ranges are dropped.
    So the learned activation ranges cannot be handed to it; onnx2tf calibrates activations itself and the
    manifest says so."""
    import torch

    from ..quantize import nncf_backend
    from .qdq import nncf_model

    qmodel, state, _ = nncf_model(job)
    payload = job.payload if job.quantization else {"model_config": job.payload["model_config"],
                                                    "state_dict": qmodel.state_dict()}
    model, on_grid = nncf_backend.grid_weights_model(qmodel, payload, torch.from_numpy(job.samples.test_x[:1]))
    origin = (f"{state.get('method', 'nncf')} run" if job.quantization else
              f"NNCF post-training quantization here ({state['calibration_images']} training images)")
    return model, {
        "quantizer": "nncf", "origin": origin,
        "weights": f"NNCF's int8 grid ({on_grid} weight tensors, per-channel): the values NNCF's quantizers give, "
                   "re-quantized per-channel by the TFLite converter",
        "activations": f"int8 per-tensor, calibrated by onnx2tf on {len(job.samples.calib_pixels)} training images",
        "learned_activation_ranges": False,
        "why": "onnx2tf 1.29 bypasses QuantizeLinear->DequantizeLinear pairs of a QDQ ONNX (keeps the values, drops "
               "the ranges), so NNCF's activation ranges cannot be handed to it",
    }
