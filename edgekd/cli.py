"""Command line: parse, call edgekd.api, print. No logic lives here."""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .agent import protocol
from .errors import EdgekdError
from .export.formats import FORMATS, PRECISIONS, QUANTIZERS
from .quantize import config as qconfig  # QuantizeConfig's defaults and choices
from .run import DEFAULT_TEACHER, RECIPE


def _console():
    from rich.console import Console

    # piped output (logs, CI) gets a wide console so tables are never truncated to 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def friendly_errors(fn):
    """Bad input ends in one line naming the problem and the fix, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .train.trainer import TrainingInterrupted

        try:
            return fn(*args, **kwargs)
        except EdgekdError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except TrainingInterrupted as e:
            click.echo(str(e), err=True)
            sys.exit(130)

    return wrapper


def _key_values(items: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgekdError(f"{flag} expects KEY=VALUE, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def _typed(values: dict[str, str]) -> dict:
    """Model options from the command line: YAML scalars (true, 0.5, 3) become typed values."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in values.items()}


def _comma_list(ctx, param, values):
    """List options are one comma-separated value; a repeated one would silently keep only its last use."""
    if len(values) > 1:
        raise click.BadParameter(f"give the list once, comma-separated: {param.opts[0]} {','.join(values)}")
    return values[0] if values else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgekd")
def main():
    """edgekd: distill tiny image classifiers for edge devices.

    \b
    Examples:
      edgekd train --target cortex-m7 --data fashion-mnist --epochs 10
      edgekd export runs/mobilenetv3_small_050-kd --target cortex-m7
      edgekd profile runs/mobilenetv3_small_050-kd
      edgekd run --target cortex-m7 --data fashion-mnist --resolution 32 --limit 10000
    """


@main.command()
@click.option("--target", help="Device target (see `edgekd targets list`): sets resolution, channels, model options (none given: no target).")
@click.option("--data", help="fashion-mnist[:DIR] | digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | idx:DIR")
@click.option("--student", help="Student architecture (see `edgekd models`), or 'auto' to pick the largest that fits --target.")
@click.option("--student-edit", help="Make the student from the teacher with blocks deleted/inserted, e.g. 'delete:3,5;insert:7' (docs/methods.md, mld; none given: --student).")
@click.option("--student-init", metavar="SCHEME", help="Re-initialise the student: xavier | normal:MEAN,STD | constant:VALUE (robustness experiments).")
@click.option("--student-opt", "student_opts", multiple=True, metavar="KEY=VALUE", help="Student model option, e.g. dropout=0.1 (none given: the target's, else the model's defaults).")
@click.option("--teacher", help="Teacher: a zoo model (trained first), a checkpoint .pt or a run directory; 'none' for no teacher.")
@click.option("--teacher-pretrained/--no-teacher-pretrained", default=None, help="Start the teacher from offline ImageNet weights (efficientnet_lite0).")
@click.option("--teacher-epochs", type=int, help="Epochs to train a zoo teacher on the data.")
@click.option("--teacher-resolution", type=int, metavar="PX",
              help="Train and query the teacher at this resolution (>= the student's; none given: the student's); the student gets the same augmented view resized.")
@click.option("--teacher-lr", type=float, help="Peak learning rate of the teacher's training.")
@click.option("--teacher-body-lr-scale", type=float, metavar="S",
              help="Fine-tuning: the teacher's body (all but the classifier) trains at S x its lr (0 < S <= 1).")
@click.option("--teacher-cache", type=click.Choice(["auto", "memory", "disk", "off"]),
              help="Reuse teacher outputs per (image, augmentation variant): logits for KD-style methods, also feature maps for AT/NST/FitNets/AB/FSP/RKD; auto: memory, else disk, else live.")
@click.option("--teacher-cache-dtype", type=click.Choice(["float32", "float16"]),
              help="Storage of cached teacher outputs (float16: half the bytes; served as float32).")
@click.option("--teacher-cache-variants", type=int, metavar="K",
              help="Keep K augmentations per image (FKD-style); the teacher then runs only in the first K epochs. 0: one per epoch. Ignored when no cache is kept (fresh views every epoch).")
@click.option("--teacher-cache-dir", help="Where disk caches live (none given: ~/.cache/edgekd/teacher-outputs, or under $EDGEKD_CACHE_DIR).")
@click.option("--teacher-autocast", type=click.Choice(["off", "bf16", "fp16"]), help="Teacher inference precision.")
@click.option("--method", help="Distillation method (see `edgekd methods`).")
@click.option("--opt", "method_opts", multiple=True, metavar="KEY=VALUE", help="Method option, e.g. temperature=4 alpha=0.9 label_smoothing=0.1 (none given: the defaults in `edgekd methods`).")
@click.option("--epochs", type=int, help="Student training epochs.")
@click.option("--batch-size", type=int, help="Global batch size (split across processes under torchrun).")
@click.option("--micro-batches", type=int, help="Split each batch into this many forward passes (gradient accumulation).")
@click.option("--lr", type=float, help="Peak learning rate of the student phase(s).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="Optimizer of the student phase(s).")
@click.option("--weight-decay", type=float, help="Weight decay of the student phase(s) (not on biases and norms).")
@click.option("--warmup-epochs", type=float, help="Linear learning-rate warm-up, in epochs, before the cosine decay.")
@click.option("--grad-clip", type=float, help="Clip the global gradient norm (0: off).")
@click.option("--resolution", type=int, help="Input size in pixels (default: the target's, else 32).")
@click.option("--channels", type=click.IntRange(1, 3), help="Input channels, 1 or 3 (default: the target's, else 3).")
@click.option("--limit", type=int, help="Use at most this many training images (quick runs; none given: all).")
@click.option("--strict-data/--no-strict-data", default=None,
              help="Stop at an unreadable image file instead of skipping it (skipped files are listed in the run).")
@click.option("--augment/--no-augment", default=None, help="Random crop/flip (and --randaug/--mixup/--cutmix) on training images.")
@click.option("--randaug", metavar="N,M", help="RandAugment on top of crop/flip: N ops per image at magnitude M (0..10), e.g. 2,9.")
@click.option("--mixup", type=float, metavar="ALPHA", help="Mixup per image with lambda ~ Beta(ALPHA, ALPHA) (0: off; timm uses 0.8).")
@click.option("--cutmix", type=float, metavar="ALPHA", help="CutMix per image with lambda ~ Beta(ALPHA, ALPHA) (0: off; timm uses 1.0).")
@click.option("--mix-prob", type=float, help="Probability that an image is mixed.")
@click.option("--labels-per-class", type=float, metavar="N",
              help="Keep only N labels per class (or a fraction < 1 of the train split; none given: all); the rest can join --unlabeled rest.")
@click.option("--unlabeled", metavar="SPEC",
              help="Images distilled from the teacher without labels: any --data source (labels ignored), or 'rest' (none given: labelled images only).")
@click.option("--seed", type=int, help="Seed of the initialisation, batch order and augmentation (the splits use split_seed).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto: the GPU when there is one.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision on CUDA (bf16, else fp16 with loss scaling).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="YAML with TrainConfig keys; flags override it (none given: the defaults shown).")
@click.option("--out", "--run-dir", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the run is written, like every command's --out (--run-dir: its older name) "
                   "(default: runs/<student>-<method>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path), help="Continue an interrupted run from its last checkpoint (none given: a new run).")
@click.pass_context
@friendly_errors
def train(ctx, **kw):
    """Train a student (and its teacher, if it needs training) with a distillation method.

    Options left out come from --config, else from the defaults shown. Lists are comma-separated; KEY=VALUE
    options (--opt, --student-opt) repeat.

    \b
    Examples:
      edgekd train --target cortex-m7 --data fashion-mnist --teacher resnet18 --teacher-epochs 5 --epochs 10
      edgekd train --data imagefolder:~/photos --teacher efficientnet_lite0 --teacher-pretrained \\
                   --teacher-resolution 64 --method fm --randaug 2,9 --mixup 0.8 --cutmix 1.0
      edgekd train --resume runs/mobilenetv3_small_050-kd
    """
    from . import api
    from .config import OptimConfig, TrainConfig

    console = _console()
    given = [name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if kw["resume_dir"] is not None:
        extra = [n for n in given if n != "resume_dir"]
        if extra:
            raise EdgekdError(f"--resume uses the run's saved config; drop --{extra[0].replace('_', '-')}")
        summary = api.train(TrainConfig(run_dir=str(kw["resume_dir"])), resume=True, console=console)
        _print_summary(console, summary)
        return

    base = TrainConfig.load(kw["config_file"]) if kw["config_file"] else TrainConfig()
    # an option named like a TrainConfig field sets that field; the others are translated below
    changes = {f.name: kw[f.name] for f in dataclasses.fields(TrainConfig) if kw.get(f.name) is not None}
    if changes.get("teacher") == "none":
        changes["teacher"] = None
    if "run_dir" in changes:
        changes["run_dir"] = str(changes["run_dir"])
    else:
        changes["run_dir"] = str(_default_run_dir(changes.get("student", base.student), changes.get("method", base.method)))
    if kw["labels_per_class"] is not None:
        n = kw["labels_per_class"]
        changes["labels_per_class"] = int(n) if n >= 1 and n == int(n) else n
    if kw["randaug"] is not None:
        changes["randaug_ops"], changes["randaug_magnitude"] = _randaug(kw["randaug"])
    teacher_optim = {k: kw[f"teacher_{k}"] for k in ("lr", "body_lr_scale") if kw[f"teacher_{k}"] is not None}
    if teacher_optim:
        changes["teacher_optim"] = OptimConfig(**{**base.teacher_optim.__dict__, **teacher_optim})
    if kw["student_opts"]:
        changes["student_options"] = {**base.student_options, **_typed(_key_values(kw["student_opts"], "--student-opt"))}
    if kw["method_opts"]:
        changes["method_options"] = {**base.method_options, **_key_values(kw["method_opts"], "--opt")}
    optim = {k: kw[k] for k in ("lr", "optimizer", "weight_decay", "warmup_epochs", "grad_clip") if kw[k] is not None}
    if optim:
        changes["optim"] = OptimConfig(**{**base.optim.__dict__, **optim})
    config = base.replace(**changes)
    summary = api.train(config, console=console)
    _print_summary(console, summary)


def _show_config_defaults(command: click.Command) -> None:
    """Append each option's default from TrainConfig (the one place defaults live) to its help."""
    from .config import OptimConfig, TrainConfig

    def defaults(cls) -> dict:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    values = {**defaults(OptimConfig), **defaults(TrainConfig)}  # --lr etc. set the student phase's OptimConfig
    teacher_optim = values["teacher_optim"]
    values.update(teacher_lr=teacher_optim.lr, teacher_body_lr_scale=teacher_optim.body_lr_scale, randaug="0 (off)")
    values.pop("run_dir")  # the CLI's default differs: runs/<student>-<method>, said in its help
    for param in command.params:
        if not isinstance(param, click.Option) or param.show_default or param.name not in values:
            continue
        value = values[param.name]
        if value is None or value in ({}, "") or isinstance(value, (OptimConfig, dict)):
            continue  # no default to show (the help says what happens instead)
        if isinstance(value, bool) and param.is_flag and param.secondary_opts:
            value = param.opts[0] if value else param.secondary_opts[0]
        param.help = f"{param.help}  [default: {value}]"


def _randaug(text: str) -> tuple[int, int]:
    ops, sep, magnitude = text.partition(",")
    try:
        return int(ops), int(magnitude) if sep else 9
    except ValueError:
        raise EdgekdError(f"--randaug expects N,M (ops per image, magnitude 0..10), e.g. 2,9; got '{text}'") from None


_show_config_defaults(train)


def _default_run_dir(student: str, method: str) -> Path:
    """runs/<student>-<method>, numbered so an earlier run is never overwritten."""
    base = Path("runs") / f"{student}-{method}"
    candidate, n = base, 1
    while (candidate / "config.yaml").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _print_summary(console, summary: dict) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    teacher = summary.get("teacher")
    if teacher and teacher.get("test_acc") is not None:
        console.print(f"teacher {teacher['name']}: test accuracy {teacher['test_acc']:.4f}")
    console.print(
        f"[bold]student {summary['student']['name']}[/] ({summary['parameters']:,} params), method {summary['method']}: "
        f"test accuracy {summary['test_acc']:.4f} (best val {summary['val_acc']:.4f} at epoch {summary['best_epoch'] + 1})"
        if summary.get("best_epoch") is not None else
        f"student {summary['student']['name']}: test accuracy {summary['test_acc']:.4f}"
    )
    console.print(f"run written to {summary['run_dir']} (best.pt, last.pt, metrics.jsonl, summary.json)")


@main.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "format_", type=click.Choice(list(FORMATS)),
              help="Artifact format (default: the target's).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)),
              help="Numeric precision (default: the target's, else the format's: "
                   + ", ".join(f"{f.name} {f.default_precision}" for f in FORMATS.values()) + ").")
@click.option("--target", help="Device target: picks format/precision and checks flash and RAM (see `edgekd targets list`; none given: no checks, --format needed).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the artifact bundle (default: SOURCE's export/).")
@click.option("--calib-images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training images used to calibrate int8 quantization.")
@click.option("--verify-images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Held-out test images the artifact is verified on.")
@click.option("--dynamic-batch/--static-batch", default=False, show_default=True, help="ONNX only: a dynamic batch dimension.")
@click.option("--quantizer", type=click.Choice(list(QUANTIZERS)),
              help="Who makes the int8 model (default: "
                   + ", ".join(f"{f.name} {f.quantizers[0]}" for f in FORMATS.values() if f.quantizers)
                   + "; each also takes " + " | ".join(sorted({q for f in FORMATS.values() for q in f.quantizers[1:]}))
                   + "). Runs of `edgekd quantize` always use nncf (their own quantizers).")
@click.option("--data", help="Data spec for calibration/verification if the run's is not at hand (same dataset; none given: the run's).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Top-1 agreement with PyTorch a quantized artifact must reach.")
@friendly_errors
def export_cmd(source, format_, precision, target, out_dir, calib_images, verify_images, dynamic_batch, quantizer,
               data, min_agreement):
    """Export a run (or checkpoint) to ONNX, TFLite or a TensorRT-ready bundle, and verify it.

    \b
    Examples:
      edgekd export runs/demo-cortex-m7 --target cortex-m7
      edgekd export runs/nb --format onnx --dynamic-batch
      edgekd export runs/nb --format tflite --precision int8 --calib-images 500 --out bundles/nb
      edgekd export runs/nb --format tensorrt --precision int8 --quantizer nncf
      edgekd export runs/nb-nncf-qat --format tensorrt
    """
    from . import api

    console = _console()
    artifact = api.export(source, format=format_, precision=precision, target=target, out_dir=out_dir,
                          calib_images=calib_images, verify_images=verify_images, dynamic_batch=dynamic_batch,
                          quantizer=quantizer, data=data, min_agreement=min_agreement, console=console)
    console.print("[bold]exported and verified[/] " + "\n".join(artifact.summary_lines()))


@main.command("quantize")
@click.argument("run", type=click.Path(path_type=Path), required=False)
@click.option("--method", type=click.Choice(qconfig.METHODS), default=qconfig.DEFAULTS["method"], show_default=True,
              help="nncf-ptq: NNCF post-training quantization; nncf-qat: PTQ, then quantization-aware training with KD.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the quantized run (default: RUN-METHOD next to RUN).")
@click.option("--epochs", type=click.IntRange(min=1), default=qconfig.DEFAULTS["epochs"], show_default=True,
              help="QAT epochs.")
@click.option("--teacher", type=click.Choice(qconfig.TEACHERS), default=qconfig.DEFAULTS["teacher"], show_default=True,
              help="QAT's distillation teacher: the float student itself, or the teacher RUN was distilled from.")
@click.option("--temperature", type=float, default=qconfig.DEFAULTS["temperature"], show_default=True,
              help="KD temperature T (QAT).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=qconfig.DEFAULTS["alpha"], show_default=True,
              help="Weight of the KD term; 1 - alpha weighs the label cross-entropy (QAT).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=qconfig.DEFAULTS["optimizer"],
              show_default=True, help="QAT optimiser (sgd: momentum 0.9).")
@click.option("--lr", type=float, default=qconfig.DEFAULTS["lr"], show_default=True,
              help="Peak QAT learning rate for a batch of 128 (cosine, no warm-up).")
@click.option("--batch-size", type=click.IntRange(min=1), default=qconfig.DEFAULTS["batch_size"], show_default=True,
              help="QAT batch size.")
@click.option("--calib-images", type=click.IntRange(min=1), default=qconfig.DEFAULTS["calib_images"], show_default=True,
              help="Training images NNCF calibrates on.")
@click.option("--data", help="Data spec if the run's is not at hand (the same dataset; none given: the run's).")
@click.option("--seed", type=int, default=qconfig.DEFAULTS["seed"], show_default=True,
              help="Seed of the calibration subset and QAT batch order.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=qconfig.DEFAULTS["device"],
              show_default=True, help="auto: the GPU when there is one.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue an interrupted quantized run from its last checkpoint (none given: a new one from RUN).")
@click.pass_context
@friendly_errors
def quantize_cmd(ctx, run, method, out_dir, epochs, teacher, temperature, alpha, optimizer, lr, batch_size,
                 calib_images, data, seed, device, resume_dir):
    """Quantize a trained run to int8 with NNCF: post-training, or QAT with distillation (docs/quantize.md).

    The result is a run of its own (best.pt, metrics.jsonl, summary.json) that `edgekd export` turns into
    int8 artifacts through its own quantizers.

    \b
    Examples:
      edgekd quantize runs/demo-cortex-m7
      edgekd quantize runs/demo-cortex-m7 --method nncf-ptq
      edgekd quantize runs/demo-cortex-m7 --teacher run --epochs 3 --out runs/demo-int8
      edgekd quantize --resume runs/demo-cortex-m7-nncf-qat
    """
    from . import api

    console = _console()
    if resume_dir is not None:
        given = [name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        extra = [n for n in given if n != "resume_dir"]
        if extra:
            raise EdgekdError(f"--resume uses the quantized run's saved quantize.yaml; drop "
                              f"{'RUN' if extra[0] == 'run' else '--' + extra[0].replace('_', '-')}")
        api.quantize(resume_dir, resume=True, console=console)
        return
    if run is None:
        raise EdgekdError("say which run to quantize: edgekd quantize RUN (or --resume QUANTIZED_RUN)")
    api.quantize(run, method=method, out=out_dir, epochs=epochs, teacher=teacher, temperature=temperature,
                 alpha=alpha, optimizer=optimizer, lr=lr, batch_size=batch_size, calib_images=calib_images,
                 data=data, seed=seed, device=device, console=console)


@main.group()
def targets():
    """Device targets (targets/*.yaml)."""


@targets.command("list")
@friendly_errors
def targets_list():
    """One line per target.

    \b
    Example:
      edgekd targets list
    """
    from rich.table import Table

    from .targets import format_bytes, list_targets

    table = Table("name", "runtime", "format/precision", "RAM", "flash", "input", "latency budget")
    for t in list_targets():
        table.add_row(t.name, t.runtime, f"{t.export.format}/{t.export.precision}", format_bytes(t.memory.ram_bytes),
                      format_bytes(t.memory.flash_bytes), f"{t.input.resolution}px x{t.input.channels}", f"{t.latency_budget_ms:g} ms")
    _console().print(table)


@targets.command("show")
@click.argument("name")
@friendly_errors
def targets_show(name):
    """All specs of one target, with where they come from (see the YAML's comments).

    \b
    Examples:
      edgekd targets show cortex-m7
      edgekd targets show jetson-orin-nano
    """
    from rich.table import Table

    from .targets import load_target

    target = load_target(name)
    table = Table(title=f"{target.name}: {target.description}", show_header=False)
    for label, value in target.summary_rows():
        table.add_row(label, value)
    console = _console()
    console.print(table)
    console.print(f"sources: comments in {target.source_path}")


@main.command()
@click.option("--role", type=click.Choice(["student", "teacher"]), help="Only models registered for this role (none given: all).")
@friendly_errors
def models(role):
    """Registered architectures.

    \b
    Examples:
      edgekd models
      edgekd models --role student
    """
    from rich.table import Table

    from .models import get_model_info, list_models

    table = Table("name", "family", "role", "pretrained", "description")
    for name in list_models(role=role):
        info = get_model_info(name)
        table.add_row(info.name, info.family, info.role, "yes" if info.pretrained_available else "", info.description)
    _console().print(table)


@main.command()
@friendly_errors
def methods():
    """Registered distillation methods (defaults and sources: docs/methods.md).

    \b
    Example:
      edgekd methods
    """
    from rich.table import Table

    from .api import list_methods

    table = Table("name", "needs teacher", "description")
    for name, description, needs_teacher in list_methods():
        table.add_row(name, "yes" if needs_teacher else "no", description)
    _console().print(table)


@main.command("profile")
@click.argument("sources", nargs=-1)
@click.option("--target", "targets", metavar="NAME[,NAME]", multiple=True, callback=_comma_list, help="Device target(s), comma-separated (none given: the run's --target).")
@click.option("--runners", multiple=True, callback=_comma_list, help="Host runners, comma-separated: pytorch,onnxruntime,litert,tflite-micro; 'none' to skip "
                                "timing (default: those the source supports).")
@click.option("--resolution", type=int, help="Resolution for bare model names (none given: write NAME@RES).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("profiles"),
              show_default=True, help="Reports go to OUT/<target>/.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Host threads for timing.")
@click.option("--runs", type=click.IntRange(min=5), default=100, show_default=True, help="Timed runs per host runner.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write report.png (the Pareto plot).")
@click.option("--device", "device_url", metavar="URL",
              help="Also measure each source's export for the target on an `edgekd agent` at http://HOST:PORT (none given: no device).")
@click.option("--token", envvar="EDGEKD_AGENT_TOKEN", show_envvar=True,
              help="The agent's token, printed when it starts (none given: $EDGEKD_AGENT_TOKEN).")
@click.option("--serial", "serial_port", metavar="PORT",
              help="Also read the bundle's benchmark firmware from this serial port, e.g. /dev/ttyACM0 (none given: no board).")
@click.option("--baud", type=click.IntRange(min=300), default=115200, show_default=True, help="Serial baud rate.")
@click.option("--serial-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for a complete benchmark on the serial port.")
@click.option("--device-runs", type=click.IntRange(5, 100_000), default=100, show_default=True,
              help="Timed runs on the agent (after warm-up; at least one second in all).")
@click.option("--device-warmup", type=click.IntRange(0, 10_000), default=10, show_default=True, help="Warm-up runs on the agent.")
@click.option("--batch", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Batch size on the agent; throughput is reported at it (an ONNX model needs --dynamic-batch).")
@click.option("--device-threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Runtime threads on the agent.")
@click.option("--device-runtime", type=click.Choice(protocol.RUNTIMES), default="auto",
              show_default=True, help="Runtime on the agent; auto: the bundle's (TensorRT only if the agent allows builds).")
@click.option("--calibrate/--no-calibrate", default=False, show_default=True,
              help="Refit the target's latency coefficients to the device measurements (old values kept in the YAML's history).")
@friendly_errors
def profile_cmd(sources, targets, runners, resolution, out_dir, threads, runs, plot, device_url, token, serial_port, baud,
                serial_timeout, device_runs, device_warmup, batch, device_threads, device_runtime, calibrate):
    """MACs, memory, flash, latency (device estimate + host timings) and accuracy of SOURCES per target.

    SOURCE: a run directory, an export bundle (or its file), or NAME@RESOLUTION of a zoo model. With --device or
    --serial, the run's export for the target is also measured on the device (docs/profile.md).

    \b
    Examples:
      edgekd profile runs/demo-cortex-m7 mcunet_tiny@64 --target cortex-m7,cortex-m4 --runners pytorch,onnxruntime
      edgekd profile runs/pi --target raspberry-pi-4 --device http://127.0.0.1:8765 --token "$TOKEN"
      edgekd profile runs/demo-cortex-m7 --target cortex-m7 --serial /dev/ttyACM0 --calibrate
    """
    from . import api
    from .profile.device import DeviceRequest

    console = _console()
    parsed = None if runners is None else (() if runners == "none" else tuple(r.strip() for r in runners.split(",") if r.strip()))
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    device = None
    if device_url or serial_port:
        device = DeviceRequest(url=device_url, token=token, port=serial_port, baud=baud, timeout_s=serial_timeout,
                               runs=device_runs, warmup=device_warmup, batch=batch, threads=device_threads,
                               runtime=device_runtime, calibrate=calibrate)
    elif calibrate:
        raise EdgekdError("--calibrate fits the target to device measurements: add --device URL or --serial PORT")
    result = api.profile(list(sources), names, runners=parsed, resolution=resolution, out_dir=out_dir,
                         threads=threads, runs=runs, plot=plot, console=console, device=device)
    for name, r in result.items():
        console.print(r["markdown"].read_text(), markup=False)
        console.print(f"{name}: {len(r['json'])} profile(s) in {r['markdown'].parent} (report.md"
                      + (", report.png" if r["plot"] else "") + ")")


@main.command("agent")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the agent (prefer an SSH tunnel).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="TCP port (0: any free one).")
@click.option("--token-file", type=click.Path(dir_okay=False), envvar="EDGEKD_AGENT_TOKEN_FILE",
              help="File holding the token (none given: $EDGEKD_AGENT_TOKEN, else a new one is generated and printed).")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Folder for uploads and jobs (none given: a new temporary folder, removed at exit).")
@click.option("--max-upload-mb", type=click.IntRange(1, 4096), default=64, show_default=True, help="Largest upload accepted (MiB).")
@click.option("--queue", "queue_size", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Jobs that may wait behind the running one; more are answered 503 (busy).")
@click.option("--job-timeout", type=click.FloatRange(min=1), default=900.0, show_default=True, help="Seconds one job may run.")
@click.option("--allow-tensorrt-build/--no-allow-tensorrt-build", default=False, show_default=True,
              help="Run a TensorRT bundle's build_engine.sh with trtexec (this executes the uploaded script).")
def agent_cmd(host, port, token_file, work_dir, max_upload_mb, queue_size, job_timeout, allow_tensorrt_build):
    """Run the benchmark agent on this device (Jetson, Raspberry Pi, any Linux box) for `edgekd profile --device`.

    It times uploaded export bundles with the runtime this device has (ONNX Runtime, LiteRT; TensorRT only with
    --allow-tensorrt-build) and answers with latency, throughput, peak RSS, device identity and outputs. It needs
    only numpy and a runtime: `python -m edgekd.agent` is the same command. See docs/profile.md.

    \b
    Examples:
      edgekd agent
      EDGEKD_AGENT_TOKEN=$(cat ~/.edgekd-token) edgekd agent --port 9000
      edgekd agent --allow-tensorrt-build --work-dir /tmp/edgekd-agent
    """
    from .agent.server import run as run_agent

    try:
        run_agent(host, port, token_file, work_dir, max_upload_mb, queue_size, allow_tensorrt_build, job_timeout)
    except (ValueError, OSError) as e:
        click.echo(f"error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)


@main.command("select")
@click.argument("candidates", nargs=-1)
@click.option("--target", required=True, help="Device target (see `edgekd targets list`).")
@click.option("--sweep", help="arch=NAME[,NAME];width=W[,W];res=R[,R] (cross product; none given: CANDIDATES).")
@click.option("--resolutions", multiple=True, callback=_comma_list, help="Comma-separated resolutions for bare candidate names (none given: the target's).")
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True,
              help="Classes of the classifier head (its size counts in flash and MACs).")
@friendly_errors
def select_cmd(candidates, target, sweep, resolutions, num_classes):
    """Rank students for TARGET by estimated cost: those within its SRAM, flash and latency budgets, Pareto front first.

    CANDIDATES: NAME@RES (default: the zoo's students around the target's resolution).

    \b
    Examples:
      edgekd select --target cortex-m7
      edgekd select --target cortex-m4 mcunet_tiny@48 mobilenetv2_035@64
      edgekd select --target cortex-m7 --sweep "arch=mobilenetv2_100,mcunet_tiny;width=0.35,0.5;res=48,64"
    """
    from rich.table import Table

    from . import api
    from .profile.report import DEPLOYED_WEIGHTS_NOTE
    from .targets import format_bytes

    try:
        res = [int(r) for r in resolutions.split(",")] if resolutions else None
    except ValueError:
        raise EdgekdError(f"--resolutions takes whole numbers separated by commas, got '{resolutions}'") from None
    result = api.select(target, list(candidates), sweep=sweep, resolutions=res, num_classes=num_classes)
    console = _console()
    table = Table(title=f"students for {result.target} (estimates)")
    for col in ("candidate", "MACs", "deployed weights", "SRAM", "flash", "latency ms", "fits", "Pareto"):
        table.add_column(col)
    for r in sorted(result.rows, key=lambda r: (bool(r["misses"]), not r["pareto"], -r["macs"])):
        misses = ", ".join(f"{k} +{v:.0%}" for k, v in r["misses"].items())
        table.add_row(r["candidate"], f"{r['macs'] / 1e6:.2f}M", f"{r['params'] / 1e3:.0f}K", format_bytes(r["sram_bytes"]),
                      format_bytes(r["flash_bytes"]), f"{r['latency_ms']:.3g}", "yes" if not misses else f"no ({misses})",
                      "*" if r["pareto"] else "")
    console.print(table)
    console.print(result.reason)
    console.print(DEPLOYED_WEIGHTS_NOTE)


def _candidates(ctx, param, value):
    """--candidates K, or NAME@RES[,NAME@RES...]."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return int(text)
    return [c.strip() for c in text.split(",") if c.strip()]


@main.command("run")
@click.option("--target", default="cortex-m7", show_default=True, help="Device target (see `edgekd targets list`).")
@click.option("--data", default="fashion-mnist", show_default=True,
              help="fashion-mnist[:DIR] | digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | idx:DIR")
@click.option("--teacher", help="A trained teacher (run directory or .pt checkpoint), or a zoo model to train here "
                                f"[default: {DEFAULT_TEACHER} from ImageNet weights, fine-tuned here at "
                                f"{RECIPE.teacher_resolution} px].")
@click.option("--candidates", "candidates", default="3", show_default=True, callback=_candidates,
              metavar="K|NAME@RES,...", help="How many students to try, spread along the target's estimated cost "
                                             "front (`edgekd select`), or the students themselves.")
@click.option("--resolution", type=click.IntRange(min=8), metavar="PX",
              help="Only candidates at this input size [default: the target's and the sizes down to half of it].")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most this many training images [default: all].")
@click.option("--epochs", type=click.IntRange(min=1), help=f"Epochs per candidate [default: {RECIPE.epochs}].")
@click.option("--teacher-epochs", type=click.IntRange(min=1),
              help=f"Epochs to train or fine-tune the teacher [default: {RECIPE.teacher_epochs}].")
@click.option("--method", help=f"Distillation method of every candidate (see `edgekd methods`) [default: {RECIPE.method}].")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed of every candidate.")
@click.option("--budget-minutes", type=float, help="Stop launching candidates once this much wall time has passed "
                                                  "(the report covers what finished) [default: no limit].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Candidates trained at once: > 1 starts a local Ray instance (without Ray: one at a time).")
@click.option("--ray-address", metavar="HOST:PORT", help="Run the candidates on this Ray cluster (its nodes must "
                                                         "share OUT) [default: none].")
@click.option("--threads", type=click.IntRange(min=1), help="Torch threads per candidate [default: cores / workers].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory; the same command on it continues the run [default: runs/run-<target>].")
@friendly_errors
def run_cmd(target, data, teacher, candidates, resolution, limit, epochs, teacher_epochs, method, seed,
            budget_minutes, workers, ray_address, threads, out_dir):
    """From data to the recommended firmware-ready student: teacher, candidates, distil, export, profile, report.

    Each candidate is an ordinary edgekd run under OUT/candidates/; OUT/report.md and OUT/report.html say which
    one to deploy and why. Interrupted? Run the same command again: finished stages are skipped.

    \b
    Examples:
      edgekd run --target cortex-m7 --data fashion-mnist --resolution 32 --limit 10000 --out runs/demo-cortex-m7
      edgekd run --target cortex-m4 --data imagefolder:~/photos --candidates 5 --workers 2 --budget-minutes 60
      edgekd run --target jetson-orin-nano --data cifar10:~/cifar --teacher runs/t/teacher --ray-address head:6379
    """
    from . import api

    console = _console()
    api.run(target=target, data=data, teacher=teacher, candidates=candidates, resolution=resolution, limit=limit,
            epochs=epochs, teacher_epochs=teacher_epochs, method=method, seed=seed, budget_minutes=budget_minutes,
            workers=workers, ray_address=ray_address, threads=threads, out_dir=out_dir, console=console)


if __name__ == "__main__":  # last, so that `python -m edgekd.cli` (the form torchrun runs) has every command
    main()
