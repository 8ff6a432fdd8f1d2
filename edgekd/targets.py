"""Deployment targets: one YAML file per device under targets/, validated strictly on load.

A target says what the device can hold (RAM for activations, flash for weights), how fast it computes,
which runtime/export format/precision it needs, and the input size and model options to train with.
The dataclasses below are the schema (validate.py); every problem in a target file is one `EdgekdError` line
naming the file, the key and the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from .errors import EdgekdError
from .export import formats
from .resources import data_dir
from .validate import build, did_you_mean, setting

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

# The schema: every field is a YAML key (but source_path), a field with a default is optional.


@dataclass(frozen=True)
class ExportDefaults:
    format: str = setting(choices=FORMATS, hint="the exported model format")
    precision: str = setting(choices=PRECISIONS, hint="the deployed numeric precision")


@dataclass(frozen=True)
class Memory:
    ram_bytes: int = setting(above=0, hint="bytes available to activations")
    flash_bytes: int = setting(above=0, hint="bytes available to weights")


@dataclass(frozen=True)
class Compute:
    clock_hz: int = setting(above=0, hint="the core clock in Hz")
    peak_macs_per_s: float = setting(above=0, hint="peak multiply-accumulates per second at the deployed precision")
    memory_bandwidth_bytes_per_s: float = setting(above=0, hint="memory bandwidth in bytes per second")


@dataclass(frozen=True)
class InputSpec:
    resolution: int = setting(above=0, hint="square input size in pixels")
    channels: int = setting(above=0, hint="input channels (3 for RGB, 1 for grayscale)")


@dataclass(frozen=True)
class Reference:
    """A published latency of a model on a device, with the device's clock (cycles transfer across clocks)."""

    model: str = setting(nonempty=True, hint="the zoo model measured")
    resolution: int = setting(above=0, hint="its input size in pixels")
    num_classes: int = setting(above=0, hint="its classes")
    in_chans: int = setting(above=0, hint="its input channels")
    latency_ms: float = setting(above=0, hint="the measured latency in ms")
    clock_hz: int = setting(above=0, hint="the clock it was measured at")
    # "fit": the latency model was fitted to it; "check": held out, only compared
    role: str = setting(choices=("fit", "check"))
    source: str = setting(nonempty=True, hint="where the measurement was published")
    # create_model options of a zoo model measured on the device (`edgekd profile --calibrate`)
    options: Mapping[str, bool | int | float | str] = setting(
        default_factory=lambda: MappingProxyType({}), hash=False, compare=False,
        hint="create_model options of the measured model")

    def __post_init__(self):
        # a plain dict (validated by `build`), so targets pickle for DataLoader workers / DDP ranks
        object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class History:
    """Coefficients that `edgekd profile --calibrate` replaced, oldest first in `LatencyModel.history`."""

    cycles_per_mac: float = setting(at_least=0, hint="the replaced cycles per MAC")
    cycles_per_element: float = setting(at_least=0, hint="the replaced cycles per element")
    cycles_per_op: float = setting(at_least=0, hint="the replaced cycles per operator")
    fitted_to: str = setting(nonempty=True, hint="what they had been fitted to")
    until: str = setting(nonempty=True, hint="the date they were replaced")
    replaced_by: str = setting(nonempty=True, hint="what replaced them")


@dataclass(frozen=True)
class LatencyModel:
    cycles_per_mac: float = setting(
        above=0, hint="core cycles per multiply-accumulate of conv/depthwise/fully-connected ops")
    cycles_per_element: float = setting(
        at_least=0, hint="core cycles per input element of elementwise, pooling and pad ops")
    cycles_per_op: float = setting(at_least=0, hint="fixed cycles per operator (dispatch, kernel launch)")
    references: tuple[Reference, ...] = setting(
        nonempty=True, hint="published measurements the model was fitted to or is checked against")
    history: tuple[History, ...] = setting(
        (), hint="earlier coefficients, kept when `edgekd profile --calibrate` replaced them")


@dataclass(frozen=True)
class Target:
    name: str = setting(nonempty=True, hint="the target name, equal to the file name without .yaml")
    description: str = setting(nonempty=True, hint="one line describing the device")
    device_class: str = setting(choices=DEVICE_CLASSES, hint="the kind of processor")
    runtime: str = setting(choices=RUNTIMES, hint="the inference runtime on the device")
    export: ExportDefaults
    memory: Memory
    compute: Compute
    input: InputSpec
    latency_budget_ms: float = setting(above=0, hint="the latency budget per inference in ms")
    source_path: Path  # the file it was read from, not a key
    # read-only (MappingProxyType); a target may imply no model options
    model_options: Mapping[str, bool | int | float | str] = setting(
        default_factory=lambda: MappingProxyType({}), hash=False, hint="create_model options, e.g. {low_res_stem: true}")
    latency_model: LatencyModel | None = None  # a target may lack a latency model

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
                                  **({"history": [vars(h).copy() for h in self.latency_model.history]}
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


def parse_target(data: dict, source: str) -> Target:
    """Validate a parsed target mapping; `source` (usually the file path) prefixes every error."""
    if data is None:
        raise _fail(source, "the file is empty; write the target keys (see targets/cortex-m7.yaml)")
    target = build(Target, data, context=source, fixed={"source_path": Path(source)})
    values = {"device_class": target.device_class, "export.format": target.export.format,
              "export.precision": target.export.precision}
    for key, allowed in _RUNTIME_RULES[target.runtime].items():
        if values[key] not in allowed:
            raise _fail(
                source,
                f"runtime '{target.runtime}' needs {key} {' or '.join(allowed)}, got '{values[key]}'; "
                f"change {key} or the runtime",
            )
    return target


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
        hint = did_you_mean(text, [p.stem for p in d.glob("*.yaml")])
        raise EdgekdError(f"unknown target '{text}'{hint} (edgekd targets list shows them)")
    return _load_file(path)


def list_targets() -> list[Target]:
    """Every target in the targets dir, sorted by name; a bad file raises its validation error."""
    return [_load_file(p) for p in sorted(_existing_targets_dir().glob("*.yaml"))]
