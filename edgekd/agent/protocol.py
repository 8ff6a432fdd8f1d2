"""What the host (edgekd profile --device) and the agent agree on: the upload, the job request, the limits.

An upload is one uncompressed tar (never gzip: its extracted size is then bounded by the upload size) of
flat files: the bundle's manifest.json, its artifact, request.json (the job) and optionally
reference_input.npy (the inputs whose outputs the host compares). TensorRT bundles add the build script and
its reference files. Standard library only.
"""
from __future__ import annotations

import io
import math
import re
import tarfile
from pathlib import Path

API_VERSION = 1
INFO_PATH = "/v1/info"
PROFILE_PATH = "/v1/profile"
MANIFEST = "manifest.json"
REQUEST = "request.json"
REFERENCE_INPUT = "reference_input.npy"
DEFAULT_PORT = 8765
MAX_FILES = 16
# a flat file name: no directories, no leading dot (nothing hidden), nothing a shell or a path would read
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FORMATS = ("onnx", "tflite", "tensorrt")
RUNTIMES = ("auto", "onnxruntime", "litert", "tensorrt")
TRT_FILES = ("build_engine.sh", "ref_inputs.json", "ref_outputs.json")  # what a TensorRT job may also carry

# request.json: name -> (type, minimum, maximum, default)
REQUEST_FIELDS = {
    "runs": (int, 5, 100_000, 100),
    "warmup": (int, 0, 10_000, 10),
    "min_seconds": (float, 0.0, 60.0, 1.0),
    "batch": (int, 1, 1024, 1),
    "threads": (int, 1, 256, 1),
    "runtime": (str, None, None, "auto"),
}


class ProtocolError(ValueError):
    """A request the agent refuses; the message is one line and goes back to the client as {"error": ...}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message.replace("\n", " "))
        self.status = status


def check_name(name: str) -> str:
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise ProtocolError(f"file name {name!r} is not allowed: flat names of letters, digits, '.', '_', '-' only "
                            "(no directories, no absolute paths, no '..')")
    return name


def validate_request(data) -> dict:
    """request.json with every field typed and in range; unknown fields are refused, missing ones take defaults."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{REQUEST} must be a JSON object")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise ProtocolError(f"{REQUEST}: unknown field(s) {', '.join(unknown)} (known: {', '.join(REQUEST_FIELDS)})")
    out = {}
    for key, (kind, low, high, default) in REQUEST_FIELDS.items():
        value = data.get(key, default)
        if kind is str:
            if value not in RUNTIMES:
                raise ProtocolError(f"{REQUEST}: runtime must be one of {', '.join(RUNTIMES)}, got {value!r}")
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (kind is float or isinstance(value, int)) and math.isfinite(value) and low <= value <= high
            if not ok:
                raise ProtocolError(f"{REQUEST}: {key} must be a {kind.__name__} from {low} to {high}, got {value!r}")
            value = kind(value)
        out[key] = value
    return out


def validate_manifest(data) -> dict:
    """The parts of an edgekd manifest the agent relies on, each checked for type (nothing else is read)."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ProtocolError(f"{MANIFEST}: {what}")

    need(isinstance(data, dict), "must be a JSON object written by `edgekd export`")
    need(data.get("format") in FORMATS, f"format must be one of {', '.join(FORMATS)}")
    need(isinstance(data.get("precision"), str), "precision missing")
    art = data.get("artifact")
    need(isinstance(art, dict), "artifact section missing")
    check_name(art.get("file"))
    need(isinstance(art.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", art["sha256"]) is not None,
         "artifact.sha256 must be 64 hex digits")
    need(isinstance(art.get("bytes"), int) and art["bytes"] > 0, "artifact.bytes must be a positive integer")
    inp = data.get("input")
    need(isinstance(inp, dict), "input section missing")
    shape = inp.get("shape")
    need(isinstance(shape, list) and 2 <= len(shape) <= 6 and all(isinstance(d, int) and 0 < d <= 1 << 16 for d in shape[1:])
         and (isinstance(shape[0], int) and shape[0] > 0 or isinstance(shape[0], str)),
         "input.shape must be a list of 2 to 6 positive integers (the first may be a symbolic batch)")
    need(inp.get("dtype") in ("float32", "float16", "int8", "uint8"), "input.dtype must be float32, float16, int8 or uint8")
    return data


def pack(files: dict[str, bytes | Path]) -> bytes:
    """The upload: an uncompressed tar of flat, regular files (name -> bytes or a path to read)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            data = Path(content).read_bytes() if isinstance(content, Path) else bytes(content)
            info = tarfile.TarInfo(check_name(name))
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
