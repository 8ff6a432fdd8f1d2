"""Deployment targets: one YAML file per device under targets/, validated strictly on load.

A target says what the device can hold (RAM for activations, flash for weights), how fast it computes,
which runtime/export format/precision it needs, and the input size and model options to train with.
Every problem in a target file is one `EdgekdError` line naming the file, the key and the fix.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from .errors import EdgekdError
from .export import formats
from .resources import data_dir

TARGETS_DIR = data_dir("targets")  # the checkout's targets/, or the copy an installed wheel carries
TARGETS_DIR_ENV = "EDGEKD_TARGETS_DIR"

# the allowed values and the runtime rules come from the export formats table (edgekd/export/formats.py)
RUNTIMES = tuple(formats.RUNTIMES)
FORMATS = tuple(formats.FORMATS)
PRECISIONS = formats.TARGET_PRECISIONS
DEVICE_CLASSES = formats.DEVICE_CLASSES
_RUNTIME_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    r.name: {"device_class": r.device_classes, "export.format": r.formats,
             **({"export.precision": r.precisions} if r.precisions is not None else {})}
    for r in formats.RUNTIMES.values()
}

# key -> (kind, hint) or a nested section. kind: "str", "int", "float", "options" or a tuple of allowed values.
_SCHEMA: dict[str, Any] = {
    "name": ("str", "the target name, equal to the file name without .yaml"),
    "description": ("str", "one line describing the device"),
    "device_class": (DEVICE_CLASSES, "the kind of processor"),
    "runtime": (RUNTIMES, "the inference runtime on the device"),
    "export": {
        "format": (FORMATS, "the exported model format"),
        "precision": (PRECISIONS, "the deployed numeric precision"),
    },
    "memory": {
        "ram_bytes": ("int", "bytes available to activations"),
        "flash_bytes": ("int", "bytes available to weights"),
    },
    "compute": {
        "clock_hz": ("int", "the core clock in Hz"),
        "peak_macs_per_s": ("float", "peak multiply-accumulates per second at the deployed precision"),
        "memory_bandwidth_bytes_per_s": ("float", "memory bandwidth in bytes per second"),
    },
    "input": {
        "resolution": ("int", "square input size in pixels"),
        "channels": ("int", "input channels (3 for RGB, 1 for grayscale)"),
    },
    "latency_budget_ms": ("float", "the latency budget per inference in ms"),
    "model_options": ("options", "create_model options, e.g. {low_res_stem: true}"),
    "latency_model": {
        "cycles_per_mac": ("float", "core cycles per multiply-accumulate of conv/depthwise/fully-connected ops"),
        "cycles_per_element": ("float0", "core cycles per input element of elementwise, pooling and pad ops"),
        "cycles_per_op": ("float0", "fixed cycles per operator (dispatch, kernel launch)"),
        "references": ("references", "published measurements the model was fitted to or is checked against"),
        "history": ("history", "earlier coefficients, kept when `edgekd profile --calibrate` replaced them"),
    },
}
_OPTIONAL = {"model_options", "latency_model", "latency_model.history"}  # a target may imply no model options,
# lack a latency model, and has a history only once it was calibrated
REFERENCE_KEYS = {"model": str, "resolution": int, "num_classes": int, "in_chans": int, "latency_ms": float,
                  "clock_hz": int, "role": ("fit", "check"), "source": str}
# a zoo model measured on the device (`edgekd profile --calibrate`) also records its create_model options
OPTIONAL_REFERENCE_KEYS = {"options"}
HISTORY_KEYS = {"cycles_per_mac": float, "cycles_per_element": float, "cycles_per_op": float, "fitted_to": str,
                "until": str, "replaced_by": str}


@dataclass(frozen=True)
class ExportDefaults:
    format: str
    precision: str


@dataclass(frozen=True)
class Memory:
    ram_bytes: int
    flash_bytes: int


@dataclass(frozen=True)
class Compute:
    clock_hz: int
    peak_macs_per_s: float
    memory_bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class InputSpec:
    resolution: int
    channels: int


@dataclass(frozen=True)
class Reference:
    """A published latency of a model on a device, with the device's clock (cycles transfer across clocks)."""

    model: str
    resolution: int
    num_classes: int
    in_chans: int
    latency_ms: float
    clock_hz: int
    role: str  # "fit": the latency model was fitted to it; "check": held out, only compared
    source: str
    options: dict = field(default_factory=dict, hash=False, compare=False)  # create_model options of a zoo model


@dataclass(frozen=True)
class LatencyModel:
    cycles_per_mac: float
    cycles_per_element: float
    cycles_per_op: float
    references: tuple[Reference, ...]
    history: tuple[dict, ...] = ()  # replaced coefficients, oldest first


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device_class: str
    runtime: str
    export: ExportDefaults
    memory: Memory
    compute: Compute
    input: InputSpec
    latency_budget_ms: float
    model_options: Mapping[str, Any] = field(hash=False)  # read-only (MappingProxyType)
    source_path: Path
    latency_model: LatencyModel | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with exactly the YAML keys (no source_path); round-trips through parse_target."""
        return {
            "name": self.name,
            "description": self.description,
            "device_class": self.device_class,
            "runtime": self.runtime,
            "export": {"format": self.export.format, "precision": self.export.precision},
            "memory": {"ram_bytes": self.memory.ram_bytes, "flash_bytes": self.memory.flash_bytes},
            "compute": {
                "clock_hz": self.compute.clock_hz,
                "peak_macs_per_s": self.compute.peak_macs_per_s,
                "memory_bandwidth_bytes_per_s": self.compute.memory_bandwidth_bytes_per_s,
            },
            "input": {"resolution": self.input.resolution, "channels": self.input.channels},
            "latency_budget_ms": self.latency_budget_ms,
            "model_options": dict(self.model_options),
            **({"latency_model": {**{k: getattr(self.latency_model, k) for k in
                                     ("cycles_per_mac", "cycles_per_element", "cycles_per_op")},
                                  "references": [_reference_dict(r) for r in self.latency_model.references],
                                  **({"history": [dict(h) for h in self.latency_model.history]}
                                     if self.latency_model.history else {})}}
               if self.latency_model else {}),
        }

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, human-readable value) pairs for `edgekd targets show`."""
        c, r = self.compute, self.input.resolution
        options = ", ".join(f"{k}={_fmt_option(v)}" for k, v in self.model_options.items()) or "none"
        return [
            ("name", self.name),
            ("description", self.description),
            ("device class", self.device_class),
            ("runtime", self.runtime),
            ("export", f"{self.export.format} {self.export.precision}"),
            ("RAM (activations)", format_bytes(self.memory.ram_bytes)),
            ("flash (weights)", format_bytes(self.memory.flash_bytes)),
            ("clock", format_hz(c.clock_hz)),
            ("peak compute", f"{_sig(c.peak_macs_per_s / 1e9)} GMAC/s"),
            ("memory bandwidth", f"{_sig(c.memory_bandwidth_bytes_per_s / 1e9)} GB/s"),
            ("input", f"{r}x{r}x{self.input.channels}"),
            ("latency budget", f"{_sig(self.latency_budget_ms)} ms"),
            ("model options", options),
            ("latency model", "none (no device latency estimate)" if self.latency_model is None else
             f"{_sig(self.latency_model.cycles_per_mac)} cycles/MAC, {_sig(self.latency_model.cycles_per_element)} "
             f"cycles/element, {_sig(self.latency_model.cycles_per_op)} cycles/op; fitted to "
             f"{sum(r.role == 'fit' for r in self.latency_model.references)} published measurement(s), "
             f"{sum(r.role == 'check' for r in self.latency_model.references)} held out"),
            ("file", str(self.source_path)),
        ]

    def __reduce__(self):
        # MappingProxyType cannot be pickled, and targets travel to DataLoader workers / DDP ranks.
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["model_options"] = dict(self.model_options)
        return (_rebuild_target, (state,))


def _reference_dict(ref: Reference) -> dict[str, Any]:
    out = vars(ref).copy()
    out["options"] = dict(out["options"])
    if not out["options"]:
        out.pop("options")
    return out


def _rebuild_target(state: dict[str, Any]) -> Target:
    return Target(**{**state, "model_options": MappingProxyType(dict(state["model_options"]))})


# ---------------------------------------------------------------- formatting


def _sig(x: float) -> str:
    """Up to four significant digits, never an exponent: 0.96, 3.84, 921.6, 235.9, 5,120."""
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{float(f'{x:.4g}'):g}"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{_sig(n / size)} {unit}"
    return f"{n} B"


def format_hz(hz: float) -> str:
    for unit, size in (("GHz", 1e9), ("MHz", 1e6), ("kHz", 1e3)):
        if hz >= size:
            return f"{_sig(hz / size)} {unit}"
    return f"{_sig(hz)} Hz"


def _fmt_option(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# ---------------------------------------------------------------- validation


def _fail(source: str, message: str) -> EdgekdError:
    return EdgekdError(f"{source}: {message}")


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"did you mean '{close[0]}'?" if close else ""


def _check_value(value: Any, spec: tuple, key: str, source: str) -> Any:
    kind, hint = spec
    if isinstance(kind, tuple):  # enum
        if value not in kind:  # also catches non-strings
            suggest = _hint(value, kind)
            suggest = f"; {suggest}" if suggest else ""
            raise _fail(source, f"'{key}' is {value!r}, must be one of {', '.join(kind)}{suggest}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise _fail(source, f"'{key}' must be a non-empty string, got {value!r}; set it to {hint}")
        return value
    if kind == "references":
        return _check_references(value, key, source)
    if kind == "history":
        return _check_history(value, key, source)
    if kind == "options":
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _fail(source, f"'{key}' must be a mapping, got {type(value).__name__}; write {hint}")
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(source, f"'{key}' has a non-string key {k!r}; option names are strings")
            if not isinstance(v, (bool, int, float, str)):
                raise _fail(source, f"'{key}.{k}' must be a bool, number or string, got {type(v).__name__}")
        return MappingProxyType(dict(value))
    # numbers; bool is an int subclass in Python but never a valid count
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a whole number" if kind == "int" else "a number"  # float and float0 alike
        extra = "; write a plain number without quotes"
        if isinstance(value, str) and _parses_as_float(value):
            extra = " (PyYAML reads an exponent without a sign as a string: write 1.0e+9, not 1e9)"
        raise _fail(source, f"'{key}' must be {what} ({hint}), got {type(value).__name__} {value!r}{extra}")
    if kind == "int" and not isinstance(value, int):
        raise _fail(source, f"'{key}' must be a whole number ({hint}), got {value!r}; drop the decimal part")
    if kind == "float0":
        if not math.isfinite(value) or value < 0:
            raise _fail(source, f"'{key}' must be a number >= 0 ({hint}), got {value!r}")
        return float(value)
    if not math.isfinite(value) or value <= 0:
        raise _fail(source, f"'{key}' must be a positive number ({hint}), got {value!r}")
    return float(value) if kind == "float" else value


def _check_references(value: Any, key: str, source: str) -> tuple["Reference", ...]:
    if not isinstance(value, list) or not value:
        raise _fail(source, f"'{key}' must be a non-empty list of measurements with keys {', '.join(REFERENCE_KEYS)}")
    out = []
    for i, item in enumerate(value):
        where = f"'{key}[{i}]'"
        if not isinstance(item, dict) or not set(REFERENCE_KEYS) <= set(item) <= set(REFERENCE_KEYS) | OPTIONAL_REFERENCE_KEYS:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise _fail(source, f"{where} must have exactly the keys {', '.join(REFERENCE_KEYS)} (and optionally "
                                f"{', '.join(OPTIONAL_REFERENCE_KEYS)}), got {got}")
        options = item.get("options", {})
        if not isinstance(options, dict) or not all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                                    for k, v in options.items()):
            raise _fail(source, f"{where}.options must map option names to plain values, got {options!r}")
        for k, kind in REFERENCE_KEYS.items():
            v = item[k]
            ok = v in kind if isinstance(kind, tuple) else (
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 if kind is float else
                isinstance(v, int) and not isinstance(v, bool) and v > 0 if kind is int else isinstance(v, str) and v)
            if not ok:
                want = " or ".join(kind) if isinstance(kind, tuple) else f"a positive {kind.__name__}"
                raise _fail(source, f"{where}.{k} must be {want}, got {v!r}")
        out.append(Reference(**{**item, "latency_ms": float(item["latency_ms"]), "options": dict(options)}))
    return tuple(out)


def _check_history(value: Any, key: str, source: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise _fail(source, f"'{key}' must be a list of earlier coefficients with keys {', '.join(HISTORY_KEYS)}")
    out = []
    for i, item in enumerate(value):
        where = f"'{key}[{i}]'"
        if not isinstance(item, dict) or set(item) != set(HISTORY_KEYS):
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise _fail(source, f"{where} must have exactly the keys {', '.join(HISTORY_KEYS)}, got {got}")
        for k, kind in HISTORY_KEYS.items():
            v = item[k]
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0) if kind is float \
                else isinstance(v, str) and v.strip() != ""
            if not ok:
                raise _fail(source, f"{where}.{k} must be {'a number >= 0' if kind is float else 'a non-empty string'}, got {v!r}")
        out.append({k: (float(item[k]) if kind is float else item[k]) for k, kind in HISTORY_KEYS.items()})
    return tuple(out)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_section(data: Any, schema: dict, prefix: str, source: str) -> dict[str, Any]:
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    if data is None and not prefix:
        raise _fail(source, "the file is empty; write the target keys (see targets/cortex-m7.yaml)")
    if not isinstance(data, dict):
        raise _fail(source, f"{where} must be a mapping of keys, got {type(data).__name__}")
    for key in data:
        if key not in schema:
            suggest = _hint(key, schema)
            suggest = f"; {suggest}" if suggest else f"; remove it (allowed: {', '.join(schema)})"
            raise _fail(source, f"unknown key '{prefix}{key}'{suggest}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        path = prefix + key
        if key not in data:
            if path in _OPTIONAL:
                out[key] = {"model_options": MappingProxyType({}), "latency_model.history": ()}.get(path)
                continue
            hint = f"a section with {', '.join(spec)}" if isinstance(spec, dict) else spec[1]
            raise _fail(source, f"missing key '{path}'; add it ({hint})")
        if isinstance(spec, dict):
            out[key] = _check_section(data[key], spec, path + ".", source)
        else:
            out[key] = _check_value(data[key], spec, path, source)
    return out


def parse_target(data: dict, source: str) -> Target:
    """Validate a parsed target mapping; `source` (usually the file path) prefixes every error."""
    v = _check_section(data, _SCHEMA, "", source)
    values = {"device_class": v["device_class"], "export.format": v["export"]["format"],
              "export.precision": v["export"]["precision"]}
    for key, allowed in _RUNTIME_RULES[v["runtime"]].items():
        if values[key] not in allowed:
            raise _fail(
                source,
                f"runtime '{v['runtime']}' needs {key} {' or '.join(allowed)}, got '{values[key]}'; "
                f"change {key} or the runtime",
            )
    return Target(
        name=v["name"],
        description=v["description"],
        device_class=v["device_class"],
        runtime=v["runtime"],
        export=ExportDefaults(**v["export"]),
        memory=Memory(**v["memory"]),
        compute=Compute(**v["compute"]),
        input=InputSpec(**v["input"]),
        latency_budget_ms=v["latency_budget_ms"],
        model_options=v["model_options"],
        source_path=Path(source),
        latency_model=LatencyModel(**v["latency_model"]) if v.get("latency_model") else None,
    )


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader (never executes anything) that rejects duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _targets_dir() -> Path:
    env = os.environ.get(TARGETS_DIR_ENV)
    return Path(env).expanduser() if env else TARGETS_DIR


def _existing_targets_dir() -> Path:
    d = _targets_dir()
    if not d.is_dir():
        raise EdgekdError(
            f"targets directory '{d}' does not exist; set {TARGETS_DIR_ENV} to a folder of <name>.yaml files")
    return d


def _load_file(path: Path) -> Target:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(source, f"cannot read target file ({e}); check the path and permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        detail = " ".join(str(e).replace('in "<unicode string>", ', "").split())
        raise _fail(source, f"not valid YAML: {detail}; fix the syntax") from None
    target = parse_target(data, source)
    if target.name != path.stem:
        raise _fail(source, f"name '{target.name}' must equal the file name '{path.stem}'; "
                            f"set name: {path.stem} or rename the file to {target.name}.yaml")
    return target


def load_target(name_or_path: str) -> Target:
    """Load a target by name (from the targets dir, or $EDGEKD_TARGETS_DIR) or from a path to a .yaml file."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise EdgekdError(f"target file '{path}' not found; give a target name or an existing .yaml path")
        return _load_file(path)
    d = _existing_targets_dir()
    path = d / f"{text}.yaml"
    if not path.is_file():
        names = [p.stem for p in d.glob("*.yaml")]
        close = difflib.get_close_matches(text, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise EdgekdError(f"unknown target '{text}'{hint} (edgekd targets list shows them)")
    return _load_file(path)


def list_targets() -> list[Target]:
    """Every target in the targets dir, sorted by name; a bad file raises its validation error."""
    return [_load_file(p) for p in sorted(_existing_targets_dir().glob("*.yaml"))]
