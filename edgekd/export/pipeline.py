"""export(): checkpoint -> verified artifact bundle (the file, its extras and manifest.json).

Order of work: validate the request (format table, target, installed extra) before loading anything; load
the model and the run's data (calibration images from the train split, verification images from the test
split, both normalised with the checkpoint's own mean/std); convert and verify inside a staging folder;
only when every check passed is the staging folder renamed to the bundle. A failure removes it: no partial
artifacts are left behind.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import EdgekdError
from ..quantize.checkpoint import describe, load_any
from ..targets import Target, format_bytes, load_target
from ..train.checkpoint import file_sha256, load_model, read_checkpoint, resolve_model_file
from . import manifest as manifests
from .formats import Choice, choose, require_modules
from .verify import FP32_TOLERANCE, MIN_AGREEMENT, torch_logits


@dataclass
class Samples:
    """Real images of the run's dataset at its resolution: pixels in [0, 1] and normalised inputs."""

    spec: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    calib_pixels: np.ndarray  # (N, C, H, W) float32, pixel / 255, train split
    test_pixels: np.ndarray  # (M, C, H, W) float32, pixel / 255, test split
    test_y: np.ndarray  # (M,) int64
    notes: dict = field(default_factory=dict)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((pixels - mean) / std).astype(np.float32)

    @cached_property
    def calib_x(self) -> np.ndarray:
        return self.normalise(self.calib_pixels)

    @cached_property
    def test_x(self) -> np.ndarray:
        return self.normalise(self.test_pixels)

    def describe(self) -> dict:
        return {"data": self.spec, "calibration": {"split": "train", "images": int(len(self.calib_pixels))},
                "test": {"split": "test", "images": int(len(self.test_y))}, **self.notes}


def _pixels(imageset, indices: torch.Tensor, channels: int) -> np.ndarray:
    x = imageset.get_batch(indices).float().div_(255.0)
    if x.shape[1] == 1 and channels == 3:  # grey sources are stored with one channel (as the BatchLoader does)
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous().numpy()


def load_samples(payload: dict, checkpoint: Path, data: str | None, calib_images: int, verify_images: int) -> Samples:
    from ..config import TrainConfig
    from ..data.datamodule import load_data
    from ..quantize.config import CONFIG_NAME, QuantizeConfig

    d = payload["data"]
    spec = data or d["spec"]
    # the run's split settings, when the checkpoint sits in its run (a quantized run copied its float run's)
    config_file, quantize_file = checkpoint.parent / "config.yaml", checkpoint.parent / CONFIG_NAME
    config = (TrainConfig.load(config_file) if config_file.is_file() else
              QuantizeConfig.load(quantize_file) if quantize_file.is_file() else None)
    dm = load_data(spec, resolution=d["resolution"], channels=d["channels"], seed=d.get("seed", 0),
                   val_fraction=config.val_fraction if config else 0.1, limit=config.limit if config else None)
    if list(dm.info.class_names) != list(d["class_names"]):
        raise EdgekdError(f"data '{spec}' has classes {list(dm.info.class_names)[:5]}... but the checkpoint was trained "
                          f"on {list(d['class_names'])[:5]}...: pass the run's data with --data")
    g = torch.Generator().manual_seed(0)
    calib_idx = torch.randperm(len(dm.train), generator=g)[:calib_images].sort().values
    test_idx = torch.randperm(len(dm.test), generator=g)[:verify_images].sort().values
    notes = {}
    if d.get("sizes") and d["sizes"].get("test") != len(dm.test):
        notes["warning"] = f"the test split has {len(dm.test)} images, the run had {d['sizes'].get('test')}"
    return Samples(spec, tuple(d["mean"]), tuple(d["std"]), _pixels(dm.train, calib_idx, d["channels"]),
                   _pixels(dm.test, test_idx, d["channels"]), dm.test.labels[test_idx].numpy(), notes)


@dataclass
class Job:
    """What a converter gets: the model, data, where to write, and the checks it must apply."""

    model: nn.Module
    payload: dict
    choice: Choice
    target: Target | None
    stage: Path  # becomes the bundle when everything passed
    work: Path  # scratch, always deleted
    stem: str
    samples: Samples
    reference_logits: np.ndarray
    fp32_tolerance: float
    min_agreement: float
    console: Any = None
    quantization: dict | None = None  # a quantized run's quantizer state (the model is then fake-quantized)
    # the float run's logits on the test images, when the model is quantized and its float run is at hand
    float_source_logits: np.ndarray | None = None
    layer_hint: str = ""  # the worst layers of the per-layer report, for failure messages
    default_logits: np.ndarray | None = None  # set by converters that need them twice

    def compare_with_float_source(self, metrics: dict, logits: np.ndarray) -> None:
        """For a quantized run also record how the artifact agrees with the float model it came from."""
        if self.float_source_logits is not None:
            metrics["vs_float_source"] = {
                "top1_agreement": float((logits.argmax(1) == self.float_source_logits.argmax(1)).mean()),
                "float_accuracy": float((self.float_source_logits.argmax(1) == self.samples.test_y).mean()),
            }

    @property
    def precision(self) -> str:
        return self.choice.precision

    @property
    def options(self) -> dict:
        return self.choice.options

    @property
    def resolution(self) -> int:
        return int(self.payload["data"]["resolution"])

    @property
    def channels(self) -> int:
        return int(self.payload["data"]["channels"])

    @property
    def num_classes(self) -> int:
        return int(self.payload["model_config"]["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.payload["data"]["class_names"]]

    @property
    def normalisation(self) -> dict:
        return {"mean": list(self.samples.mean), "std": list(self.samples.std),
                "formula": "x = (pixel / 255 - mean[c]) / std[c]", "pixels": "uint8 0-255, channels as in training"}

    def say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def check_flash(self, path: Path) -> None:
        if self.target is None:
            return
        size, flash = Path(path).stat().st_size, self.target.memory.flash_bytes
        if size > flash:
            raise EdgekdError(
                f"the {self.choice.format.name} {self.precision} model is {format_bytes(size)} ({size:,} B) but "
                f"{self.target.name} has {format_bytes(flash)} ({flash:,} B) of flash for weights: choose a smaller "
                "student or width (see `edgekd models`), or a lower precision")

    def check_ram(self, arena_bytes: int) -> None:
        if self.target is None:
            return
        ram = self.target.memory.ram_bytes
        if arena_bytes > ram:
            raise EdgekdError(
                f"the model needs a {format_bytes(arena_bytes)} ({arena_bytes:,} B) tensor arena but {self.target.name} "
                f"has {format_bytes(ram)} ({ram:,} B) of RAM for activations: train at a lower resolution or "
                "with a narrower student")


@dataclass
class Artifact:
    """An exported, verified model: the bundle folder, its main file and its manifest."""

    path: Path
    manifest_path: Path
    format: str
    precision: str
    manifest: dict

    @property
    def bundle(self) -> Path:
        return self.path.parent

    def summary_lines(self) -> list[str]:
        m = self.manifest
        lines = [f"{self.format} {self.precision}: {self.path} ({format_bytes(m['artifact']['bytes'])})"]
        if m.get("quantization", {}).get("quantizer"):
            q = m["quantization"]
            lines.append(f"  int8 by {q['quantizer']}: {q.get('origin') or q.get('tool') or q.get('activations', '')}")
        for runtime, v in m["verification"].items():
            if not isinstance(v, dict) or "top1_agreement" not in v:
                continue
            vs_float = v.get("vs_float_source")
            lines.append(f"  {runtime}: max abs logit error {v['max_abs_logit_error']:.3g}, top-1 agreement with PyTorch "
                         f"{v['top1_agreement']:.1%}, accuracy {v['accuracy']:.1%} (PyTorch {v['reference_accuracy']:.1%}) "
                         f"on {v['images']} test images"
                         + (f"; vs the float run: agreement {vs_float['top1_agreement']:.1%}, float accuracy "
                            f"{vs_float['float_accuracy']:.1%}" if vs_float else ""))
        if m.get("layer_errors", {}).get("worst"):
            lines.append(f"  worst layers (added int8 error): {', '.join(m['layer_errors']['worst'])} "
                         f"(table: {LAYER_TABLE})")
        if "tflm" in m:
            lines.append(f"  TFLite Micro tensor arena: {m['tflm']['arena_bytes']:,} B (host, found by bisection)")
        if "c_array" in m:
            lines.append(f"  C array: {m['c_array']['header']} + {m['c_array']['source']} (compiled with {m['c_array']['compiled']['compiler']})")
        if "tensorrt" in m:
            lines.append(f"  engine: built on the device with {m['tensorrt']['build_script']} (not here)")
        lines.append(f"  manifest: {self.manifest_path}")
        return lines


def export(
    source,
    format: str | None = None,
    precision: str | None = None,
    target: str | Target | None = None,
    out_dir=None,
    calib_images: int = 200,
    *,
    dynamic_batch: bool = False,
    quantizer: str | None = None,
    data: str | None = None,
    verify_images: int = 1000,
    fp32_tolerance: float = FP32_TOLERANCE,
    min_agreement: float = MIN_AGREEMENT,
    console=None,
) -> Artifact:
    """Export a run directory or model checkpoint and verify the result; see docs/export.md."""
    started = time.perf_counter()
    target_obj = load_target(target) if isinstance(target, str) else target
    options = {"dynamic_batch": dynamic_batch}
    choice = choose(format, precision, target_obj, options, quantizer=quantizer)
    require_modules(choice.format, choice.quantizer)
    if calib_images < 1 or verify_images < 1:
        raise EdgekdError("calib_images and verify_images must be at least 1")
    source = Path(source)
    if not source.exists():
        raise EdgekdError(f"{source} does not exist: pass a run directory written by `edgekd train` or its best.pt")
    if source.is_dir() and not (source / "best.pt").exists() and not (source / "config.yaml").exists():
        raise EdgekdError(f"{source} is not a run directory (no best.pt or config.yaml): pass a folder written by "
                          "`edgekd train` or a .pt checkpoint")
    checkpoint = resolve_model_file(source)
    quantization = read_checkpoint(checkpoint, kind="model").get("quantization")
    if quantization is not None:  # a run of `edgekd quantize`: int8 through its own quantizers
        choice = choose(format, precision, target_obj, options, quantizer=quantizer,
                        quantized=quantization.get("method", "nncf"))
        require_modules(choice.format, choice.quantizer)
    model, payload = _load(checkpoint, quantization)
    model.eval()
    if console is not None:
        console.print(f"exporting {payload['model_config']['name']} from {checkpoint} as {choice.format.name} {choice.precision}"
                      + (f" for {target_obj.name}" if target_obj else ""))
        if target_obj and target_obj.input.resolution != payload["data"]["resolution"]:
            console.print(f"note: the model was trained at {payload['data']['resolution']} px; {target_obj.name}'s default is "
                          f"{target_obj.input.resolution} px. The artifact takes {payload['data']['resolution']} px.")
    samples = load_samples(payload, checkpoint, data, calib_images, verify_images)
    reference = torch_logits(model, samples.test_x)
    float_logits = _float_source_logits(quantization, samples, console)

    out_dir = Path(out_dir) if out_dir is not None else (source if source.is_dir() else checkpoint.parent) / "export"
    bundle = out_dir / f"{choice.format.name}-{choice.precision}"
    stem = f"{payload['model_config']['name']}-{choice.precision}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.partial-", dir=out_dir))
    stage.chmod(0o755)  # mkdtemp makes it private; the bundle is an ordinary folder
    work = Path(tempfile.mkdtemp(prefix="edgekd-export-"))
    job = Job(model, payload, choice, target_obj, stage, work, stem, samples, reference, fp32_tolerance,
              min_agreement, console, quantization, float_logits)
    try:
        result = choice.format.load_converter(choice.precision)(job)
        if result.get("layer_errors"):
            from .layer_errors import markdown

            (stage / LAYER_TABLE).write_text(markdown(result["layer_errors"], f"{stem} ({choice.format.name}, "
                                                      f"quantizer {choice.quantizer})"))
        manifest = _manifest(job, result, checkpoint, time.perf_counter() - started)
        manifests.write(stage / manifests.MANIFEST_NAME, manifest)
        _replace(stage, bundle)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Artifact(bundle / Path(result["artifact"]).name, bundle / manifests.MANIFEST_NAME, choice.format.name,
                    choice.precision, manifest)


LAYER_TABLE = "layer_errors.md"


def _load(checkpoint: Path, quantization: dict | None) -> tuple[nn.Module, dict]:
    return load_any(checkpoint) if quantization is not None else load_model(checkpoint)


def _float_source_logits(quantization: dict | None, samples: Samples, console) -> np.ndarray | None:
    """The float run a quantized model came from, on the same test images (when it is at hand, unchanged)."""
    if quantization is None:
        return None
    source = quantization.get("source") or {}
    path = Path(source.get("checkpoint", ""))
    if not path.is_file() or file_sha256(path) != source.get("sha256"):
        if console is not None:
            console.print(f"note: the float run {path} is not at hand (or changed): agreement with it is not reported")
        return None
    model, _ = load_model(path)
    return torch_logits(model.eval(), samples.test_x)


def _replace(stage: Path, bundle: Path) -> None:
    """Swap the finished staging folder in; an older bundle is removed only after the new one is in place."""
    old = None
    if bundle.exists():
        old = bundle.with_name(f".{bundle.name}.old-{time.time_ns()}")
        bundle.rename(old)
    stage.rename(bundle)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(job: Job, result: dict, checkpoint: Path, seconds: float) -> dict:
    artifact = Path(result["artifact"])
    io = result["io"]
    io["input"]["normalisation"] = job.normalisation
    quant = io["input"].get("quantization")
    if quant:  # the whole input pipeline in one affine map per channel, for firmware
        s, z = quant["scale"], quant["zero_point"]
        io["input"]["int8_from_pixel"] = {
            "formula": "q = clamp(round(pixel * a[c] + b[c]), -128, 127)",
            "a": [1.0 / (255.0 * sd * s) for sd in job.samples.std],
            "b": [z - m / (sd * s) for m, sd in zip(job.samples.mean, job.samples.std)],
        }
    io["output"]["classes"] = job.class_names
    data = job.samples.describe()
    if job.precision != "int8":  # only int8 is calibrated
        data.pop("calibration")
    reference = ("PyTorch fake-quantized (NNCF int8 simulation) logits of the checkpoint" if job.quantization else
                 "PyTorch fp32 logits of the checkpoint")
    verification = {"reference": reference, **data, **result["verification"]}
    if "verification_tflm" in result:
        verification["tflite_micro"] = result.pop("verification_tflm")
    extras = {k: v for k, v in result.items() if k not in ("artifact", "io", "verification", "ops")}
    files = {p.name: p.stat().st_size for p in sorted(job.stage.iterdir()) if p.is_file()}
    files[manifests.MANIFEST_NAME] = None  # this file
    target = job.target
    return {
        "edgekd_manifest": manifests.VERSION,
        "created": manifests.now(),
        "format": job.choice.format.name,
        "precision": job.precision,
        "options": job.options,
        "quantizer": job.choice.quantizer,
        "artifact": {"file": artifact.name, "bytes": artifact.stat().st_size, "sha256": file_sha256(artifact)},
        "files": files,
        "target": None if target is None else {
            "name": target.name, "runtime": target.runtime, "flash_bytes": target.memory.flash_bytes,
            "ram_bytes": target.memory.ram_bytes, "fits_flash": artifact.stat().st_size <= target.memory.flash_bytes,
        },
        "source": {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint),
                   "model": job.payload["model_config"], "metrics": job.payload.get("metrics", {}),
                   **({"quantized": describe(job.quantization)} if job.quantization else {})},
        "input": io["input"],
        "output": io["output"],
        "ops": result["ops"],
        "verification": verification,
        **extras,
        "timing": {"total_s": round(seconds, 1)},
        "tools": manifests.tool_versions(job.choice.format.name, with_gcc="c_array" in result,
                                         with_nncf=job.choice.quantizer == "nncf"),
    }
