"""`edgekd profile --calibrate`: refit a target's latency coefficients to latencies measured on the device.

Each measurement becomes a reference in the target's YAML (role `fit`, the zoo model with its create_model
options so tools/fit_profiler.py can rebuild it later, the device's clock, and a source line saying where, with
what and when it was measured). The published references that were fitted before become `check` (held out:
reports keep showing how far the new model is from them), the coefficients are refitted with the same fit as
tools/fit_profiler.py (cycles_per_mac; cycles_per_op too on GPUs with two or more measurements), and the old
values go to `latency_model.history` with what they were fitted to. The file is edited as text so its comments
stay, re-parsed before it replaces the old one, and written atomically.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from pathlib import Path

from ..errors import EdgekdError
from ..targets import LatencyModel, Reference, Target, parse_target
from .latency import fit_latency_model, reference_errors

# which measured runtime stands for which target runtime
RUNTIME_OF_TARGET = {"tflite": ("litert",), "tflite-micro": ("tflite-micro",), "tensorrt": ("tensorrt",)}
_IGNORED_OPTIONS = ("name", "num_classes", "in_chans", "dropout")  # dropout does not change the deployed graph


def check_measurement(target: Target, label: str, m: dict) -> None:
    """Only a measurement that is of this target's runtime, at batch 1, and agrees with the host can calibrate."""
    allowed = RUNTIME_OF_TARGET.get(target.runtime, ())
    if m["runtime"] not in allowed:
        raise EdgekdError(f"{label}: measured with {m['runtime']}, but {target.name} runs {target.runtime}; only "
                          f"{' or '.join(allowed) or 'nothing here'} measurements can calibrate it (leave out --calibrate)")
    if m["batch"] != 1:
        raise EdgekdError(f"{label}: the latency model is per image; calibrate with a batch-1 measurement (--batch 1)")
    if not m["agreement"]["agrees"]:
        raise EdgekdError(f"{label}: the device's outputs do not agree with this host's ({m['agreement']['criterion']}), "
                          "so its timing may be of a broken model; not calibrating")
    if target.latency_model is None:
        raise EdgekdError(f"target {target.name} has no latency_model section to calibrate: add one (see targets/cortex-m7.yaml)")


def measured_reference(target: Target, model_config: dict, resolution: int, m: dict) -> Reference:
    """The measurement as a reference the profiler can rebuild: zoo model + options, latency, the device's clock."""
    options = {k: v for k, v in model_config.items() if k not in _IGNORED_OPTIONS and isinstance(v, (bool, int, float, str))}
    clock = int(m.get("clock_hz") or 0) or target.compute.clock_hz
    clock_note = "" if m.get("clock_hz") else f", clock not readable: assumed {target.compute.clock_hz:,} Hz"
    device = m.get("device", {}).get("model") or "unknown device"
    via = f"agent {m['url']}" if m["via"] == "agent" else f"serial {m.get('port')}"
    runtime = f"{m['runtime']} {m.get('runtime_version') or ''}".strip()
    source = (f"measured: edgekd profile --device/--serial ({via}) on {device}, {runtime}, {m.get('threads') or 1} "
              f"thread(s), p50 of {m['runs']} runs, {m['measured_at'][:10]}{clock_note}")
    return Reference(model=model_config["name"], resolution=int(resolution), num_classes=int(model_config["num_classes"]),
                     in_chans=int(model_config.get("in_chans", 3)), latency_ms=round(float(m["p50_ms"]), 6),
                     clock_hz=clock, role="fit", source=source, options=options)


def _flow(values: dict) -> str:
    """A one-line YAML flow mapping (JSON scalars are valid YAML)."""
    def scalar(v):
        if isinstance(v, dict):
            return _flow(v)
        if isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.@-]*", v) and v not in ("true", "false", "null", "yes", "no", "on", "off"):
            return v
        return json.dumps(v)
    return "{" + ", ".join(f"{k}: {scalar(v)}" for k, v in values.items()) + "}"


def _reference_line(ref: Reference) -> str:
    fields = {"model": ref.model, "resolution": ref.resolution, "num_classes": ref.num_classes, "in_chans": ref.in_chans,
              "options": dict(ref.options), "latency_ms": ref.latency_ms, "clock_hz": ref.clock_hz, "role": ref.role}
    head = _flow(fields)[:-1]
    return f"    - {head},\n       source: {json.dumps(ref.source)}}}\n"


def updated_yaml(text: str, old: LatencyModel, new: LatencyModel, measured: list[Reference], reason: str) -> str:
    """The target file with new coefficients, the old fit references held out, the measurements added as fit
    references and the old coefficients appended to the history. Raises when the file is not laid out as expected."""
    def sub(pattern: str, value: str, s: str) -> str:
        out, n = re.subn(pattern, lambda mo: mo.group(1) + value, s, count=1)
        if n != 1:
            raise EdgekdError(f"cannot find '{pattern.strip()}' in the target file to update it; edit it by hand")
        return out

    text = sub(r"(\n  cycles_per_mac: )[0-9.eE+-]+", f"{new.cycles_per_mac:g}", text)
    text = sub(r"(\n  cycles_per_op: )[0-9.eE+-]+", f"{new.cycles_per_op:g}", text)
    text = re.sub(r"\brole: fit\b", "role: check", text)  # what was fitted before is held out from now on
    match = re.search(r"^  references:[^\n]*\n", text, re.MULTILINE)
    if match is None:
        raise EdgekdError("cannot find 'latency_model.references' in the target file; edit it by hand")
    fitted = ", ".join(f"{r.model}@{r.resolution}" for r in old.references if r.role == "fit") or "nothing"
    entry = _flow({"cycles_per_mac": old.cycles_per_mac, "cycles_per_element": old.cycles_per_element,
                   "cycles_per_op": old.cycles_per_op, "fitted_to": fitted,
                   "until": datetime.date.today().isoformat(), "replaced_by": reason})
    history = "" if re.search(r"^  history:", text, re.MULTILINE) else \
        "  history:  # earlier coefficients, replaced by `edgekd profile --calibrate` (oldest first)\n"
    start = match.start()
    refs = "".join(_reference_line(r) for r in measured)
    return text[:start] + history + f"    - {entry}\n" + text[start:match.end()] + refs + text[match.end():]


def calibrate(target: Target, measured: list[Reference], reason: str) -> dict:
    """Refit and rewrite target.source_path; returns the old and new coefficients and the new errors."""
    old = target.latency_model
    references = [*measured, *(Reference(**{**vars(r), "role": "check"}) for r in old.references)]
    free = len(measured) >= 2 and target.device_class == "gpu"
    new = fit_latency_model(target, references, old.cycles_per_element, free, old.cycles_per_op)
    path = Path(target.source_path)
    text = updated_yaml(path.read_text(), old, new, measured, reason)
    import yaml

    reparsed = parse_target(yaml.safe_load(text), str(path))  # nothing is written unless it reads back exactly
    lm = reparsed.latency_model
    if (lm.cycles_per_mac, lm.cycles_per_op) != (new.cycles_per_mac, new.cycles_per_op) or \
            sum(r.role == "fit" for r in lm.references) != len(measured):
        raise EdgekdError(f"updating {path} would not give the refitted model; edit it by hand")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return {"target": target.name, "file": str(path),
            "old": {k: getattr(old, k) for k in ("cycles_per_mac", "cycles_per_element", "cycles_per_op")},
            "new": {k: getattr(lm, k) for k in ("cycles_per_mac", "cycles_per_element", "cycles_per_op")},
            "errors": reference_errors(reparsed), "target_obj": reparsed}
