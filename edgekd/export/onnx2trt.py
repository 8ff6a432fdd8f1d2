"""ONNX -> a TensorRT-ready bundle for a Jetson. The engine itself is built ON THE DEVICE.

TensorRT cannot be installed where edgekd runs its CI (PyPI's wheel needs an unreachable index and Debian has
none), and an engine is specific to the GPU and TensorRT version that build it anyway. So this writes what
the device needs and checks everything that can be checked here:
- fp16: the plain fp32 ONNX; TensorRT chooses fp16 kernels when building with --fp16.
- int8: a QDQ ONNX (explicit quantization, the form TensorRT consumes for INT8), see qdq.py: from ONNX
  Runtime's quantize_static (--quantizer ort, the default for float runs) or from the NNCF model
  (--quantizer nncf; always for runs of `edgekd quantize`): symmetric int8 activations and per-channel
  weights (TensorRT needs signed int8 with zero points of 0), biases left in float.
- `polygraphy check lint` on the model, ONNX Runtime vs PyTorch agreement, reference inputs/outputs saved
  with polygraphy, and the device-side check (`polygraphy run ... --load-outputs`) run here with ONNX Runtime
  standing in for TensorRT, so the command and files are known to work.
- build_engine.sh: trtexec with the precision and a workspace derived from the target's memory, then the
  polygraphy check of the built engine against the references.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgekdError

REFERENCE_IMAGES = 32
DEFAULT_WORKSPACE_MIB = 512  # without a target; with one: half the memory it budgets for the model


def _polygraphy(*args: str, cwd: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "polygraphy"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]
    env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0", CUDA_VISIBLE_DEVICES="-1")
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          stdin=subprocess.DEVNULL)


def _failed(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("[E]", "[!]"))]
    return (errors or lines or [f"exit {proc.returncode}"])[-1][:200]


def lint(path: Path, work: Path) -> dict:
    report = work / "lint.json"
    proc = _polygraphy("check", "lint", str(path), "-o", str(report), cwd=work)
    data = json.loads(report.read_text()) if report.is_file() else {}
    failing = data.get("summary", {}).get("failing", [])
    errors = [e.get("message", "")[:160] for e in data.get("lint_entries", []) if e.get("level") == "error"]
    if proc.returncode != 0 or failing or errors:
        detail = errors[0] if errors else (f"failing nodes: {', '.join(failing[:5])}" if failing else _failed(proc))
        raise EdgekdError(f"polygraphy lint rejects {path.name} ({detail}): TensorRT would not parse it")
    return {"tool": "polygraphy check lint", "passed": True,
            "nodes_passing": len(data.get("summary", {}).get("passing", [])),
            "warnings": [e.get("message", "")[:160] for e in data.get("lint_entries", []) if e.get("level") == "warning"]}


def reference_data(path: Path, x: np.ndarray, logits: np.ndarray, stage: Path, work: Path) -> dict:
    """Saves polygraphy reference inputs (the clearest held-out images) and ONNX Runtime outputs for the device.

    The images with the largest top-1 margin are chosen so that rounding differences between TensorRT kernels
    and ONNX Runtime cannot flip them: on the device a flipped top-1 means a broken build, not a near tie."""
    from polygraphy.json import save_json

    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    chosen = np.sort(np.argsort(-margin, kind="stable")[:REFERENCE_IMAGES])
    save_json([{"input": x[i : i + 1].astype(np.float32)} for i in chosen], str(stage / "ref_inputs.json"))
    proc = _polygraphy("run", path.name, "--onnxrt", "--load-inputs", "ref_inputs.json",
                       "--save-outputs", "ref_outputs.json", cwd=stage)
    if proc.returncode != 0:
        raise EdgekdError(f"polygraphy could not run {path.name} in ONNX Runtime ({_failed(proc)})")
    check = ["--load-inputs", "ref_inputs.json", "--load-outputs", "ref_outputs.json", "--postprocess", "top-1",
             "--compare", "indices"]
    proc = _polygraphy("run", path.name, "--onnxrt", *check, cwd=stage)
    if proc.returncode != 0:
        raise EdgekdError(f"the reference check fails even in ONNX Runtime ({_failed(proc)}): report it with the manifest")
    return {"inputs": "ref_inputs.json", "outputs": "ref_outputs.json", "images": int(len(chosen)),
            "selection": "held-out test images with the largest top-1 margin", "min_top1_margin": float(margin[chosen].min()),
            "compare": "top-1 index of every reference image must match", "check_args": check,
            "self_check": "passed with ONNX Runtime in place of TensorRT"}


def build_script(stem: str, precision: str, workspace_mib: int, check_args: list[str]) -> str:
    flags = "--fp16" if precision == "fp16" else "--int8 --fp16"  # int8: QDQ layers in int8, the rest may use fp16
    polygraphy = " ".join(["polygraphy run", f"{stem}.engine", "--model-type engine --trt", *check_args])
    return f"""#!/bin/sh
# Build and check the TensorRT engine for {stem}.onnx ON THE JETSON (edgekd cannot run TensorRT where it exports).
# Needs TensorRT's trtexec (JetPack: /usr/src/tensorrt/bin) and polygraphy (pip install polygraphy).
set -eu
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
# TensorRT >= 8.4 sizes the workspace with --memPoolSize, older releases (JetPack 4) with --workspace (both MiB)
if "$TRTEXEC" --help 2>&1 | grep -q -- --memPoolSize; then
  WORKSPACE="--memPoolSize=workspace:{workspace_mib}"
else
  WORKSPACE="--workspace={workspace_mib}"
fi
"$TRTEXEC" --onnx={stem}.onnx --saveEngine={stem}.engine {flags} "$WORKSPACE"
# the engine must give the same top-1 class as ONNX Runtime did for every reference image
{polygraphy}
"""


def build(job) -> dict:
    """The `tensorrt` format: TensorRT-ready ONNX + references + build_engine.sh, verified in ONNX Runtime."""
    from . import qdq
    from .torch2onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
    from .verify import check, compare, onnxruntime_logits

    artifact = job.stage / f"{job.stem}.onnx"
    result: dict = {"artifact": artifact}
    if job.precision == "int8":
        result["quantization"] = qdq.make(job, artifact)
        result["ops"] = result["quantization"]["ops"]
        float_onnx = result["quantization"].pop("float_onnx")
        result["onnx"] = result["quantization"].pop("onnx")
    else:
        onnx_path = job.work / "model.onnx"
        result["onnx"] = export_onnx(job.model, onnx_path, resolution=job.resolution, channels=job.channels)
        shutil.copyfile(onnx_path, artifact)
        result["ops"] = result["onnx"]["ops"]
    job.check_flash(artifact)
    job.say("checking with polygraphy and ONNX Runtime")
    result["lint"] = lint(artifact, job.work)

    if job.precision == "int8":
        result.update(qdq.verify(job, artifact, float_onnx))
        logits = job.default_logits
    else:
        started = time.perf_counter()
        logits = onnxruntime_logits(artifact, job.samples.test_x)
        metrics = compare(job.reference_logits, logits, job.samples.test_y)
        # fp16: the file is fp32 (TensorRT lowers it on the device), so it must match PyTorch like any fp32 export
        metrics.update(runtime="onnxruntime", seconds=round(time.perf_counter() - started, 3),
                       note="fp16 arithmetic happens only in the engine built on the device")
        check(metrics, "fp32", f"TensorRT-ready {job.precision} ONNX", fp32_tolerance=job.fp32_tolerance)
        result["verification"] = {"onnxruntime": metrics}
    references = reference_data(artifact, job.samples.test_x, logits, job.stage, job.work)

    ram = job.target.memory.ram_bytes if job.target else None
    workspace_mib = max(1, (ram // 2) >> 20) if ram else DEFAULT_WORKSPACE_MIB
    script = job.stage / "build_engine.sh"
    script.write_text(build_script(job.stem, job.precision, workspace_mib, references["check_args"]))
    script.chmod(0o755)
    syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    if syntax.returncode != 0:
        raise EdgekdError(f"the generated build_engine.sh is not valid sh ({syntax.stderr.strip()[:120]})")
    flags = "--fp16" if job.precision == "fp16" else "--int8 --fp16"
    result.update({
        "io": {
            "input": {"name": INPUT_NAME, "shape": [1, job.channels, job.resolution, job.resolution], "layout": "NCHW",
                      "dtype": "float32", "quantization": None},
            "output": {"name": OUTPUT_NAME, "shape": [1, job.num_classes], "dtype": "float32", "quantization": None},
        },
        "tensorrt": {
            "engine_built": False,
            "engine_build": "on the device, not here: TensorRT is not installable on the export host and an engine "
                            "is specific to the GPU and TensorRT version; run build_engine.sh on the Jetson",
            "build_script": script.name,
            "trtexec": f"trtexec --onnx={artifact.name} --saveEngine={job.stem}.engine {flags} "
                       f"--memPoolSize=workspace:{workspace_mib} (TensorRT < 8.4: --workspace={workspace_mib})",
            "workspace_mib": workspace_mib,
            "workspace_rule": "half of the target's memory.ram_bytes" if ram else "default without a target",
            "device_check": " ".join(["polygraphy run", f"{job.stem}.engine", "--model-type engine --trt",
                                      *references["check_args"]]),
            "references": references,
        },
    })
    return result
