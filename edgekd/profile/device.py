"""Measured on the device: `edgekd profile --device URL` sends an export bundle to a running `edgekd agent`.

The host packs the bundle's manifest and artifact with the job request and a few reference inputs (seeded
images in the model's own input encoding), waits for the agent's numbers (retrying while it answers 503, busy),
and checks that the device computed what this host computes for the same inputs with the same kind of runtime:
fp32 artifacts within 1e-3 of the host's outputs, anything else (int8, a TensorRT fp16 engine) the same top-1
class for every reference input. A measurement that does not agree is kept and flagged, and never calibrates.
"""
from __future__ import annotations

import http.client
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from ..agent import protocol
from ..errors import EdgekdError
from ..export.verify import FP32_TOLERANCE  # the export's criterion for fp32 artifacts

REFERENCE_INPUTS = 4
CONNECT_TIMEOUT_S = 10.0
BUSY_RETRY_S = 600.0  # how long a client keeps retrying an agent that answers 503


def reference_inputs(manifest: dict, n: int = REFERENCE_INPUTS, seed: int = 0) -> np.ndarray:
    """`n` seeded random images (uniform pixels) in the artifact's input encoding: normalised floats in its layout,
    or int8 through the manifest's pixel -> int8 map."""
    inp = manifest["input"]
    shape = [1, *(int(d) for d in inp["shape"][1:])]  # the batch dimension may be symbolic (--dynamic-batch)
    nhwc = inp.get("layout") == "NHWC"
    channels = shape[3] if nhwc else shape[1]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, *shape[1:])).astype(np.float64)
    axis = (1, 1, 1, -1) if nhwc else (1, -1, 1, 1)
    if inp["dtype"] == "int8":
        m = inp.get("int8_from_pixel")
        if not m:
            raise EdgekdError("the int8 bundle's manifest has no input.int8_from_pixel map: re-export it")
        a, b = np.reshape(m["a"], axis), np.reshape(m["b"], axis)
        return np.clip(np.round(pixels * a + b), -128, 127).astype(np.int8)
    norm = inp.get("normalisation") or {"mean": [0.5] * channels, "std": [0.25] * channels}
    mean, std = np.reshape(norm["mean"], axis), np.reshape(norm["std"], axis)
    return ((pixels / 255.0 - mean) / std).astype(inp["dtype"])


def host_outputs(artifact: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """The outputs this host's runtime of the same kind computes for `x`, one input at a time."""
    if fmt in ("onnx", "tensorrt"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(artifact), num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i:i + 1])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"]).copy())
    return np.concatenate(rows)


def agreement(device: np.ndarray, host: np.ndarray, precision: str, runtime: str) -> dict:
    """fp32 run in the same kind of runtime: max abs difference <= 1e-3; otherwise the same top-1 class."""
    device = device.reshape(host.shape)
    diff = np.abs(device.astype(np.float64) - host.astype(np.float64))
    top1 = device.argmax(1) == host.argmax(1)
    exact = precision == "fp32" and runtime != "tensorrt"
    out = {"inputs": int(len(host)), "top1_match": int(top1.sum()), "max_abs_diff": float(diff.max()),
           "criterion": f"max abs difference <= {FP32_TOLERANCE:g}" if exact else "same top-1 class for every input",
           "host_runtime": "onnxruntime" if runtime in ("onnxruntime", "tensorrt") else "litert"}
    if host.dtype == np.int8:
        out["max_abs_diff_lsb"] = int(diff.max())
    out["agrees"] = bool(diff.max() <= FP32_TOLERANCE) if exact else bool(top1.all())
    return out


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise EdgekdError(f"--device takes http://HOST:PORT (the agent's address; reach a remote board through an SSH "
                          f"tunnel), got '{url}'")
    return http.client.HTTPConnection(parts.hostname, parts.port or protocol.DEFAULT_PORT, timeout=timeout), parts.path.rstrip("/")


def call(url: str, token: str, method: str, path: str, body: bytes | None = None, *, timeout: float = 1800.0,
         busy_retry_s: float = BUSY_RETRY_S) -> dict:
    """One request to the agent; 503 (busy) is retried after Retry-After until `busy_retry_s` has passed.
    Errors become one-line EdgekdErrors naming the agent's own message."""
    deadline = time.monotonic() + busy_retry_s
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-tar"}
    while True:
        conn, prefix = _connection(url, timeout)
        try:
            conn.request(method, prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status, retry_after = response.status, response.getheader("Retry-After")
        except (OSError, http.client.HTTPException) as e:
            raise EdgekdError(f"cannot reach the agent at {url} ({type(e).__name__}: {e}); is `edgekd agent` running "
                              "there (and the SSH tunnel open)?") from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            raise EdgekdError(f"{url} answered HTTP {status} without JSON: is it an edgekd agent?") from None
        if status == 503 and time.monotonic() < deadline:
            time.sleep(min(float(retry_after or 1), 5.0))
            continue
        if status != 200:
            hint = " (pass the token the agent printed at start)" if status == 401 else ""
            raise EdgekdError(f"the agent at {url} refused the job (HTTP {status}): {payload.get('error', raw[:120])}{hint}")
        return payload


def info(url: str, token: str) -> dict:
    return call(url, token, "GET", protocol.INFO_PATH, timeout=CONNECT_TIMEOUT_S, busy_retry_s=0)


def upload_files(bundle: Path, manifest: dict, request: dict, x: np.ndarray) -> dict:
    files: dict = {protocol.MANIFEST: bundle / protocol.MANIFEST, manifest["artifact"]["file"]: bundle / manifest["artifact"]["file"],
                   protocol.REQUEST: json.dumps(request).encode()}
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    files[protocol.REFERENCE_INPUT] = buffer.getvalue()
    if manifest["format"] == "tensorrt":
        files.update({name: bundle / name for name in protocol.TRT_FILES if (bundle / name).is_file()})
    return files


def measure(bundle: Path, url: str, token: str, *, runs: int = 100, warmup: int = 10, batch: int = 1, threads: int = 1,
            runtime: str = "auto", min_seconds: float = 1.0, busy_retry_s: float = BUSY_RETRY_S) -> dict:
    """Time the export bundle on the agent; returns the measurement as stored in the profile JSON."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / protocol.MANIFEST).read_text())
    artifact = bundle / manifest["artifact"]["file"]
    try:
        request = protocol.validate_request({"runs": runs, "warmup": warmup, "batch": batch, "threads": threads,
                                             "runtime": runtime, "min_seconds": min_seconds})
    except protocol.ProtocolError as e:
        raise EdgekdError(str(e)) from None
    x = reference_inputs(manifest)
    body = protocol.pack(upload_files(bundle, manifest, request, x))
    # ask first: a wrong token or a cap too small is then a clear answer, not a connection reset mid-upload
    cap = info(url, token)["agent"]["max_upload_bytes"]
    if len(body) > cap:
        raise EdgekdError(f"the upload of {bundle.name} is {len(body):,} bytes and the agent at {url} accepts at most "
                          f"{cap:,}: start it with a larger --max-upload-mb")
    result = call(url, token, "POST", protocol.PROFILE_PATH, body, busy_retry_s=busy_retry_s)
    ref = result["reference_outputs"]
    device_out = np.asarray(ref["values"], dtype=ref["dtype"])
    expected = host_outputs(artifact, manifest["format"], x)
    lat = result["latency_ms"]
    return {
        "where": "device", "via": "agent", "url": url,
        "runtime": result["runtime"]["name"], "runtime_version": result["runtime"].get("version"),
        "runtime_detail": result["runtime"].get("detail", {}), "threads": result["runtime"].get("threads"),
        "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"], "mean_ms": lat["mean"], "min_ms": lat["min"],
        "runs": result["runs"], "warmup": result["warmup"], "batch": result["batch"],
        "throughput_per_s": result["throughput_per_s"], "peak_rss_bytes": result["peak_rss_bytes"],
        "baseline_rss_bytes": result.get("baseline_rss_bytes"),
        "device": result.get("device", {}), "clocks": result.get("clocks", {}),
        "clock_hz": clock_hz(result.get("clocks", {}), result["runtime"]["name"]),
        "bundle": {"path": str(bundle), "format": manifest["format"], "precision": manifest["precision"],
                   "artifact": manifest["artifact"]["file"], "sha256": manifest["artifact"]["sha256"]},
        "agreement": agreement(device_out, expected, manifest["precision"], result["runtime"]["name"]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def clock_hz(clocks: dict, runtime: str) -> int | None:
    """The clock the measurement ran at, as far as the device told: the GPU's for TensorRT, else CPU 0's."""
    before = clocks.get("before", clocks)
    if runtime == "tensorrt":
        gpu = next(iter(before.get("gpu", {}).values()), {})
        return gpu.get("cur_hz") or gpu.get("max_hz")
    cpu = before.get("cpu", {}).get("cpu0", {})
    if cpu:
        return cpu.get("cur_hz") or cpu.get("max_hz")
    mhz = before.get("cpu_mhz_proc")
    return int(mhz[0] * 1e6) if mhz else None


# ------------------------------------------------------------------------------ profile sources on a device

@dataclass
class DeviceRequest:
    """What `edgekd profile --device URL` / `--serial PORT` asks for (exactly one of url and port)."""

    url: str | None = None
    token: str | None = None
    port: str | None = None
    baud: int = 115200
    timeout_s: float = 120.0  # serial: how long to wait for a complete benchmark
    runs: int = 100
    warmup: int = 10
    batch: int = 1
    threads: int = 1
    runtime: str = "auto"
    calibrate: bool = False

    def check(self) -> None:
        if (self.url is None) == (self.port is None):
            raise EdgekdError("measure on one device: pass either --device URL (an edgekd agent) or --serial PORT")
        if self.url is not None and not self.token:
            raise EdgekdError("--device needs the agent's token: --token TOKEN (or $EDGEKD_AGENT_TOKEN); the agent "
                              "prints it when it starts")


def device_bundle(source, target) -> Path:
    """The export bundle a source sends to the device: a bundle as given, or the run's export for the target."""
    if source.kind == "artifact":
        return Path(source.path)
    if source.kind == "model":
        raise EdgekdError(f"{source.label} is an untrained zoo model: measuring on a device needs an exported run "
                          "(edgekd train, then edgekd export RUN --target T)")
    name = f"{target.export.format}-{target.export.precision}"
    bundle = Path(source.path) / "export" / name
    if not (bundle / protocol.MANIFEST).is_file():
        raise EdgekdError(f"{source.path} has no {target.name} export ({bundle} is missing): run `edgekd export "
                          f"{source.path} --target {target.name}` first")
    return bundle


def measure_source(source, target, request: DeviceRequest) -> dict:
    bundle = device_bundle(source, target)
    if request.port is not None:
        from . import serial_bench

        manifest = json.loads((bundle / protocol.MANIFEST).read_text())
        if "firmware" not in manifest:
            raise EdgekdError(f"{bundle} has no benchmark firmware: export for a TFLite Micro target "
                              f"(`edgekd export {source.path} --target cortex-m7`) and flash its firmware/main.cc")
        return serial_bench.measure(bundle, request.port, baud=request.baud, timeout_s=request.timeout_s)
    return measure(bundle, request.url, request.token, runs=request.runs, warmup=request.warmup, batch=request.batch,
                   threads=request.threads, runtime=request.runtime)


def attach(report: dict, m: dict, budget_ms: float) -> None:
    """The measurement beside the estimate in a profile report."""
    report["latency"]["device"] = m
    report["measured"]["device_p50_ms"] = m["p50_ms"]
    if m["agreement"]["agrees"]:  # a measured latency decides the latency budget; the estimate's verdict is kept
        fits = report["fits"]
        fits["latency_estimate"] = fits["latency"]
        fits["latency"] = m["p50_ms"] <= budget_ms
        fits["all"] = fits["sram"] and fits["flash"] and fits["latency"]
