"""One benchmark job, run by the agent as a child process: `python bench.py JOB_DIR` (a script, so it starts
without the agent's state and a runtime that crashes or leaks takes only this process with it).

JOB_DIR holds what the agent verified: manifest.json, the artifact (its sha256 already checked), job.json (the
validated request plus what the agent allows) and optionally reference_input.npy. The result goes to
JOB_DIR/result.json: latency percentiles over timed runs after warm-up, throughput at the batch, peak RSS, the
runtime, clocks, and the outputs for the reference inputs. Also imported by the server for `device_identity`.
Imports only the standard library, numpy and the runtime the job uses.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MAX_REFERENCE_INPUTS = 16
TRT_BUILD_TIMEOUT_S = 1800


class JobError(Exception):
    """The job cannot run as asked; one line for the client."""


# ------------------------------------------------------------------------------------------ device identity

def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def clocks() -> dict:
    """Clocks readable without root: CPU frequencies from cpufreq (kHz there, Hz here), else /proc/cpuinfo's MHz;
    GPU devfreq nodes (Jetson) when present. Absent values are left out, never guessed."""
    out: dict = {}
    cpus = {}
    for node in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq")):
        cpu = node.split("/")[-2]
        cur, high = _int(_read(f"{node}/scaling_cur_freq")), _int(_read(f"{node}/cpuinfo_max_freq"))
        cpus[cpu] = {k: v * 1000 for k, v in (("cur_hz", cur), ("max_hz", high)) if v is not None}
        governor = _read(f"{node}/scaling_governor")
        if governor:
            cpus[cpu]["governor"] = governor
    if cpus:
        out["cpu"] = cpus
    else:
        mhz = [float(line.split(":")[1]) for line in (_read("/proc/cpuinfo") or "").splitlines()
               if line.lower().startswith("cpu mhz") and ":" in line]
        if mhz:
            out["cpu_mhz_proc"] = [round(m, 1) for m in mhz]
    gpus = {}
    for node in sorted(glob.glob("/sys/class/devfreq/*")):
        name = _read(f"{node}/device/of_node/name") or os.path.basename(node)
        if "gpu" in name.lower() or "gv11b" in node or "ga10b" in node or "gp10b" in node or "57000000" in node:
            cur, high = _int(_read(f"{node}/cur_freq")), _int(_read(f"{node}/max_freq"))
            gpus[os.path.basename(node)] = {k: v for k, v in (("cur_hz", cur), ("max_hz", high)) if v is not None}
    if gpus:
        out["gpu"] = gpus
    return out


def device_identity() -> dict:
    """What board this is: device-tree model (Raspberry Pi, Jetson), L4T release, CPU model, memory, kernel."""
    cpuinfo = _read("/proc/cpuinfo") or ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Hardware", "Model", "CPU part") and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    mem = next((line.split()[1] for line in (_read("/proc/meminfo") or "").splitlines() if line.startswith("MemTotal:")), None)
    identity = {
        "model": _read("/proc/device-tree/model") or _read("/sys/firmware/devicetree/base/model")
                 or _read("/sys/devices/virtual/dmi/id/product_name") or fields.get("Model") or fields.get("model name"),
        "cpu": fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_bytes": int(mem) * 1024 if mem and mem.isdigit() else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    l4t = _read("/etc/nv_tegra_release")
    if l4t:
        identity["l4t"] = l4t.splitlines()[0][:120]
    return {k: v for k, v in identity.items() if v is not None}


def runtimes_available() -> dict:
    """Which runtimes this device has (by import / PATH, nothing loaded beyond the module)."""
    import importlib.util

    found = {}
    if importlib.util.find_spec("onnxruntime"):
        found["onnxruntime"] = "onnxruntime"
    for module in ("ai_edge_litert", "tflite_runtime"):
        if importlib.util.find_spec(module):
            found["litert"] = module
            break
    trtexec = _trtexec()
    if trtexec:
        found["tensorrt"] = trtexec
    return found


def _trtexec() -> str | None:
    return shutil.which("trtexec") or next((p for p in ("/usr/src/tensorrt/bin/trtexec",) if os.access(p, os.X_OK)), None)


def rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process from /proc (VmRSS, VmHWM); peak falls back to getrusage."""
    status = _read("/proc/self/status") or ""
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
              if line.startswith(("VmRSS:", "VmHWM:"))}
    peak = values.get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return values.get("VmRSS"), peak


# ------------------------------------------------------------------------------------------------ runtimes

class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int, batch: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        static = self.input.shape[0]
        if isinstance(static, int) and static != batch:
            raise JobError(f"the ONNX model has a static batch of {static}, so it cannot be timed at batch {batch}: "
                           "export it with --dynamic-batch or ask for batch 1")
        self.version = ort.__version__
        self.detail = {"providers": self.session.get_providers()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input.name: x})[0]


class LiteRTRuntime:
    name = "litert"

    def __init__(self, path: Path, threads: int, batch: int):
        try:
            from ai_edge_litert.interpreter import Interpreter
            module = "ai-edge-litert"
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
            module = "tflite-runtime"
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        detail = self.interpreter.get_input_details()[0]
        if int(detail["shape"][0]) != batch:
            try:
                self.interpreter.resize_tensor_input(detail["index"], [batch, *[int(d) for d in detail["shape"][1:]]])
            except (RuntimeError, ValueError) as e:
                raise JobError(f"LiteRT cannot resize this model's input to batch {batch} ({str(e)[:120]})") from None
        try:
            self.interpreter.allocate_tensors()
        except RuntimeError as e:
            raise JobError(f"LiteRT cannot allocate this model at batch {batch} ({str(e).splitlines()[0][:120]})") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.version = _version(module)
        self.detail = {"package": module, "kernels": "default (XNNPACK where it applies)"}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _run_logged(cmd: list[str], cwd: Path, timeout: float, what: str) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise JobError(f"{what} did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise JobError(f"{what} failed (exit {proc.returncode}): {(lines or ['no output'])[-1].strip()[:160]}")
    return proc.stdout


def run_tensorrt(job_dir: Path, manifest: dict, request: dict, reference: np.ndarray) -> dict:
    """Build the engine with the bundle's build_engine.sh (the agent was started with the opt-in flag), then time
    it with trtexec and read the output for the first reference input back. Runs only where trtexec exists."""
    trtexec = _trtexec()
    if trtexec is None:
        raise JobError("trtexec was not found (PATH, /usr/src/tensorrt/bin): install TensorRT (JetPack) on this device")
    if request["batch"] != 1:
        raise JobError("the TensorRT bundle's engine has a static batch of 1: ask for batch 1")
    script = job_dir / "build_engine.sh"
    if not script.is_file():
        raise JobError("the TensorRT bundle has no build_engine.sh in the upload")
    engine = job_dir / (Path(manifest["artifact"]["file"]).stem + ".engine")
    env_cmd = ["env", f"TRTEXEC={trtexec}", "sh", str(script)]
    _run_logged(env_cmd, job_dir, TRT_BUILD_TIMEOUT_S, "build_engine.sh")
    if not engine.is_file():
        raise JobError(f"build_engine.sh did not write {engine.name}")
    input_name = manifest["input"].get("name", "input")
    reference[:1].astype(np.float32).tofile(job_dir / "reference_input.bin")
    warmup_ms = max(200, request["warmup"] * 10)
    cmd = [trtexec, f"--loadEngine={engine.name}", f"--iterations={request['runs']}", f"--warmUp={warmup_ms}",
           f"--duration={max(0.0, request['min_seconds']):g}", "--exportTimes=times.json", "--exportOutput=output.json",
           f"--loadInputs={input_name}:reference_input.bin"]
    stdout = _run_logged(cmd, job_dir, 600, "trtexec timing")
    times = json.loads((job_dir / "times.json").read_text())
    samples = [float(t.get("latencyMs", t.get("computeMs"))) for t in times]
    outputs = json.loads((job_dir / "output.json").read_text())
    first = np.asarray(outputs[0]["values"], np.float32)[None]
    version = next((line.split("TensorRT version:")[1].strip() for line in stdout.splitlines()
                    if "TensorRT version:" in line), "unknown")
    return {"samples": samples, "outputs": [first], "runtime": {"name": "tensorrt", "version": version,
                                                                  "detail": {"trtexec": trtexec, "engine": engine.name}}}


# ------------------------------------------------------------------------------------------------- timing

def percentiles(samples: list[float]) -> dict:
    """The same statistics as edgekd.profile.latency's host timings (inclusive quantiles)."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": statistics.median(samples), "p90": q[89], "p99": q[98], "mean": statistics.fmean(samples),
            "min": min(samples)}


def time_runs(fn, x, warmup: int, runs: int, min_seconds: float) -> list[float]:
    """Warm-up, then at least `runs` timed calls and at least `min_seconds` (at most 20 x runs): the loop of
    edgekd.profile.latency._time, so agent and host numbers are measured alike."""
    for _ in range(warmup):
        fn(x)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - started < min_seconds and len(samples) < 20 * runs):
        t0 = time.perf_counter()
        fn(x)
        samples.append(1e3 * (time.perf_counter() - t0))
    return samples


def _reference(job_dir: Path, manifest: dict) -> np.ndarray:
    shape = [1, *(int(d) for d in manifest["input"]["shape"][1:])]  # the batch dimension may be symbolic
    dtype = np.dtype(manifest["input"]["dtype"])
    path = job_dir / "reference_input.npy"
    if not path.exists():
        return np.zeros([1, *shape[1:]], dtype)
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise JobError(f"reference_input.npy is not a plain numpy array ({str(e)[:80]})") from None
    if x.dtype != dtype or list(x.shape[1:]) != shape[1:] or not 1 <= len(x) <= MAX_REFERENCE_INPUTS:
        raise JobError(f"reference_input.npy must be 1 to {MAX_REFERENCE_INPUTS} inputs of shape {shape[1:]} and dtype "
                       f"{dtype.name}, got {list(x.shape)} {x.dtype.name}")
    return x


def choose_runtime(manifest: dict, asked: str, allow_tensorrt: bool) -> str:
    fmt = manifest["format"]
    if asked == "auto":
        asked = {"onnx": "onnxruntime", "tflite": "litert", "tensorrt": "tensorrt"}[fmt]
    fits = {"onnxruntime": ("onnx", "tensorrt"), "litert": ("tflite",), "tensorrt": ("tensorrt",)}[asked]
    if fmt not in fits:
        raise JobError(f"runtime {asked} cannot run a {fmt} bundle")
    if asked == "tensorrt" and not allow_tensorrt:
        raise JobError("TensorRT bundles run only on an agent started with --allow-tensorrt-build (it executes the "
                       "bundle's build_engine.sh); ask for runtime onnxruntime to time the bundle's ONNX instead")
    return asked


def run_job(job_dir: Path) -> dict:
    job = json.loads((job_dir / "job.json").read_text())
    manifest = json.loads((job_dir / "manifest.json").read_text())
    request = job["request"]
    runtime = choose_runtime(manifest, request["runtime"], job.get("allow_tensorrt", False))
    reference = _reference(job_dir, manifest)
    clocks_before = clocks()
    baseline_rss, _ = rss_bytes()
    started = time.perf_counter()
    if runtime == "tensorrt":
        out = run_tensorrt(job_dir, manifest, request, reference)
        samples, outputs, runtime_info = out["samples"], out["outputs"], out["runtime"]
    else:
        cls = OnnxRuntime if runtime == "onnxruntime" else LiteRTRuntime
        runner = cls(job_dir / manifest["artifact"]["file"], request["threads"], request["batch"])
        batch = request["batch"]
        outputs = [np.asarray(runner(np.repeat(reference[i:i + 1], batch, axis=0)))[:1].copy()
                   for i in range(len(reference))]
        x = np.repeat(reference[:1], batch, axis=0)
        samples = time_runs(runner, x, request["warmup"], request["runs"], request["min_seconds"])
        runtime_info = {"name": runner.name, "version": runner.version, "detail": runner.detail,
                        "threads": request["threads"]}
    seconds = time.perf_counter() - started
    _, peak = rss_bytes()
    stats = percentiles(samples)
    first = outputs[0]
    return {
        "runtime": runtime_info,
        "latency_ms": {k: round(v, 5) for k, v in stats.items()},
        "runs": len(samples),
        "warmup": request["warmup"],
        "batch": request["batch"],
        # images per second while timing: batch x calls / the time the timed calls took
        "throughput_per_s": round(request["batch"] * len(samples) / (sum(samples) / 1e3), 3),
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline_rss,
        "clocks": {"before": clocks_before, "after": clocks()},
        "reference_outputs": {"dtype": first.dtype.name, "shape": list(first.shape[1:]),
                              "values": [o.reshape(-1).tolist() for o in outputs]},
        "job_seconds": round(seconds, 3),
    }


def main(argv: list[str]) -> int:
    job_dir = Path(argv[1])
    code = 0
    try:
        result = run_job(job_dir)
    except JobError as e:
        result, code = {"error": str(e)}, 3
    except Exception as e:  # a runtime's own failure (corrupt model, unsupported op): reported, never a traceback
        result, code = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}, 4
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_dir / "result.json")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
