"""Measured on a microcontroller: `edgekd profile --serial PORT` reads what the bundle's benchmark firmware prints.

The firmware (edgekd/export/firmware.py writes it into the bundle's firmware/) prints `EDGEKD-BENCH v1` lines;
anything else on the port (boot messages, a bootloader banner) is skipped. The host checks that the board runs
this bundle's model (length and FNV-1a hash of the .tflite), turns cycles into milliseconds with the clock the
firmware reports, and compares the int8 output for the fixed input pattern with TFLite Micro on this host
(reference kernels; the board's optimised kernels may round differently, so the criterion is the top-1 class and
the LSB difference is recorded).
"""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

from ..errors import EdgekdError
from ..export.firmware import PREFIX, VERSION, fnv1a32, pattern

DEFAULT_BAUD = 115200
DEFAULT_TIMEOUT_S = 120.0
MAX_LINE = 16384
_PAIR = re.compile(r"([a-z_0-9]+)=(\S*)")


def read_lines(port: str, *, baud: int = DEFAULT_BAUD, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """The firmware's lines from a serial port, from its `begin` line until `end` or `error` (or the timeout)."""
    try:
        import serial
    except ImportError:
        raise EdgekdError("reading a serial port needs pyserial: pip install pyserial (or pip install 'edgekd[device]')") from None
    try:
        port_ = serial.Serial(port, baudrate=baud, timeout=0.5)
    except (serial.SerialException, OSError, ValueError) as e:
        raise EdgekdError(f"cannot open the serial port {port} ({' '.join(str(e).split())[:120]}): check the device "
                          "path and that no serial monitor holds it") from None
    lines: list[str] = []
    buffer = b""
    started = False
    deadline = time.monotonic() + timeout_s
    try:
        with port_:
            while time.monotonic() < deadline:
                chunk = port_.read(4096)
                if not chunk:
                    continue
                buffer += chunk
                *complete, buffer = re.split(rb"\r?\n|\r", buffer)
                if len(buffer) > MAX_LINE:
                    buffer = b""  # a runaway line (wrong baud rate): dropped
                for raw in complete:
                    text = raw.decode("ascii", errors="replace").strip()
                    if text.startswith(f"{PREFIX} {VERSION} begin"):
                        lines = []  # a reset board starts over: keep only the latest run
                        started = True
                    # a port opened mid-run holds that run's tail: it is skipped until the next `begin`
                    if started and text.startswith(PREFIX):
                        lines.append(text)
                    if text.startswith((f"{PREFIX} {VERSION} end", f"{PREFIX} {VERSION} error")) and lines:
                        return lines
    except (serial.SerialException, OSError) as e:
        raise EdgekdError(f"reading {port} failed ({' '.join(str(e).split())[:120]})") from None
    seen = f"; last line: {lines[-1][:80]!r}" if lines else ""
    raise EdgekdError(f"no complete benchmark from {port} within {timeout_s:g} s ({len(lines)} EDGEKD-BENCH lines{seen}): "
                      f"is the firmware flashed, the baud rate {baud}, and the board reset after opening the port?")


def parse(lines: list[str]) -> dict:
    """The firmware's lines as a dict; a malformed or incomplete run is a one-line error."""
    begin, runs, output, arena_used = None, [], None, None
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or parts[0] != PREFIX:
            continue
        if parts[1] != VERSION:
            raise EdgekdError(f"the firmware prints format {parts[1]}, this edgekd reads {VERSION}: re-export the bundle")
        kind, fields = parts[2], dict(_PAIR.findall(" ".join(parts[3:])))
        if kind == "error":
            raise EdgekdError(f"the firmware stopped at stage '{fields.get('stage', '?')}' (allocate: the arena is too "
                              "small for the board's kernels, raise EDGEKD_ARENA_HEADROOM; schema: a TFLM older than "
                              "the model; invoke: a kernel failed)")
        try:
            if kind == "begin":
                begin = {"model": fields["model"], "model_len": int(fields["model_len"]),
                         "model_fnv1a": int(fields["model_fnv1a"], 16), "arena_bytes": int(fields["arena_bytes"]),
                         "cpu_hz": int(fields["cpu_hz"]), "runs": int(fields["runs"]), "warmup": int(fields["warmup"])}
            elif kind == "arena":
                arena_used = int(fields["used"])
            elif kind == "run":
                runs.append(int(fields["cycles"]))
            elif kind == "output":
                output = [int(v) for v in fields["values"].split(",") if v]
        except (KeyError, ValueError):
            raise EdgekdError(f"malformed firmware line: {line[:100]!r}") from None
    if begin is None:
        raise EdgekdError("no 'begin' line from the firmware: is this edgekd's benchmark firmware?")
    if len(runs) != begin["runs"] or output is None or not lines[-1].split()[2:3] == ["end"]:
        raise EdgekdError(f"incomplete benchmark: {len(runs)} of {begin['runs']} runs"
                          + ("" if output is not None else ", no output line") + "; reset the board and read again")
    if begin["cpu_hz"] <= 0:
        raise EdgekdError("the firmware reports cpu_hz=0: define EDGEKD_CPU_HZ for your board and rebuild")
    return {**begin, "arena_used": arena_used, "cycles": runs, "output": output}


def measurement(run: dict, bundle: Path, lines: list[str], port: str) -> dict:
    """The parsed run checked against the bundle, in the same shape as an agent measurement."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = bundle / manifest["artifact"]["file"]
    data = artifact.read_bytes()
    if run["model_len"] != len(data) or run["model_fnv1a"] != fnv1a32(data):
        raise EdgekdError(f"the board runs another model (length {run['model_len']:,} B, hash {run['model_fnv1a']:08x}; "
                          f"{artifact.name} is {len(data):,} B, hash {fnv1a32(data):08x}): flash this bundle's firmware")
    ms = [1e3 * c / run["cpu_hz"] for c in run["cycles"]]
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    expected = host_output(artifact, manifest)
    device = np.asarray(run["output"], np.int64)
    if device.size != expected.size:
        raise EdgekdError(f"the firmware printed {device.size} output values, the model has {expected.size}")
    diff = np.abs(device - expected.astype(np.int64).reshape(-1))
    return {
        "where": "device", "via": "serial", "port": port, "runtime": "tflite-micro", "runtime_version": None,
        "runtime_detail": {"firmware": run["model"], "arena_bytes": run["arena_bytes"], "arena_used": run["arena_used"]},
        "threads": 1, "p50_ms": statistics.median(ms), "p90_ms": q[89], "p99_ms": q[98], "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms), "runs": len(ms), "warmup": run["warmup"], "batch": 1,
        "throughput_per_s": 1e3 * len(ms) / sum(ms), "peak_rss_bytes": None, "arena_used_bytes": run["arena_used"],
        "cycles_p50": statistics.median(run["cycles"]), "device": {"model": "microcontroller on " + port},
        "clock_hz": run["cpu_hz"], "clocks": {"cpu_hz": run["cpu_hz"]},
        "bundle": {"path": str(bundle), "format": manifest["format"], "precision": manifest["precision"],
                   "artifact": manifest["artifact"]["file"], "sha256": manifest["artifact"]["sha256"]},
        "agreement": {"inputs": 1, "top1_match": int(device.argmax() == expected.argmax()),
                      "max_abs_diff_lsb": int(diff.max()), "criterion": "same top-1 class as TFLite Micro on the host "
                      "(reference kernels) for the firmware's input pattern", "host_runtime": "tflite-micro",
                      "agrees": bool(device.argmax() == expected.argmax())},
        "transcript_lines": len(lines),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def host_output(artifact: Path, manifest: dict) -> np.ndarray:
    """TFLite Micro on this host (child process, reference kernels) for the firmware's input pattern."""
    from ..export import tflm

    shape = [int(d) for d in manifest["input"]["shape"]]
    x = pattern(int(np.prod(shape))).reshape(1, *shape)  # one input of the model's shape (batch 1)
    arena = manifest.get("tflm", {}).get("arena_bytes") or tflm.LARGE_ARENA
    run = tflm.run(artifact, arena + 4096, x)
    if not run.ok or run.outputs is None:
        raise EdgekdError(f"TFLite Micro on this host could not run {artifact.name} to check the board's output")
    return run.outputs.reshape(-1)


def measure(bundle: Path, port: str, *, baud: int = DEFAULT_BAUD, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    lines = read_lines(port, baud=baud, timeout_s=timeout_s)
    return measurement(parse(lines), bundle, lines, port)
