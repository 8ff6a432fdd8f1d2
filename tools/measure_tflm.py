"""Measure what the profiler estimates, on real int8 TFLite files: TFLite Micro arena and .tflite size.

For each zoo student and resolution: build it (random init, 10 classes), export ONNX -> onnx2tf full-int8
(calibrated on uniform noise: sizes and the arena do not depend on the weights' values), run it in TFLite
Micro's recording allocator (total / planned head / persistent tail), and record the profiler's estimates from
the traced PyTorch model beside them. Writes JSON lines to --out (one per model; reruns skip what is there).

usage: python tools/measure_tflm.py --out profiles/calibration/tflm-measurements.jsonl [--models ...] [--resolutions 32 64]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.export import onnx2tflite
from edgekd.export.tflm import LARGE_ARENA, WORKER
from edgekd.export.torch2onnx import export_onnx
from edgekd.models import create_model, list_models
from edgekd.profile.estimate import estimate_graph
from edgekd.profile.graph import read_tflite, trace_model

ALLOC = {key: re.compile(rf"Arena allocation {key} (\d+) bytes") for key in ("total", "head", "tail")}


def tflm_allocation(path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), str(path), str(LARGE_ARENA)], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-400:])
    return {key: int(rx.search(proc.stderr).group(1)) for key, rx in ALLOC.items()}


def measure(name: str, resolution: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 10, low_res_stem=resolution <= 96).eval()
    with tempfile.TemporaryDirectory(prefix="edgekd-measure-") as tmp:
        work = Path(tmp)
        export_onnx(model, work / "model.onnx", resolution=resolution, channels=3)
        calib = np.random.RandomState(0).rand(32, 3, resolution, resolution).astype(np.float32)
        started = time.perf_counter()
        tflite, _ = onnx2tflite.convert(work / "model.onnx", work, "int8", calib_pixels_nchw=calib,
                                        mean=(0.5,) * 3, std=(0.25,) * 3)
        convert_s = time.perf_counter() - started
        measured = tflm_allocation(tflite)
        exact = estimate_graph(read_tflite(tflite), "int8")
        size = tflite.stat().st_size
    traced = estimate_graph(trace_model(model, resolution), "int8")
    return {"model": name, "resolution": resolution, "tflite_bytes": size, "tflm": measured,
            "convert_s": round(convert_s, 1), "estimate_traced": traced, "estimate_from_tflite": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*", default=list_models(role="student"))
    parser.add_argument("--resolutions", nargs="*", type=int, default=[32, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)
    done = set()
    if args.out.is_file():
        done = {(r["model"], r["resolution"]) for r in map(json.loads, args.out.read_text().splitlines())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for resolution in args.resolutions:
        for name in args.models:
            if (name, resolution) in done:
                continue
            row = measure(name, resolution)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, resolution, row["tflm"], row["tflite_bytes"], flush=True)


if __name__ == "__main__":
    main()
