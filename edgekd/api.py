"""The Python API the CLI is a thin layer over; notebook users call these directly."""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import TrainConfig
from .data.datamodule import DataModule, load_data
from .distill import METHODS, Distiller
from .distill.teacher_outputs import (DEFAULT_CACHE_DIR, TeacherCache, TeacherOutputs, TeacherRunner,
                                      images_fingerprint, state_fingerprint)
from .errors import EdgekdError
from .export import Artifact, export  # noqa: F401  (api.export is the public entry point)
from .models import create_model, get_model_info
from .models.init import init_weights
from .targets import Target, load_target
from .train.checkpoint import file_sha256, load_model
from .train.distributed import barrier, init_distributed, shutdown
from .train.phases import Phase
from .train.trainer import Runtime, Trainer, make_runtime

DEFAULT_RESOLUTION = 32
DEFAULT_CHANNELS = 3


@dataclass(frozen=True)
class Resolved:
    """Everything a run derives from its config before training starts (all validated, nothing written)."""

    config: TrainConfig
    target: Target | None
    resolution: int
    channels: int
    model_options: dict[str, Any]


def resolve(config: TrainConfig) -> Resolved:
    target = load_target(config.target) if config.target else None
    resolution = config.resolution or (target.input.resolution if target else DEFAULT_RESOLUTION)
    channels = config.channels or (target.input.channels if target else DEFAULT_CHANNELS)
    model_options = dict(target.model_options) if target else {}
    METHODS.get(config.method)  # unknown method: fail before anything is loaded
    return Resolved(config, target, resolution, channels, model_options)


def build_student(config: TrainConfig, resolved: Resolved, num_classes: int) -> nn.Module:
    options = {**resolved.model_options, **config.student_options}
    if config.student_edit:
        options["edit"] = config.student_edit
    model = create_model(config.student, num_classes, in_chans=resolved.channels,
                         input_size=resolved.resolution, **options)
    return init_weights(model, config.student_init)


def _edited_teacher(teacher: nn.Module, spec: str) -> nn.Module:
    """The teacher with blocks deleted/inserted, keeping all its other weights (MLD's architecture edits)."""
    import copy

    from .models.edit import apply_edit

    student = apply_edit(copy.deepcopy(teacher), spec)
    student.model_config = {**{k: v for k, v in teacher.model_config.items() if k != "edit"}, "edit": spec}
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


AUTO_STUDENT = "auto"


def _auto_student(config: TrainConfig, resolved: Resolved, num_classes: int, console) -> tuple[TrainConfig, dict]:
    """--student auto: the zoo student with the most compute that fits the target at the run's resolution."""
    from .profile.select import Candidate, default_candidates, select as select_students

    if resolved.target is None:
        raise EdgekdError("--student auto chooses for a device: pass --target NAME (see `edgekd targets list`)")
    candidates = [Candidate(c.model, resolved.resolution) for c in default_candidates(resolved.target)
                  if c.resolution == resolved.resolution]
    result = select_students(resolved.target, candidates, num_classes)
    chosen = result.chosen
    if console is not None:
        console.print(f"--student auto: {result.reason}")
    options = {k: v for k, v in chosen["model_options"].items() if k not in resolved.model_options}
    config = config.replace(student=chosen["model"], student_options={**options, **config.student_options})
    return config, {"target": result.target, "chosen": chosen, "reason": result.reason, "candidates": result.rows}


def select(target: str | Target, candidates=None, *, sweep: str | None = None, resolutions=None,
           num_classes: int = 10):
    """Rank students for a target by estimated cost (see edgekd.profile.select); returns a Selection."""
    from .profile import select as sel

    target = load_target(target) if isinstance(target, str) else target
    chosen: list = []
    if sweep:
        chosen += sel.parse_sweep(sweep)
    if candidates:
        chosen += sel.candidates_from_specs(candidates, resolutions)
    if not chosen:
        chosen = sel.default_candidates(target) if not resolutions else [
            sel.Candidate(c.model, r) for c in sel.default_candidates(target) for r in resolutions
            if c.resolution == target.input.resolution]
    return sel.select(target, chosen, num_classes)


def profile(sources, targets=None, *, runners=None, resolution: int | None = None, out_dir="profiles",
            threads: int = 1, runs: int = 100, plot: bool = True, console=None) -> dict:
    """Profile each source on each target; writes profiles/<target>/*.json, report.md and report.png.

    Returns {target name: {"reports": [...], "json": [paths], "markdown": path, "plot": path}}."""
    from .profile import latency as lat
    from .profile import report as rep
    from .profile.profiler import check_runners, host_timings, profile_one, resolve_source

    if not sources:
        raise EdgekdError("nothing to profile: pass a run directory, an export bundle or NAME@RESOLUTION")
    check_runners(runners)
    resolved = [resolve_source(str(s), resolution) for s in sources]
    if not targets:
        run_targets = set()
        for s in resolved:
            config = (s.path / "config.yaml") if s.kind == "run" else None
            if config is not None and config.is_file() and TrainConfig.load(config).target:
                run_targets.add(TrainConfig.load(config).target)
        if not run_targets:
            raise EdgekdError("which device? pass --target NAME (see `edgekd targets list`); only runs trained with "
                              "--target carry one")
        targets = sorted(run_targets)
    target_objs = [load_target(t) if isinstance(t, str) else t for t in targets]
    peak = lat.host_peak_macs_per_s(threads) if runners != () else None
    timings = {}
    for s in resolved:  # host timings do not depend on the target: measure each source once
        if console is not None:
            console.print(f"profiling {s.label}: timing on this host")
        timings[s.label] = host_timings(s, runners, threads=threads, runs=runs)
    out = {}
    for target in target_objs:
        calibration = lat.reference_errors(target)  # how far the latency model is from published measurements
        reports = [profile_one(s, target, runners, threads=threads, runs=runs, host_peak=peak,
                               timings=timings[s.label]) for s in resolved]
        for r in reports:
            r["latency"]["calibration"] = calibration
        directory = Path(out_dir) / target.name
        paths = [rep.write_json(r, directory) for r in reports]
        markdown = directory / "report.md"
        markdown.write_text(rep.markdown_table(reports, target))
        png = rep.plot(reports, target, directory / "report.png") if plot else None
        out[target.name] = {"reports": reports, "json": paths, "markdown": markdown, "plot": png}
    return out


def is_checkpoint_source(source: str) -> bool:
    return source.endswith((".pt", ".pth")) or Path(source).is_dir() or "/" in source


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    console=None,
    on_step: Callable[[Trainer, int], None] | None = None,
) -> dict:
    """Train (teacher if needed, then student with `config.method`) into `config.run_dir`; returns the summary.

    With `resume=True` the run continues from its last checkpoint (its saved config is used as is).
    Under torchrun every process calls this; only rank 0 writes files.
    """
    run_dir = Path(config.run_dir)
    if resume:
        config = TrainConfig.load(run_dir / "config.yaml").replace(run_dir=str(run_dir))
    elif (run_dir / "config.yaml").exists():
        raise EdgekdError(f"{run_dir} already holds a run: resume it with --resume {run_dir} or choose another --run-dir")
    resolved = resolve(config)
    method_cls = METHODS.get(config.method)
    options = method_cls.Options.from_strings(config.method_options)
    method_cls.check_epochs(options, config.epochs)  # a multi-phase method's budget fails before the teacher trains
    if method_cls.requires_teacher and not config.teacher:
        raise EdgekdError(f"method '{config.method}' needs a teacher: pass --teacher MODEL_OR_CHECKPOINT (or --method ce)")

    started = time.time()
    runtime = make_runtime(config.device, config.amp, config.channels_last, init_distributed(
        config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())))
    dist = runtime.dist
    try:
        data = load_data(config.data, resolution=resolved.resolution, channels=resolved.channels,
                         seed=config.split_seed, val_fraction=config.val_fraction, limit=config.limit)
        num_classes = data.info.num_classes
        selection = None
        if config.student == AUTO_STUDENT:
            config, selection = _auto_student(config, resolved, num_classes, console if dist.is_main else None)
        torch.manual_seed(config.seed)
        loaded_teacher = _check_teacher(config, num_classes) if method_cls.requires_teacher or config.student_edit else None
        if config.student_edit:  # the student is the teacher's architecture (its weights come after the teacher)
            arch = loaded_teacher[1]["model_config"] if loaded_teacher else {"name": config.teacher, **config.teacher_options}
            config = config.replace(student=arch["name"], student_options={
                k: v for k, v in arch.items() if k not in ("name", "num_classes", "in_chans", "edit")})
        student = build_student(config, resolved, num_classes)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config.save(run_dir / "config.yaml")
            if selection is not None:
                (run_dir / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
        barrier(dist)

        teacher, teacher_info = None, None
        if method_cls.requires_teacher or config.student_edit:
            teacher, teacher_info = _prepare_teacher(config, resolved, data, runtime, loaded_teacher, console)
            teacher.input_size = resolved.resolution  # a loaded checkpoint does not know it
        if config.student_edit:
            student = _edited_teacher(teacher, config.student_edit)
            if not method_cls.requires_teacher:
                teacher = None
        distiller: Distiller = method_cls(student, teacher, options)
        phases = distiller.phases(config.epochs, config.optim)
        if console is not None and dist.is_main:
            extras = sum(p.numel() for p in distiller.extra_parameters())
            console.print(
                f"student {config.student} ({_count(student):,} params) <- method {config.method}"
                + (f" from teacher {teacher_info['name']}" if teacher_info else "")
                + (f"; method adds {extras:,} training-only params" if extras else "")
                + f"; {resolved.resolution}px x{resolved.channels}, data {data.info.name}, device {runtime.device}"
            )
        outputs, variants = None, 0
        if teacher is not None and (distiller.teacher_logits_only or distiller.teacher_taps):
            outputs, variants = _teacher_outputs(config, data, runtime, teacher, console, distiller.teacher_taps)
        elif teacher is not None and console is not None and dist.is_main:
            console.print(f"method {config.method} needs live teacher internals: the teacher runs every step (no cache)")
        trainer = _trainer(run_dir, data, runtime, config, console, on_step, outputs, variants)
        result = trainer.fit(phases, resume=resume)
        if dist.is_main:
            distiller.write_artifacts(run_dir)
        if outputs is not None and outputs.cache is not None:
            result["teacher_cache"] = outputs.cache.stats()
        summary = {
            "run_dir": str(run_dir),
            "student": student.model_config,
            "method": config.method,
            "method_options": options.__dict__,
            "method_extra_parameters": sum(p.numel() for p in distiller.extra_parameters()),
            "teacher": teacher_info,
            "target": resolved.target.name if resolved.target else None,
            "resolution": resolved.resolution,
            "channels": resolved.channels,
            "data": data.describe(),
            **result,
            "epochs": config.epochs,
            "global_batch": config.batch_size,
            "world_size": dist.world_size,
            "backend": dist.backend,
            "device": str(runtime.device),
            "amp": str(runtime.amp_dtype) if runtime.amp_dtype else None,
            "wall_seconds": time.time() - started,
            "checkpoint_sha256": file_sha256(run_dir / "best.pt"),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        if dist.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        shutdown(dist)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trainer(run_dir: Path, data: DataModule, runtime: Runtime, config: TrainConfig, console, on_step,
             teacher_outputs: TeacherOutputs | None = None, variants: int = 0) -> Trainer:
    return Trainer(run_dir, data, runtime, batch_size=config.batch_size, micro_batches=config.micro_batches,
                   augment=config.augment, seed=config.seed, checkpoint_interval_s=config.checkpoint_interval_s,
                   console=console, on_step=on_step, teacher_outputs=teacher_outputs, variants=variants,
                   bank_seed=config.split_seed)


def _teacher_outputs(config: TrainConfig, data: DataModule, runtime: Runtime, teacher: nn.Module,
                     console, taps: tuple[str, ...] = ()) -> tuple[TeacherOutputs, int]:
    """The fast teacher runner, plus the cache of its logits (and tapped features) unless it is off or (auto)
    over budget."""
    runner = TeacherRunner(teacher, runtime.device, fold_bn=config.teacher_fold_bn,
                           autocast=config.teacher_autocast, compile=config.teacher_compile, taps=taps)
    augmenting = config.augment and data.augment is not None
    variants = (config.teacher_cache_variants or config.epochs) if augmenting else 0
    if config.teacher_cache == "off":
        return TeacherOutputs(runner, None), variants
    key = {
        "teacher": state_fingerprint(teacher), "runner": runner.settings,
        "images": images_fingerprint(data.train), "data": data.describe(),
        "augment": {"pad": data.augment.pad, "hflip": data.augment.hflip} if augmenting else None,
        "variants": variants, "bank_seed": config.split_seed,
        "rank": runtime.dist.rank, "world_size": runtime.dist.world_size,
    }
    directory = None
    if config.teacher_cache == "disk":
        directory = Path(config.teacher_cache_dir).expanduser() if config.teacher_cache_dir else DEFAULT_CACHE_DIR
    budget = config.teacher_cache_budget_mb << 20
    row_shapes = runner.row_shapes((data.channels, data.resolution, data.resolution))
    width = sum(math.prod(shape) for shape in row_shapes)
    what = "logits" if not taps else f"logits and {len(taps)} feature map(s)"
    try:
        cache = TeacherCache(key, len(data.train), variants, width, directory=directory, memory_budget_bytes=budget)
    except EdgekdError as e:
        if config.teacher_cache != "auto":
            raise
        if console is not None and runtime.dist.is_main:
            console.print(f"teacher cache off, the teacher runs every step: {e}")
        return TeacherOutputs(runner, None), variants
    if console is not None and runtime.dist.is_main:
        where = f"on disk at {cache.directory}" if cache.directory else "in memory"
        console.print(f"teacher {what} cached {where} ({cache.nbytes / 2**20:.1f} MiB, "
                      f"{max(variants, 1)} augmentation variant(s) per image, {cache.warm_entries} entries warm)")
    return TeacherOutputs(runner, cache, row_shapes), variants


def _check_teacher(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict] | None:
    """Validates the teacher up front so a bad teacher fails before anything is written.

    Returns the loaded (model, payload) for a checkpoint source, None for a zoo model still to be trained.
    """
    source = config.teacher
    if is_checkpoint_source(source):
        return load_model(Path(source), num_classes=num_classes)  # class count and architecture checked here
    info = get_model_info(source)  # unknown model: did-you-mean error
    if config.teacher_epochs == 0:
        raise EdgekdError(f"teacher '{source}' would be untrained: set --teacher-epochs > 0 or pass a trained checkpoint")
    if config.teacher_pretrained and not info.pretrained_available:
        raise EdgekdError(f"no offline pretrained weights for '{source}': use --teacher efficientnet_lite0 or drop --teacher-pretrained")
    return None


def _prepare_teacher(config: TrainConfig, resolved: Resolved, data: DataModule, runtime: Runtime,
                     loaded: tuple[nn.Module, dict] | None, console) -> tuple[nn.Module, dict]:
    source = config.teacher
    if loaded is not None:
        teacher, payload = loaded
        path = Path(source) / "best.pt" if Path(source).is_dir() else Path(source)
        info = {"name": payload["model_config"]["name"], "source": source,
                "test_acc": payload.get("metrics", {}).get("test_acc"), "checkpoint_sha256": file_sha256(path)}
        _warn_normalisation(payload.get("data", {}), data, console)
        return teacher, info
    teacher_dir = Path(config.run_dir) / "teacher"
    summary_path = teacher_dir / "summary.json"
    if summary_path.exists():
        teacher, _ = load_model(teacher_dir, num_classes=data.info.num_classes)
        return teacher, json.loads(summary_path.read_text())
    # the target's model options make the student deployable; the teacher is never deployed, so it keeps its own
    torch.manual_seed(config.seed)
    teacher = create_model(source, data.info.num_classes, in_chans=resolved.channels, input_size=resolved.resolution,
                           pretrained=config.teacher_pretrained, **config.teacher_options)
    if console is not None and runtime.dist.is_main:
        console.print(f"training teacher {source} ({_count(teacher):,} params) for {config.teacher_epochs} epochs")
    ce = METHODS.get("ce")(teacher, None, METHODS.get("ce").Options())
    phase = Phase("teacher", config.teacher_epochs, ce, list(teacher.parameters()), config.teacher_optim)
    trainer = _trainer(teacher_dir, data, runtime, config, console, None)
    result = trainer.fit([phase], resume=(teacher_dir / "last.pt").exists())
    info = {"name": source, "source": "trained in this run", "pretrained": config.teacher_pretrained,
            "model_config": teacher.model_config, **result}
    if runtime.dist.is_main:
        summary_path.write_text(json.dumps(info, indent=2) + "\n")
    barrier(runtime.dist)
    teacher, _ = load_model(teacher_dir, num_classes=data.info.num_classes)  # the best epoch, not the last
    return teacher, info


def _warn_normalisation(teacher_data: dict, data: DataModule, console) -> None:
    if console is None or not teacher_data:
        return
    if teacher_data.get("mean") and list(teacher_data["mean"]) != list(data.mean):
        console.print(f"[yellow]note: the teacher was trained with input mean {teacher_data['mean']}, this run uses {list(data.mean)}[/]")


def list_methods() -> list[tuple[str, str, bool]]:
    return [(name, METHODS.get(name).description, METHODS.get(name).requires_teacher) for name in METHODS.names()]
