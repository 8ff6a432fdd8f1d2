"""profile(): what a student costs on a target, estimated and (on this host) measured.

A source is one of
- `NAME@RES` (a zoo model at a resolution, untrained: costs only),
- a run directory written by `edgekd train` (its best.pt; accuracy from summary.json; its int8 TFLite export,
  when there is one, supplies the exact graph, file size, measured TFLM arena and exported accuracy),
- an export bundle folder or its .tflite/.onnx file (must carry the manifest.json export wrote).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import EdgekdError
from ..export.manifest import MANIFEST_NAME
from ..targets import Target
from . import latency as lat
from .estimate import PERSISTENT_NOTE, estimate_graph
from .graph import BYTES_PER_ELEMENT, Graph, read_tflite, trace_model


@dataclass
class Source:
    kind: str  # "model", "run" or "artifact"
    label: str
    resolution: int
    channels: int
    model: nn.Module | None = None
    tflite_int8: Path | None = None  # an exported full-int8 model, when there is one
    manifest: dict | None = None  # that export's manifest
    accuracy: dict = field(default_factory=dict)
    path: Path | None = None


def parse_model_spec(text: str, resolution: int | None = None) -> tuple[str, int]:
    from ..models import MODELS

    name, _, res = text.partition("@")
    if name not in MODELS:
        raise EdgekdError(f"'{text}' is not a run, an export or a zoo model (`edgekd models` lists them); "
                          "write a model as NAME@RESOLUTION, e.g. mobilenetv2_035@64")
    if res:
        if not res.isdigit() or int(res) < 8:
            raise EdgekdError(f"'{text}': the resolution after @ must be a whole number of pixels >= 8")
        return name, int(res)
    if resolution is None:
        raise EdgekdError(f"'{text}' needs a resolution: write {name}@64 or pass --resolution")
    return name, resolution


def _read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise EdgekdError(f"{bundle} has no {MANIFEST_NAME}: profile artifacts written by `edgekd export` "
                          "(the manifest says what was exported and how it was verified)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgekdError(f"{path} is not a readable manifest ({type(e).__name__}); re-export the model") from None


def _int8_export(run_dir: Path) -> tuple[Path | None, dict | None]:
    bundle = run_dir / "export" / "tflite-int8"
    if not (bundle / MANIFEST_NAME).is_file():
        return None, None
    manifest = _read_manifest(bundle)
    return bundle / manifest["artifact"]["file"], manifest


def _exported_accuracy(manifest: dict | None) -> dict:
    if not manifest:
        return {}
    v = manifest.get("verification", {})
    runtime = "tflite_micro" if "tflite_micro" in v else next((k for k, x in v.items() if isinstance(x, dict)
                                                               and "accuracy" in x), None)
    if runtime is None:
        return {}
    return {"exported": v[runtime]["accuracy"], "exported_runtime": runtime,
            "exported_reference": v[runtime].get("reference_accuracy"), "exported_images": v[runtime].get("images"),
            "exported_precision": manifest.get("precision")}


def _load_plain(source: Path):
    """The model to trace: a quantized run's (edgekd quantize) is its folded float architecture with its trained
    weights, what the int8 artifact computes with; torch.fx cannot trace NNCF's quantizers."""
    from ..quantize.nncf_backend import float_model
    from ..train.checkpoint import load_model, read_checkpoint, resolve_model_file

    payload = read_checkpoint(resolve_model_file(source), kind="model")
    if "quantization" in payload:
        return float_model(payload), payload
    return load_model(source)


def resolve_source(text: str, resolution: int | None = None) -> Source:
    from ..models import create_model

    path = Path(text)
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "best.pt").is_file():
        raise EdgekdError(f"{path} is a run without best.pt (it did not finish an epoch): resume it with "
                          f"`edgekd train --resume {path}` or profile NAME@RESOLUTION")
    if path.is_dir() and (path / "best.pt").is_file():  # a run
        model, payload = _load_plain(path)
        tflite, manifest = _int8_export(path)
        accuracy = {}
        summary = path / "summary.json"
        if summary.is_file():
            accuracy = {"float": json.loads(summary.read_text()).get("test_acc")}
        accuracy.update(_exported_accuracy(manifest))
        d = payload["data"]
        return Source("run", path.name, d["resolution"], d["channels"], model.eval(), tflite, manifest, accuracy, path)
    if path.exists():  # an export bundle or one of its files
        bundle = path if path.is_dir() else path.parent
        manifest = _read_manifest(bundle)
        artifact = bundle / manifest["artifact"]["file"]
        shape = manifest["input"]["shape"]
        res, channels = (shape[1], shape[3]) if manifest["input"].get("layout") == "NHWC" else (shape[2], shape[1])
        tflite = artifact if artifact.suffix == ".tflite" and manifest["precision"] == "int8" else None
        model = None
        checkpoint = Path(manifest["source"]["checkpoint"])
        if checkpoint.is_file():
            model, _ = _load_plain(checkpoint)
            model.eval()
        elif tflite is None:
            raise EdgekdError(f"{path}: its checkpoint {checkpoint} is gone and only int8 .tflite artifacts can be "
                              "profiled on their own; profile the run or re-export")
        accuracy = {"float": manifest["source"].get("metrics", {}).get("test_acc"), **_exported_accuracy(manifest)}
        return Source("artifact", bundle.name, int(res), int(channels), model, tflite, manifest, accuracy, bundle)
    if "/" in text or text.endswith((".tflite", ".onnx", ".pt")):
        raise EdgekdError(f"{text} does not exist: pass a run directory, an export bundle or NAME@RESOLUTION")
    name, res = parse_model_spec(text, resolution)
    model = create_model(name, 10, input_size=res, low_res_stem=res <= 96)
    return Source("model", f"{name}@{res}", res, 3, model.eval())


def _graph(source: Source, precision: str) -> Graph:
    """The exact .tflite graph when the source has the int8 export and the target deploys int8."""
    if precision == "int8" and source.tflite_int8 is not None:
        return read_tflite(source.tflite_int8)
    if source.model is None:
        raise EdgekdError(f"{source.label}: no PyTorch model to trace and no int8 .tflite to read")
    return trace_model(source.model, source.resolution, source.channels, name=source.label)


def _layers(graph: Graph, precision: str, op_ms: list[float] | None) -> list[dict]:
    per_element = BYTES_PER_ELEMENT[precision]
    rows = []
    for i, op in enumerate(graph.ops):
        out = graph.tensors[op.output]
        rows.append({"name": op.name, "op": op.kind, "macs": op.macs, "params": op.params,
                     "weight_bytes": (op.weight_elements + 4 * op.bias_elements if precision == "int8"
                                      else op.params * per_element),
                     "output_shape": list(out.shape), "output_bytes": out.elements * per_element,
                     "estimated_ms": None if op_ms is None else round(op_ms[i], 5)})
    return rows


def profile_one(source: Source, target: Target, runners: tuple[str, ...] | None = None, *,
                threads: int = 1, runs: int = 100, host_peak: float | None = None,
                timings: list[lat.Timing] | None = None) -> dict:
    """One source on one target. `timings`: host timings measured already (they do not depend on the target)."""
    precision = target.export.precision
    graph = _graph(source, precision)
    est = estimate_graph(graph, precision)
    sram = est.get("arena_bytes", est["activation_bytes"])
    measured: dict = {}
    if precision == "int8" and source.tflite_int8 is not None:
        measured["tflite_bytes"] = source.tflite_int8.stat().st_size
        if source.manifest and "tflm" in source.manifest:
            measured["tflm_arena_bytes"] = source.manifest["tflm"]["arena_bytes"]
    latency_ms = lat.estimate_ms(graph, target)
    flash = measured.get("tflite_bytes", est["flash_bytes"])
    ram = measured.get("tflm_arena_bytes", sram)
    fits = {
        "sram": ram <= target.memory.ram_bytes,
        "flash": flash <= target.memory.flash_bytes,
        "latency": latency_ms is not None and latency_ms <= target.latency_budget_ms,
    }
    fits["all"] = all(fits.values())
    if timings is None:
        timings = host_timings(source, runners, threads=threads, runs=runs)
    report = {
        "source": {"kind": source.kind, "label": source.label, "resolution": source.resolution,
                   "channels": source.channels, "path": str(source.path) if source.path else None,
                   "model": (source.model.model_config.get("name") if source.model is not None
                             and hasattr(source.model, "model_config") else None)},
        "target": {"name": target.name, "precision": precision, "ram_bytes": target.memory.ram_bytes,
                   "flash_bytes": target.memory.flash_bytes, "latency_budget_ms": target.latency_budget_ms},
        "graph": {"from": graph.source, "ops": len(graph.ops), "op_counts": graph.op_counts()},
        "estimate": {k: v for k, v in est.items() if k != "features"} | {"sram_bytes": sram,
                                                                       "latency_ms": latency_ms},
        "measured": measured,
        "fits": fits,
        "latency": {
            "device_estimate_ms": latency_ms,
            "model": None if target.latency_model is None else {
                k: getattr(target.latency_model, k) for k in ("cycles_per_mac", "cycles_per_element", "cycles_per_op")},
            "host": [t.to_dict() for t in timings],
        },
        "accuracy": source.accuracy,
        "layers": _layers(graph, precision, lat.per_op_ms(graph, target)),
        "notes": [PERSISTENT_NOTE] if precision == "int8" else [],
    }
    if timings:
        peak = host_peak or lat.host_peak_macs_per_s(threads)
        report["latency"]["host_peak_macs_per_s"] = peak
        report["latency"]["host_limit_ms"] = 1e3 * graph.macs / peak
        report["latency"]["host_machine"] = lat.host_description(threads)
    return report


def default_runners(source: Source) -> tuple[str, ...]:
    runners = []
    if source.model is not None:
        runners += ["pytorch", "onnxruntime"]
    if source.tflite_int8 is not None:
        runners += ["litert", "tflite-micro"]
    return tuple(runners)


def check_runners(runners: tuple[str, ...] | None) -> None:
    for r in runners or ():
        if r not in lat.RUNNERS:
            raise EdgekdError(f"unknown runner '{r}': choose from {', '.join(lat.RUNNERS)}")


def host_timings(source: Source, runners: tuple[str, ...] | None, *, threads: int, runs: int) -> list[lat.Timing]:
    runners = default_runners(source) if runners is None else runners
    check_runners(runners)
    out = []
    for runner in runners:
        if runner in ("pytorch", "onnxruntime") and source.model is None:
            raise EdgekdError(f"runner {runner} needs the PyTorch model, and {source.label} has none (its checkpoint "
                              "is gone): use --runners litert,tflite-micro")
        if runner in ("litert", "tflite-micro") and source.tflite_int8 is None:
            raise EdgekdError(f"runner {runner} needs an int8 .tflite and {source.label} has none: "
                              f"export it first (`edgekd export ... --format tflite --precision int8`)")
        if runner == "pytorch":
            out.append(lat.time_pytorch(source.model, source.resolution, source.channels, threads=threads, runs=runs))
        elif runner == "onnxruntime":
            with lat.temp_dir() as tmp:
                onnx = lat.export_temp_onnx(source.model, source.resolution, source.channels, Path(tmp))
                out.append(lat.time_onnxruntime(onnx, threads=threads, runs=runs))
        elif runner == "litert":
            out.append(lat.time_litert(source.tflite_int8, threads=threads, runs=runs))
        else:
            from ..export.tflm import LARGE_ARENA

            arena = (source.manifest or {}).get("tflm", {}).get("arena_bytes") or LARGE_ARENA
            out.append(lat.time_tflm(source.tflite_int8, arena + 4096, runs=max(10, runs // 5)))
    return out
