"""The Python API the CLI is a thin layer over; notebook users call these directly."""
from __future__ import annotations

import dataclasses
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
from .data.imageset import ConcatImageSet
from .distill import METHODS, Distiller, takes_only_logits
from .distill.phase import Phase
from .distill.step import LOGITS, combined_needs
from .distill.teacher_outputs import (TEACHER_BATCH, TEACHER_CACHE_DIR, TeacherCache, TeacherOutputs, TeacherRunner,
                                      images_fingerprint, state_fingerprint)
from .distributed import barrier, init_distributed, shutdown
from .errors import EdgekdError
from .export.pipeline import Artifact, export  # noqa: F401  (api.export is the public entry point)
from .quantize.run import quantize  # noqa: F401  (api.quantize is the public entry point)
from .models import classifier_parameters, create_model, get_model_info
from .models.init import init_weights
from .targets import Target, load_target
from .train.checkpoint import file_sha256, load_model
from .train.trainer import Runtime, Trainer, TrainViews, make_runtime

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
    teacher_resolution: int  # == resolution unless --teacher-resolution asks for more


def resolve(config: TrainConfig) -> Resolved:
    target = load_target(config.target) if config.target else None
    resolution = config.resolution or (target.input.resolution if target else DEFAULT_RESOLUTION)
    channels = config.channels or (target.input.channels if target else DEFAULT_CHANNELS)
    model_options = dict(target.model_options) if target else {}
    method = METHODS.get(config.method)  # unknown method: fail before anything is loaded
    teacher_resolution = config.teacher_resolution or resolution
    if teacher_resolution < resolution:
        raise EdgekdError(f"--teacher-resolution {teacher_resolution} is below the student's {resolution} px: the "
                          "teacher's view is resized down to the student's, so pass a value >= "
                          f"{resolution} (or leave it out)")
    # methods whose every phase takes only the logits say so at class level (teacher_needs = LOGITS)
    if teacher_resolution != resolution and (method.teacher_needs != LOGITS or config.student_edit):
        logit_methods = [name for name in METHODS.names() if takes_only_logits(name)]
        raise EdgekdError(f"--teacher-resolution needs a method that takes only the teacher's logits "
                          f"({', '.join(logit_methods)}); '{config.method}' taps teacher features at the student's "
                          "resolution")
    mixing = config.mix is not None
    handling = [name for name in METHODS.names() if METHODS.get(name).handles_mixed_labels]
    if (mixing or config.unlabeled) and not method.handles_mixed_labels:
        what = "--mixup/--cutmix" if mixing else "--unlabeled"
        raise EdgekdError(f"method '{config.method}' does not handle {what}: use one of {', '.join(handling)}")
    if config.unlabeled and not method.requires_teacher:
        with_teacher = [name for name in handling if METHODS.get(name).requires_teacher]
        raise EdgekdError(f"--unlabeled images are learned from a teacher, and method '{config.method}' has none: "
                          f"use one of {', '.join(with_teacher)}")
    return Resolved(config, target, resolution, channels, model_options, teacher_resolution)


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
            threads: int = 1, runs: int = 100, plot: bool = True, console=None, device=None) -> dict:
    """Profile each source on each target; writes profiles/<target>/*.json, report.md and report.png.

    `device` (a profile.device.DeviceRequest): also measure each source's export on a device (an edgekd agent or
    a board's serial port) for the one target, and with `calibrate` refit the target's latency coefficients.
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
    measured, calibrated = _measure_on_device(resolved, target_objs, device, console)
    if calibrated is not None:
        target_objs = [calibrated.pop("target_obj")]
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
        for s_, r in zip(resolved, reports):
            r["latency"]["calibration"] = calibration
            if s_.label in measured:
                from .profile.device import attach

                attach(r, measured[s_.label], target.latency_budget_ms)
            if calibrated is not None:
                r["latency"]["calibrated"] = calibrated
        directory = Path(out_dir) / target.name
        paths = [rep.write_json(r, directory) for r in reports]
        markdown = directory / "report.md"
        markdown.write_text(rep.markdown_table(reports, target))
        png = rep.plot(reports, target, directory / "report.png") if plot else None
        out[target.name] = {"reports": reports, "json": paths, "markdown": markdown, "plot": png}
    return out


def _measure_on_device(resolved, target_objs, device, console) -> tuple[dict, dict | None]:
    """({source label: measurement}, the calibration's old/new coefficients or None) for `profile(device=...)`."""
    if device is None:
        return {}, None
    from .profile.calibrate import calibrate, check_measurement, measured_reference
    from .profile.device import measure_source

    device.check()
    if len(target_objs) != 1:
        raise EdgekdError("measuring on a device profiles one target: pass --target NAME (the device's)")
    target = target_objs[0]
    measured = {}
    for s in resolved:
        if console is not None:
            where = device.url or device.port
            console.print(f"profiling {s.label}: measuring its {target.name} export on {where}")
        measured[s.label] = m = measure_source(s, target, device)
        if console is not None and not m["agreement"]["agrees"]:
            console.print(f"warning: {s.label}: the device's outputs differ from this host's "
                          f"({m['agreement']['criterion']}: top-1 {m['agreement']['top1_match']}/{m['agreement']['inputs']}, "
                          f"max difference {m['agreement']['max_abs_diff' if 'max_abs_diff' in m['agreement'] else 'max_abs_diff_lsb']:.3g})")
    if not device.calibrate:
        return measured, None
    references = []
    for s in resolved:
        check_measurement(target, s.label, measured[s.label])
        config = (s.manifest or {}).get("source", {}).get("model") or s.model.model_config
        references.append(measured_reference(target, config, s.resolution, measured[s.label]))
    reason = (f"edgekd profile --calibrate: {len(references)} measurement(s) on "
              f"{next(iter(measured.values())).get('device', {}).get('model') or 'the device'}")
    return measured, calibrate(target, references, reason)


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
    config, resolved, method_cls, options = _validated(config, resume)
    started = time.time()
    runtime = _runtime(config)
    try:
        run = _build(config, resolved, method_cls, options, runtime, console)
        outputs, variants, views = _teacher_views(run, runtime, console)
        trainer = _trainer(Path(run.config.run_dir), run.data, runtime, run.config, console, on_step, outputs,
                           variants, views)
        result = trainer.fit(run.phases, resume=resume)
        if runtime.dist.is_main:
            run.distiller.write_artifacts(Path(run.config.run_dir))
        if outputs is not None and outputs.cache is not None:
            result["teacher_cache"] = outputs.cache.stats()
        return _summarise(run, runtime, result, started, console)
    finally:
        shutdown(runtime.dist)


@dataclass
class _Run:
    """What `train` builds before the trainer starts."""

    config: TrainConfig  # as resolved (an auto or edited student filled in)
    resolved: Resolved
    options: Any  # the method's options
    data: DataModule
    teacher_data: DataModule | None  # the same splits at the teacher's resolution, when it differs
    student: nn.Module
    teacher: nn.Module | None
    teacher_info: dict | None
    distiller: Distiller
    phases: list[Phase]


def _validated(config: TrainConfig, resume: bool):
    """Everything that can be checked before anything loads or is written."""
    run_dir = Path(config.run_dir)
    if resume:
        config = TrainConfig.load(run_dir / "config.yaml").replace(run_dir=str(run_dir))
    elif (run_dir / "config.yaml").exists():
        raise EdgekdError(f"{run_dir} already holds a run: resume it with --resume {run_dir} or choose another --run-dir")
    resolved = resolve(config)
    method_cls = METHODS.get(config.method)
    options = method_cls.Options.from_strings(config.method_options, config.method)
    method_cls.check_epochs(options, config.epochs)  # a multi-phase method's budget fails before the teacher trains
    if method_cls.requires_teacher and not config.teacher:
        raise EdgekdError(f"method '{config.method}' needs a teacher: pass --teacher MODEL_OR_CHECKPOINT (or --method ce)")
    return config, resolved, method_cls, options


def _runtime(config: TrainConfig) -> Runtime:
    return make_runtime(config.device, config.amp, config.channels_last, init_distributed(
        config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())))


def _build(config: TrainConfig, resolved: Resolved, method_cls, options, runtime: Runtime, console) -> _Run:
    """Data, student and teacher (trained here if it must be), the distiller; writes config.yaml."""
    dist = runtime.dist
    run_dir = Path(config.run_dir)
    data = _load(config, resolved.resolution, resolved.channels)
    # the same splits at the teacher's resolution: the teacher trains there and sees that view of every image
    teacher_data = (_load(config, resolved.teacher_resolution, resolved.channels)
                    if resolved.teacher_resolution != resolved.resolution else None)
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
        if data.skipped:
            _report_skipped(run_dir, data, console)
        if selection is not None:
            (run_dir / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
    barrier(dist)

    teacher, teacher_info = None, None
    if method_cls.requires_teacher or config.student_edit:
        teacher, teacher_info = _prepare_teacher(config, resolved, teacher_data or data, runtime, loaded_teacher,
                                                 console)
        if console is not None and dist.is_main and teacher_info.get("test_acc") is not None:
            console.print(f"teacher {teacher_info['name']} at {resolved.teacher_resolution} px: test accuracy "
                          f"{100 * teacher_info['test_acc']:.2f}%")
        teacher.input_size = resolved.teacher_resolution  # a loaded checkpoint does not know it
    if config.student_edit:
        student = _edited_teacher(teacher, config.student_edit)
        if not method_cls.requires_teacher:
            teacher = None
    distiller: Distiller = method_cls(student, teacher, options)
    phases = distiller.phases(config.epochs, config.optim)  # may add the method's modules: before counting them
    if console is not None and dist.is_main:
        extras = sum(p.numel() for p in distiller.extra_parameters())
        console.print(
            f"student {config.student} ({_count(student):,} params) <- method {config.method}"
            + (f" from teacher {teacher_info['name']}" if teacher_info else "")
            + (f"; method adds {extras:,} training-only params" if extras else "")
            + f"; {resolved.resolution}px x{resolved.channels}, data {data.info.name}, device {runtime.device}"
        )
    return _Run(config, resolved, options, data, teacher_data, student, teacher, teacher_info, distiller, phases)


def _teacher_views(run: _Run, runtime: Runtime, console) -> tuple[TeacherOutputs | None, int, TrainViews]:
    """The teacher outputs the trainer serves (cache + fast runner) and how the student's batches are made."""
    config, teacher = run.config, run.teacher
    views = TrainViews(randaug=config.randaug, mix=config.mix, with_unlabeled=run.data.unlabeled is not None)
    served = [p for p in run.phases if p.distiller.teacher_needs is not None]
    say = console is not None and runtime.dist.is_main
    if teacher is not None and served:
        if run.teacher_data is not None:
            views = dataclasses.replace(views, teacher_data=run.teacher_data,
                                        teacher_norm=_teacher_normalisation(run.teacher_info, run.teacher_data))
        needs = combined_needs(p.distiller.teacher_needs for p in served)
        outputs, variants = _teacher_outputs(config, run.teacher_data or run.data, runtime, teacher, console,
                                             max(p.epochs for p in served), needs.taps, views, run.resolved)
        live = [p.name for p in run.phases if p.distiller.teacher_needs is None and p.distiller.uses_teacher]
        if live and say:
            console.print(f"method {config.method}: phase(s) {', '.join(live)} run the teacher live (no cache)")
        return outputs, variants, views
    if teacher is not None and say:
        console.print(f"method {config.method} needs live teacher internals: the teacher runs every step (no cache)")
    return None, 0, views


def _summarise(run: _Run, runtime: Runtime, result: dict, started: float, console) -> dict:
    """summary.json: what was trained, how, and how well (written by the main process)."""
    dist, resolved, run_dir = runtime.dist, run.resolved, Path(run.config.run_dir)
    warnings = _teacher_warnings(run.teacher_info, result)
    if warnings and console is not None and dist.is_main:
        for line in warnings:
            console.print(f"[yellow]warning: {line}[/]")
    summary = {
        "run_dir": str(run_dir),
        "student": run.student.model_config,
        "method": run.config.method,
        "method_options": run.options.__dict__,
        "method_extra_parameters": sum(p.numel() for p in run.distiller.extra_parameters()),
        "teacher": run.teacher_info,
        **({"warnings": warnings} if warnings else {}),
        "target": resolved.target.name if resolved.target else None,
        "resolution": resolved.resolution,
        "teacher_resolution": resolved.teacher_resolution if run.teacher is not None else None,
        "channels": resolved.channels,
        "data": run.data.describe(),
        "skipped_files": len(run.data.skipped),
        **result,
        "epochs": run.config.epochs,
        "global_batch": run.config.batch_size,
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


SKIPPED_FILES = "skipped-files.txt"


def _report_skipped(run_dir: Path, data: DataModule, console) -> None:
    """Unreadable image files the data left out: listed in the run directory, announced in one warning line."""
    (run_dir / SKIPPED_FILES).write_text("".join(f"{path}\t{reason}\n" for path, reason in data.skipped))
    if console is not None:
        console.print(f"[yellow]warning: skipped {len(data.skipped)} unreadable image file(s) of {data.spec}, "
                      f"listed in {run_dir / SKIPPED_FILES} (--strict-data stops at them instead)[/]")


def train_teacher(config: TrainConfig, *, console=None) -> dict:
    """Train (or fine-tune, with `teacher_pretrained`) the config's zoo teacher into `run_dir/teacher` at the
    teacher's resolution, without training a student; resumes an interrupted one. Returns its summary, which
    student runs reuse with `--teacher RUN_DIR/teacher` (and the same `--teacher-resolution`)."""
    if not config.teacher or is_checkpoint_source(config.teacher):
        raise EdgekdError(f"train_teacher trains a zoo teacher; got '{config.teacher}' (see `edgekd models`)")
    resolved = resolve(config)
    runtime = _runtime(config)
    try:
        data = _load(config, resolved.teacher_resolution, resolved.channels)
        _check_teacher(config, data.info.num_classes)
        _, info = _prepare_teacher(config, resolved, data, runtime, None, console)
        return info
    finally:
        shutdown(runtime.dist)


def fill_teacher_outputs(config: TrainConfig, *, console=None, batch_size: int = 256) -> dict:
    """Run the config's trained teacher once over every (training image, augmentation variant) that a student run
    with this config asks for, into its disk cache, so that the runs sharing the cache never run the teacher.

    The cache key does not depend on the student, so any config with the same data, teacher, augmentation and
    variant count (and the same student resolution) hits it. Resumable: filled entries are kept (flushed every
    30 s). Returns the cache's stats."""
    if config.teacher_cache != "disk" or not config.teacher or not is_checkpoint_source(config.teacher):
        raise EdgekdError("fill_teacher_outputs needs a trained teacher checkpoint and teacher_cache: disk")
    resolved = resolve(config)
    if not takes_only_logits(config.method):
        raise EdgekdError(f"method '{config.method}' runs its teacher live: there are no teacher outputs to cache")
    runtime = _runtime(config)
    try:
        data = _load(config, resolved.resolution, resolved.channels)
        teacher_data = (_load(config, resolved.teacher_resolution, resolved.channels)
                        if resolved.teacher_resolution != resolved.resolution else None)
        loaded = _check_teacher(config, data.info.num_classes)
        teacher, info = _prepare_teacher(config, resolved, teacher_data or data, runtime, loaded, console)
        teacher.input_size = resolved.teacher_resolution
        views = TrainViews(randaug=config.randaug, mix=config.mix, with_unlabeled=data.unlabeled is not None)
        if teacher_data is not None:
            views = dataclasses.replace(views, teacher_data=teacher_data,
                                        teacher_norm=_teacher_normalisation(info, teacher_data))
        outputs, variants = _teacher_outputs(config, teacher_data or data, runtime, teacher, console, config.epochs,
                                             views=views, resolved=resolved)
        cache = outputs.cache
        source = teacher_data or data
        # the loader Trainer._train_loader builds (same bank of views), walked in order instead of shuffled
        loader = source.loader("train", batch_size, shuffle=False, augment=config.augment, variants=variants,
                               bank_seed=config.split_seed, randaug=views.randaug if config.augment else None,
                               mix=views.mix if config.augment else None, with_unlabeled=views.with_unlabeled,
                               resolution=data.resolution if teacher_data is not None else None,
                               mean=data.mean if teacher_data is not None else None,
                               std=data.std if teacher_data is not None else None, teacher_norm=views.teacher_norm)
        n, last_flush = len(loader.images), time.monotonic()
        for variant in range(max(variants, 1)):
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(start + batch_size, n))
                if bool(cache.filled[idx.numpy(), variant].all()):
                    continue  # filled by an earlier, interrupted fill
                batch = loader.make_batch(idx, torch.full_like(idx, variant))
                outputs.logits(lambda: batch.teacher_x if batch.teacher_view is not None else batch.x, idx,
                               torch.full_like(idx, variant))
                if time.monotonic() - last_flush > 30:
                    cache.flush()
                    last_flush = time.monotonic()
        cache.flush()
        return cache.stats()
    finally:
        shutdown(runtime.dist)


def run(*, target: str = "cortex-m7", data: str = "fashion-mnist", teacher: str | None = None,
        candidates: int | list[str] = 3, resolution: int | None = None, limit: int | None = None,
        epochs: int | None = None, teacher_epochs: int | None = None, method: str | None = None,
        seed: int = 0, budget_minutes: float | None = None, workers: int = 1, ray_address: str | None = None,
        threads: int | None = None, out_dir: str | Path | None = None, console=None) -> dict:
    """Data to the recommended firmware-ready student (`edgekd run`): teacher, candidates from `select`, each
    distilled, exported, verified and profiled (sequentially or as Ray tasks), one report. Resumable: the same
    call on the same `out_dir` skips finished stages. Returns the report (also in OUT/report.json). Defaults
    of the recipe: edgekd.run.RECIPE. See edgekd/run.py."""
    from .run import RunSpec, Stages, execute

    spec = RunSpec.make(target=target, data=data, teacher=teacher, candidates=candidates, resolution=resolution,
                        limit=limit, epochs=epochs, teacher_epochs=teacher_epochs, method=method, seed=seed,
                        out_dir=out_dir)
    stages = Stages(train=train, train_teacher=train_teacher, fill_teacher_outputs=fill_teacher_outputs)
    return execute(spec, stages, budget_minutes=budget_minutes, workers=workers, ray_address=ray_address,
                   threads=threads, console=console)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _load(config: TrainConfig, resolution: int, channels: int) -> DataModule:
    return load_data(config.data, resolution=resolution, channels=channels, seed=config.split_seed,
                     val_fraction=config.val_fraction, limit=config.limit,
                     labels_per_class=config.labels_per_class, unlabeled=config.unlabeled, strict=config.strict_data)


# a teacher less than this many points above its student is not worth distilling from (it caps the student)
TEACHER_MARGIN_POINTS = 1.0


def _teacher_warnings(teacher_info: dict | None, result: dict) -> list[str]:
    """Tell the user when the teacher is no better than the student it taught."""
    teacher_acc = (teacher_info or {}).get("test_acc")
    if teacher_acc is None or result.get("test_acc") is None:
        return []
    gap = 100 * (teacher_acc - result["test_acc"])
    if gap >= TEACHER_MARGIN_POINTS:
        return []
    return [f"the teacher ({100 * teacher_acc:.2f}% test accuracy) is only {gap:+.2f} points above the student "
            f"({100 * result['test_acc']:.2f}%): it is not clearly better, so distillation caps the student near it. "
            "Train it longer, start it from pretrained weights (--teacher efficientnet_lite0 --teacher-pretrained) "
            "or at a higher --teacher-resolution, and compare with --method ce"]


def _teacher_normalisation(teacher_info: dict, teacher_data: DataModule) -> tuple[tuple, tuple]:
    """The input normalisation the teacher was trained with: its checkpoint's, else its data's."""
    recorded = (teacher_info or {}).get("data") or {}
    if recorded.get("mean") and recorded.get("std"):
        return tuple(recorded["mean"]), tuple(recorded["std"])
    return teacher_data.mean, teacher_data.std


def _trainer(run_dir: Path, data: DataModule, runtime: Runtime, config: TrainConfig, console, on_step,
             teacher_outputs: TeacherOutputs | None = None, variants: int = 0,
             views: TrainViews | None = None) -> Trainer:
    return Trainer(run_dir, data, runtime, batch_size=config.batch_size, micro_batches=config.micro_batches,
                   augment=config.augment, seed=config.seed, checkpoint_interval_s=config.checkpoint_interval_s,
                   console=console, on_step=on_step, teacher_outputs=teacher_outputs, variants=variants,
                   bank_seed=config.split_seed, views=views)


def _teacher_outputs(config: TrainConfig, data: DataModule, runtime: Runtime, teacher: nn.Module,
                     console, epochs: int, taps: tuple = (), views: TrainViews | None = None,
                     resolved: Resolved | None = None) -> tuple[TeacherOutputs, int]:
    """The fast teacher runner, plus the cache of its logits (and tapped features) unless it is off or (auto)
    over budget. `data` holds the images the teacher sees (at its resolution); `epochs`, of the longest phase it
    serves, is the default number of augmentation variants kept per image."""
    runner = TeacherRunner(teacher, runtime.device, fold_bn=config.teacher_fold_bn,
                           autocast=config.teacher_autocast, compile=config.teacher_compile, taps=taps)
    augmenting = config.augment and data.augment is not None
    variants = (config.teacher_cache_variants or epochs) if augmenting else 0
    # the teacher's fixed batch (TeacherOutputs): small, so a training batch with a few misses (the images an
    # epoch's dropped last batch left out) pays for 16 teacher images, not a whole batch
    chunk = min(TEACHER_BATCH, max(1, config.batch_size // runtime.dist.world_size))
    if config.teacher_cache == "off":  # no bank to serve: a fresh view every epoch, as a run without teacher gets
        return TeacherOutputs(runner, None, chunk=chunk), 0
    views = views or TrainViews()
    train_images = data.train if not views.with_unlabeled else ConcatImageSet([data.train, data.unlabeled])
    key = {
        "teacher": state_fingerprint(teacher), "runner": runner.settings,
        "images": images_fingerprint(train_images), "data": data.describe(),
        "augment": {"pad": data.augment.pad, "hflip": data.augment.hflip} if augmenting else None,
        "variants": variants, "bank_seed": config.split_seed,
        "rank": runtime.dist.rank, "world_size": runtime.dist.world_size,
    }
    if augmenting and (views.randaug or views.mix):  # the bank's views (mix partner and lambda included)
        key["policy"] = {"randaug": dataclasses.asdict(views.randaug) if views.randaug else None,
                         "mix": dataclasses.asdict(views.mix) if views.mix else None}
    if resolved is not None and resolved.teacher_resolution != resolved.resolution:
        key["resolutions"] = {"teacher": resolved.teacher_resolution, "student": resolved.resolution,
                              "teacher_norm": [list(v) for v in views.teacher_norm]}
    disk = Path(config.teacher_cache_dir).expanduser() if config.teacher_cache_dir else TEACHER_CACHE_DIR
    budget = config.teacher_cache_budget_mb << 20
    row_shapes = runner.row_shapes((data.channels, data.resolution, data.resolution))
    width = sum(math.prod(shape) for shape in row_shapes)
    what = "logits" if not taps else f"logits and {len(taps)} feature map(s)"
    # auto: memory within the budget, else memory-mapped on disk when it has room, else live
    places = {"memory": [None], "disk": [disk], "auto": [None, disk]}[config.teacher_cache]
    for place in places:
        try:
            cache = TeacherCache(key, len(train_images), variants, width, directory=place, memory_budget_bytes=budget,
                                 dtype=config.teacher_cache_dtype)
            break
        except EdgekdError as e:
            if config.teacher_cache != "auto":
                raise
            reason = e
    else:
        if console is not None and runtime.dist.is_main:
            console.print(f"teacher cache off, the teacher runs every step: {reason}")
        return TeacherOutputs(runner, None, chunk=chunk), 0
    if console is not None and runtime.dist.is_main:
        where = f"on disk at {cache.directory}" if cache.directory else "in memory"
        console.print(f"teacher {what} cached {where} ({cache.nbytes / 2**20:.1f} MiB {cache.dtype}, "
                      f"{max(variants, 1)} augmentation variant(s) per image, {cache.warm_entries} entries warm)")
    return TeacherOutputs(runner, cache, row_shapes, chunk=chunk), variants


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
        recorded = payload.get("data", {})
        info = {"name": payload["model_config"]["name"], "source": source,
                "test_acc": payload.get("metrics", {}).get("test_acc"), "checkpoint_sha256": file_sha256(path),
                "data": {k: recorded[k] for k in ("mean", "std", "resolution") if k in recorded}}
        # a run's best.pt (given as the run or as the file) is the model its summary measured; last.pt is not
        summary = path.parent / "summary.json"
        if info["test_acc"] is None and path.name == "best.pt" and summary.exists():
            info["test_acc"] = json.loads(summary.read_text()).get("test_acc")
        _warn_normalisation(recorded, data, console)
        if console is not None and recorded.get("resolution") not in (None, data.resolution):
            console.print(f"[yellow]note: the teacher was trained at {recorded['resolution']} px and is queried at "
                          f"{data.resolution} px here; pass --teacher-resolution {recorded['resolution']}[/]")
        return teacher, info
    teacher_dir = Path(config.run_dir) / "teacher"
    summary_path = teacher_dir / "summary.json"
    if summary_path.exists():
        teacher, _ = load_model(teacher_dir, num_classes=data.info.num_classes)
        return teacher, json.loads(summary_path.read_text())
    # the target's model options make the student deployable; the teacher is never deployed, so it keeps its own
    torch.manual_seed(config.seed)
    teacher = create_model(source, data.info.num_classes, in_chans=resolved.channels, input_size=data.resolution,
                           pretrained=config.teacher_pretrained, **config.teacher_options)
    if console is not None and runtime.dist.is_main:
        console.print(f"training teacher {source} ({_count(teacher):,} params) for {config.teacher_epochs} epochs")
    ce = METHODS.get("ce")(teacher, None, METHODS.get("ce").Options())
    phase = Phase("teacher", config.teacher_epochs, ce, list(teacher.parameters()), config.teacher_optim,
                  head=classifier_parameters(teacher))
    trainer = _trainer(teacher_dir, data, runtime, config, console, None)
    result = trainer.fit([phase], resume=(teacher_dir / "last.pt").exists())
    epochs = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines() if line]
    info = {"name": source, "source": "trained in this run", "pretrained": config.teacher_pretrained,
            "model_config": teacher.model_config, "resolution": data.resolution,
            "train_seconds": sum(e.get("train_seconds") or 0.0 for e in epochs), **result}
    if runtime.dist.is_main:
        summary_path.write_text(json.dumps(info, indent=2) + "\n")
    barrier(runtime.dist)
    teacher, _ = load_model(teacher_dir, num_classes=data.info.num_classes)  # the best epoch, not the last
    return teacher, info


def _warn_normalisation(teacher_data: dict, data: DataModule, console) -> None:
    if console is None or not teacher_data:
        return
    recorded = teacher_data.get("mean")
    if recorded and (len(recorded) != len(data.mean)
                     or any(abs(a - b) > 1e-5 for a, b in zip(recorded, data.mean))):  # describe() rounds to 6 digits
        console.print(f"[yellow]note: the teacher was trained with input mean {teacher_data['mean']}, this run uses {list(data.mean)}[/]")


def list_methods() -> list[tuple[str, str, bool]]:
    return [(name, METHODS.get(name).description, METHODS.get(name).requires_teacher) for name in METHODS.names()]
