"""Latency: estimated per target from its compute model, and measured on this host's runners.

Estimate (per operator, summed): time = max(compute cycles / clock, bytes moved / memory bandwidth) + a fixed
cost per operator, where compute cycles = MACs x cycles_per_mac + elements x cycles_per_element. The three
coefficients live in the target's YAML (`latency_model`), fitted with tools/fit_profiler.py to the published
device measurements listed there; `reference_errors` recomputes the estimate for every listed reference
(role "fit" or held-out "check") so a report can say how far off the model is.

Measured: PyTorch eager, ONNX Runtime, LiteRT and TFLite Micro on *this machine*, after warm-up, as
p50/p90/p99 over repeated single-image runs. These are host numbers and are labelled so everywhere: they are
never presented as device timings.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import EdgekdError
from ..targets import LatencyModel, Target
from .graph import BYTES_PER_ELEMENT, MAC_OPS, Graph, trace_model

RUNNERS = ("pytorch", "onnxruntime", "litert", "tflite-micro")


def _op_seconds(graph: Graph, precision: str, model: LatencyModel, clock_hz: float, bandwidth: float) -> list[float]:
    per_element = BYTES_PER_ELEMENT[precision]
    weight_bytes = 1 if precision == "int8" else per_element
    out = []
    for op in graph.ops:
        cycles = op.macs * model.cycles_per_mac if op.kind in MAC_OPS else op.elements_processed * model.cycles_per_element
        moved = (sum(graph.tensors[t].elements for t in op.inputs) + graph.tensors[op.output].elements) * per_element
        moved += op.weight_elements * weight_bytes
        out.append(max(cycles / clock_hz, moved / bandwidth) + model.cycles_per_op / clock_hz)
    return out


def estimate_ms(graph: Graph, target: Target, model: LatencyModel | None = None) -> float | None:
    """Estimated device latency in ms (None when the target has no latency model)."""
    model = model or target.latency_model
    if model is None:
        return None
    seconds = _op_seconds(graph, target.export.precision, model, target.compute.clock_hz,
                          target.compute.memory_bandwidth_bytes_per_s)
    return 1e3 * sum(seconds)


def per_op_ms(graph: Graph, target: Target) -> list[float] | None:
    if target.latency_model is None:
        return None
    return [1e3 * s for s in _op_seconds(graph, target.export.precision, target.latency_model,
                                         target.compute.clock_hz, target.compute.memory_bandwidth_bytes_per_s)]


def reference_graph(ref) -> Graph:
    from .reference_models import build_reference

    return trace_model(build_reference(ref.model, ref.num_classes, ref.in_chans, ref.options, ref.resolution), ref.resolution,
                       channels=ref.in_chans, name=ref.model)


def reference_errors(target: Target, model: LatencyModel | None = None) -> list[dict]:
    """The estimate against each published reference, converted to the target's clock (same cycles)."""
    model = model or target.latency_model
    if model is None:
        return []
    rows = []
    for ref in model.references:
        estimate = estimate_ms(reference_graph(ref), target, model)
        published = ref.latency_ms * ref.clock_hz / target.compute.clock_hz
        rows.append({"model": ref.model, "resolution": ref.resolution, "role": ref.role,
                     "published_ms_at_target_clock": round(published, 3), "estimate_ms": round(estimate, 3),
                     "error": round(estimate / published - 1, 4), "source": ref.source})
    return rows


# ------------------------------------------------------------------------------------------- host runners

@dataclass
class Timing:
    runner: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict:
        return {"runner": self.runner, "where": "host", "p50_ms": round(self.p50_ms, 4),
                "p90_ms": round(self.p90_ms, 4), "p99_ms": round(self.p99_ms, 4), "runs": self.runs,
                "threads": self.threads}


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), q[89], q[98]


def _time(fn: Callable[[], object], warmup: int, runs: int, min_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - started < min_seconds and len(samples) < 20 * runs):
        t0 = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - t0))
    return samples


def time_pytorch(model: nn.Module, resolution: int, channels: int, *, threads: int = 1, warmup: int = 10,
                 runs: int = 100, min_seconds: float = 1.0) -> Timing:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.zeros(1, channels, resolution, resolution)
        model = model.eval()
        with torch.inference_mode():
            samples = _time(lambda: model(x), warmup, runs, min_seconds)
    finally:
        torch.set_num_threads(previous)
    return Timing("pytorch", *_percentiles(samples), len(samples), threads)


def time_onnxruntime(onnx_path: Path, *, threads: int = 1, warmup: int = 10, runs: int = 100,
                     min_seconds: float = 1.0) -> Timing:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()}
    samples = _time(lambda: session.run(None, feed), warmup, runs, min_seconds)
    return Timing("onnxruntime", *_percentiles(samples), len(samples), threads)


def time_litert(tflite_path: Path, *, threads: int = 1, warmup: int = 10, runs: int = 100,
                min_seconds: float = 1.0) -> Timing:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_path), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    samples = _time(interpreter.invoke, warmup, runs, min_seconds)
    return Timing("litert", *_percentiles(samples), len(samples), threads)


_TFLM_TIMER = """
import json, sys, time
import numpy as np
from tflite_micro.python.tflite_micro import runtime
it = runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2]))
d = it.get_input_details(0)
it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
warmup, runs, min_s = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
for _ in range(warmup):
    it.invoke()
out, start = [], time.perf_counter()
while len(out) < runs or (time.perf_counter() - start < min_s and len(out) < 20 * runs):
    t0 = time.perf_counter(); it.invoke(); out.append(1e3 * (time.perf_counter() - t0))
print(json.dumps(out))
"""


def time_tflm(tflite_path: Path, arena_bytes: int, *, warmup: int = 3, runs: int = 30,
              min_seconds: float = 1.0) -> Timing:
    """TFLite Micro's reference kernels on this host, in a child process (no torch in it)."""
    import json

    proc = subprocess.run([sys.executable, "-c", _TFLM_TIMER, str(tflite_path), str(arena_bytes), str(warmup),
                           str(runs), str(min_seconds)], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        raise EdgekdError(f"TFLite Micro could not run {Path(tflite_path).name} for timing ({tail})")
    samples = json.loads(proc.stdout.strip().splitlines()[-1])
    return Timing("tflite-micro", *_percentiles(samples), len(samples), 1)


def export_temp_onnx(model: nn.Module, resolution: int, channels: int, directory: Path) -> Path:
    from ..export.torch2onnx import export_onnx

    path = Path(directory) / "model.onnx"
    export_onnx(model, path, resolution=resolution, channels=channels)
    return path


def host_peak_macs_per_s(threads: int = 1, size: int = 1024, repeats: int = 5) -> float:
    """This CPU's best fp32 multiply-accumulate rate (a large GEMM in PyTorch), the ceiling for host latency."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        best = min(_time(lambda: torch.mm(a, b), 1, repeats, 0.0))
    finally:
        torch.set_num_threads(previous)
    return size ** 3 / (best / 1e3)


def host_description(threads: int) -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__}


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="edgekd-profile-")


def fit_latency_model(target: Target, references, cycles_per_element: float, free_overhead: bool,
                      cycles_per_op: float = 0.0) -> LatencyModel:
    """Coefficients that minimise the squared log error over the references with role "fit".

    cycles_per_mac is always fitted; cycles_per_op too when `free_overhead` (needs two or more fit references),
    else it stays at `cycles_per_op`. cycles_per_element is an assumption passed in. A grid search: the
    model is a max() of compute and memory time, not linear in the coefficients.
    """
    fit = [r for r in references if r.role == "fit"]
    if not fit:
        raise EdgekdError(f"target {target.name}: no reference with role 'fit' to fit the latency model to")
    graphs = [reference_graph(r) for r in fit]
    published = [r.latency_ms * r.clock_hz / target.compute.clock_hz for r in fit]

    def loss(cpm: float, cpo: float) -> float:
        model = LatencyModel(cpm, cycles_per_element, cpo, tuple(references))
        return sum(np.log(estimate_ms(g, target, model) / p) ** 2 for g, p in zip(graphs, published))

    cpms = np.geomspace(1e-4, 1e3, 281)
    cpos = np.concatenate([[0.0], np.geomspace(10, 1e6, 81)]) if free_overhead else [cycles_per_op]
    best = min(((loss(a, b), a, b) for a in cpms for b in cpos))
    # refine cycles_per_mac around the best grid point
    fine = np.geomspace(best[1] / 1.06, best[1] * 1.06, 61)
    best = min((loss(a, best[2]), a, best[2]) for a in fine)
    return LatencyModel(float(f"{best[1]:.4g}"), cycles_per_element, float(f"{best[2]:.4g}"), tuple(references))
