"""quantize(): a float run -> a quantized run (NNCF post-training quantization, optionally QAT with KD).

Order of work: validate everything that can be checked (method, source run, output folder, installed extra,
the run's training data, the teacher) before anything is written; then PTQ on calibration images from the
run's training split (its normalisation and resolution); then, for nncf-qat, fine-tuning of the fake-quantized
student with Hinton KD through the project's Trainer (atomic checkpoints, exact mid-epoch resume: the loader
order is a function of (seed, epoch)). The result is a run directory like any other: best.pt, metrics.jsonl,
summary.json, plus quantize.yaml (the input to --resume) and, for QAT, ptq.pt (the model QAT starts from) and
last.pt (training state).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import OptimConfig
from ..data.datamodule import DataModule, load_data
from ..distill.kd import HintonKD, KDOptions
from ..distill.phase import Phase
from ..distributed import DistEnv
from ..errors import EdgekdError
from ..train.checkpoint import file_sha256, load_model, model_payload, read_checkpoint, save_atomic
from ..train.trainer import Trainer, make_runtime
from . import nncf_backend
from .checkpoint import describe
from .config import CONFIG_NAME, DEFAULTS as D, METHODS, QuantizeConfig

PTQ_FILE = "ptq.pt"


def quantize(
    source,
    *,
    method: str = D["method"],
    out=None,
    data: str | None = D["data"],
    calib_images: int = D["calib_images"],
    epochs: int = D["epochs"],
    teacher: str = D["teacher"],
    temperature: float = D["temperature"],
    alpha: float = D["alpha"],
    optimizer: str = D["optimizer"],
    lr: float = D["lr"],
    batch_size: int = D["batch_size"],
    seed: int = D["seed"],
    device: str = D["device"],
    checkpoint_interval_s: float = D["checkpoint_interval_s"],
    resume: bool = False,
    console=None,
    on_step: Callable[[Trainer, int], None] | None = None,
) -> dict:
    """Quantize the float run `source` into a new run directory (default `<source>-<method>`); returns its summary.

    With `resume=True`, `source` is the quantized run to continue (its quantize.yaml is used as is).
    See docs/quantize.md."""
    started = time.time()
    if resume:
        config = _resume_config(Path(source))
    else:
        config = _new_config(Path(source), method=method, out=out, data=data, calib_images=calib_images,
                             epochs=epochs, teacher=teacher, temperature=temperature, alpha=alpha,
                             optimizer=optimizer, lr=lr,
                             batch_size=batch_size, seed=seed, device=device,
                             checkpoint_interval_s=checkpoint_interval_s)
    nncf_backend.require()
    source_dir, run_dir = Path(config.source), Path(config.run_dir)
    float_model, payload = load_model(source_dir)
    dm = _data(config, payload)
    teacher_model, teacher_info = _teacher(config, source_dir, float_model, dm) if config.method == "nncf-qat" else (None, None)

    runtime = make_runtime(config.device, False, False, DistEnv())  # no AMP: fake-quantization runs in fp32
    nncf_backend.prepare(runtime.device)

    # everything is validated: from here on the run directory is written
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        config.save(run_dir / CONFIG_NAME)
    trainer = Trainer(run_dir, dm, runtime, batch_size=config.batch_size, augment=config.augment, seed=config.seed,
                      checkpoint_interval_s=config.checkpoint_interval_s, console=console, on_step=on_step)
    source_info = _source_info(source_dir, payload, trainer.evaluate(float_model.to(runtime.device), "test")["test_acc"])
    qmodel, ptq = _ptq(config, float_model, dm, source_info, trainer, console)
    if config.method == "nncf-ptq":
        save_atomic(model_payload(qmodel, dm.describe(), {"val_acc": ptq["val_acc"]}), run_dir / "best.pt")
        (run_dir / "metrics.jsonl").write_text(json.dumps({"phase": "ptq", "phase_index": 0, "epoch": 0, **ptq}) + "\n")
        result = {"best_epoch": None, "val_acc": ptq["val_acc"], "test_acc": ptq["test_acc"],
                  "test_loss": ptq["test_loss"], "qat_seconds": None}
    else:
        result = _qat(config, qmodel, ptq, teacher_model, trainer, resume, console)
    summary = _summary(config, source_info, ptq, teacher_info, result, dm, runtime, started)
    _write_json(run_dir / "summary.json", summary)
    if console is not None:
        console.print(f"[bold]{config.method}[/] of {source_dir}: fake-quant int8 test accuracy {summary['test_acc']:.4f} "
                      f"(float {source_info['test_acc']:.4f}, PTQ {ptq['test_acc']:.4f}); written to {run_dir}")
    return summary


def _new_config(source: Path, *, method: str, out, **settings) -> QuantizeConfig:
    if method not in METHODS:
        raise EdgekdError(f"unknown quantization method '{method}'; use one of {', '.join(METHODS)}")
    if not source.is_dir() or not (source / "best.pt").is_file():
        what = "does not exist" if not source.exists() else "is not a run directory with a best.pt"
        raise EdgekdError(f"{source} {what}: pass a float run written by `edgekd train`")
    if (source / CONFIG_NAME).is_file() or "quantization" in read_checkpoint(source / "best.pt", kind="model"):
        origin = _origin(source)
        raise EdgekdError(f"{source} is already quantized ({origin}): quantize its float run instead")
    run_dir = Path(out) if out is not None else source.with_name(f"{source.name}-{method}")
    if run_dir.resolve() == source.resolve():
        raise EdgekdError("--out must be another folder than the run itself: a quantized run is a run of its own")
    if (run_dir / CONFIG_NAME).exists():
        raise EdgekdError(f"{run_dir} already holds a quantized run: resume it with --resume {run_dir} or choose "
                          "another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise EdgekdError(f"{run_dir} exists and is not empty: choose another --out")
    split = {}
    if (source / "config.yaml").is_file():  # the run's split settings, so the splits are the run's
        from ..config import TrainConfig

        train = TrainConfig.load(source / "config.yaml")
        split = {"split_seed": train.split_seed, "val_fraction": train.val_fraction, "limit": train.limit,
                 "labels_per_class": train.labels_per_class}
        settings["augment"] = train.augment
    return QuantizeConfig(source=str(source), run_dir=str(run_dir), method=method, **split, **settings)


def _origin(path: Path) -> str:
    try:
        config = QuantizeConfig.load(path / CONFIG_NAME)
        return f"{config.method} of {config.source}"
    except EdgekdError:
        return "its best.pt holds NNCF quantizers"


def _resume_config(run_dir: Path) -> QuantizeConfig:
    if not (run_dir / CONFIG_NAME).is_file():
        raise EdgekdError(f"{run_dir} is not a quantized run (no {CONFIG_NAME}): pass the folder `edgekd quantize` wrote")
    if (run_dir / "summary.json").is_file():
        raise EdgekdError(f"{run_dir} is finished (it has summary.json): nothing to resume")
    return QuantizeConfig.load(run_dir / CONFIG_NAME).replace(run_dir=str(run_dir))


def _data(config: QuantizeConfig, payload: dict) -> DataModule:
    """The run's data with its splits and normalisation; a one-line error when it is not at hand."""
    recorded = payload["data"]
    spec = config.data or recorded["spec"]
    use = "fine-tunes and calibrates" if config.method == "nncf-qat" else "calibrates"
    try:
        dm = load_data(spec, resolution=recorded["resolution"], channels=recorded["channels"], seed=config.split_seed,
                       val_fraction=config.val_fraction, limit=config.limit, labels_per_class=config.labels_per_class)
    except EdgekdError as e:
        alternative = "" if config.method == "nncf-ptq" else "; nncf-ptq needs only calibration images"
        raise EdgekdError(f"{config.method} {use} on the run's training data ({spec}), which is not at hand ({e}): "
                          f"pass --data with the same dataset{alternative}") from None
    if list(dm.info.class_names) != list(recorded["class_names"]):
        raise EdgekdError(f"data '{spec}' has classes {list(dm.info.class_names)[:5]}... but the run was trained on "
                          f"{list(recorded['class_names'])[:5]}...: pass the run's data with --data")
    # the checkpoint's normalisation, exactly (the recomputed one is rounded in describe())
    return dataclasses.replace(dm, mean=tuple(recorded["mean"]), std=tuple(recorded["std"]))


def _teacher(config: QuantizeConfig, source: Path, float_model: nn.Module, dm: DataModule) -> tuple[nn.Module, dict]:
    if config.teacher == "float":
        return float_model, {"kind": "float", "source": str(source / "best.pt"),
                             "checkpoint_sha256": file_sha256(source / "best.pt")}
    summary_path = source / "summary.json"
    info = json.loads(summary_path.read_text()).get("teacher") if summary_path.is_file() else None
    if not info:
        raise EdgekdError(f"{source} was trained without a teacher: use --teacher float (the float student)")
    teacher_resolution = json.loads(summary_path.read_text()).get("teacher_resolution")
    if teacher_resolution not in (None, dm.resolution):
        raise EdgekdError(f"{source}'s teacher works at {teacher_resolution} px and the student at {dm.resolution} px; "
                          "QAT feeds both the student's view: use --teacher float")
    path = source / "teacher" if info.get("source") == "trained in this run" else Path(info["source"])
    if not path.exists():
        raise EdgekdError(f"the run's teacher {path} is gone: use --teacher float")
    model, _ = load_model(path, num_classes=dm.info.num_classes)
    checkpoint = path / "best.pt" if path.is_dir() else path
    return model, {"kind": "run", "name": info.get("name"), "source": str(checkpoint),
                   "checkpoint_sha256": file_sha256(checkpoint), "test_acc": info.get("test_acc")}


def _source_info(source: Path, payload: dict, test_acc: float) -> dict:
    summary = source / "summary.json"
    recorded = json.loads(summary.read_text()).get("test_acc") if summary.is_file() else None
    return {"run": str(source), "checkpoint": str(source / "best.pt"), "sha256": file_sha256(source / "best.pt"),
            "model": payload["model_config"], "test_acc": test_acc, "summary_test_acc": recorded}


def calibration_batches(dm: DataModule, n: int, seed: int) -> list[torch.Tensor]:
    """`n` training images (a seeded random subset, no augmentation) normalised as in training, in batches."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dm.train), generator=g)[:n].sort().values
    step = nncf_backend.CALIBRATION_BATCH
    loader = dm.loader("train", step, shuffle=False, augment=False)
    return [loader.normalize(dm.train.get_batch(idx[i : i + step])) for i in range(0, len(idx), step)]


def _ptq(config: QuantizeConfig, float_model: nn.Module, dm: DataModule, source_info: dict, trainer: Trainer,
         console) -> tuple[nn.Module, dict]:
    """NNCF PTQ, or (QAT resumed) the model it produced, rebuilt from ptq.pt."""
    run_dir = Path(config.run_dir)
    device = trainer.rt.device
    if (run_dir / PTQ_FILE).is_file():
        payload = read_checkpoint(run_dir / PTQ_FILE, kind="model")
        return nncf_backend.rebuild(payload, str(run_dir / PTQ_FILE)).to(device), payload["metrics"]
    if console is not None:
        console.print(f"NNCF post-training quantization, calibrating on {config.calib_images} training images "
                      "(the first use compiles NNCF's C++ extension: a minute, once)")
    started = time.perf_counter()
    qmodel, state = nncf_backend.ptq(float_model, calibration_batches(dm, config.calib_images, config.seed))
    state.update(method=config.method, source={k: source_info[k] for k in ("run", "checkpoint", "sha256")})
    seconds = time.perf_counter() - started
    qmodel = qmodel.to(device)
    metrics = {**trainer.evaluate(qmodel, "val"), **trainer.evaluate(qmodel, "test"), "ptq_seconds": round(seconds, 1)}
    if console is not None:
        console.print(f"PTQ: fake-quant test accuracy {metrics['test_acc']:.4f} (float {source_info['test_acc']:.4f}), "
                      f"{seconds:.0f} s")
    if config.method == "nncf-qat":  # QAT starts here; a resumed run rebuilds this instead of calibrating again
        save_atomic(model_payload(qmodel, dm.describe(), metrics), run_dir / PTQ_FILE)
    return qmodel, metrics


def _qat(config: QuantizeConfig, qmodel: nn.Module, ptq: dict, teacher: nn.Module, trainer: Trainer,
         resume: bool, console) -> dict:
    """Fine-tune the fake-quantized student with Hinton KD from `teacher` (float) through the project's Trainer.
    The PTQ model is the first candidate for best.pt: an epoch replaces it only with a better validation
    accuracy, so QAT never hands back less than it started from (on the validation split)."""
    distiller = HintonKD(qmodel, teacher, KDOptions(temperature=config.temperature, alpha=config.alpha))
    # NNCF keeps bookkeeping (signedness, bit width) as frozen integer parameters: only float ones train.
    # No weight decay: it would shrink the learned quantizer scales along with the weights.
    trainable = [p for p in qmodel.parameters() if p.requires_grad]
    optim = OptimConfig(optimizer=config.optimizer, lr=config.lr * config.batch_size / 128, weight_decay=0.0,
                        warmup_epochs=0.0)
    phase = Phase("qat", config.epochs, distiller, trainable, optim)
    if console is not None:
        console.print(f"QAT: {config.epochs} epoch(s) of KD (T={config.temperature:g}, alpha={config.alpha:g}) from the "
                      f"{config.teacher} teacher on the fake-quantized student")
    started = time.perf_counter()
    resuming = resume and (Path(config.run_dir) / "last.pt").exists()
    if not resuming:
        save_atomic(model_payload(qmodel, trainer.data.describe(), {"val_acc": ptq["val_acc"], "epoch": -1}),
                    Path(config.run_dir) / "best.pt")
    result = trainer.fit([phase], resume=resuming, start_val_acc=ptq["val_acc"])
    records = [json.loads(line) for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    result["qat_seconds"] = round(sum(r.get("train_seconds") or 0.0 for r in records), 1)
    result["qat_wall_seconds_this_call"] = round(time.perf_counter() - started, 1)
    return result


def _summary(config: QuantizeConfig, source_info: dict, ptq: dict, teacher_info: dict | None, result: dict,
             dm: DataModule, runtime, started: float) -> dict:
    run_dir = Path(config.run_dir)
    payload = read_checkpoint(run_dir / "best.pt", kind="model")
    qat = None
    if config.method == "nncf-qat":
        qat = {"epochs": config.epochs, "loss": "Hinton KD (edgekd.distill.kd): alpha * T^2 * KL + (1 - alpha) * CE",
               "temperature": config.temperature, "alpha": config.alpha, "optimizer": config.optimizer, "lr": config.lr,
               "batch_size": config.batch_size,
               "kept_ptq": result.get("best_epoch") == -1,  # no QAT epoch beat the PTQ start on validation
               "teacher": teacher_info, "seconds": result.get("qat_seconds")}
    return {
        "run_dir": str(run_dir),
        "method": config.method,
        "student": payload["model_config"],
        "quantization": describe(payload["quantization"]),
        "source": source_info,
        "float_test_acc": source_info["test_acc"],
        "ptq": ptq,
        "qat": qat,
        **{k: v for k, v in result.items() if k not in ("qat_seconds",)},
        "test_acc": result["test_acc"],
        "accuracy_note": "test_acc is the fake-quantized PyTorch model's (NNCF simulation of int8)",
        "resolution": dm.resolution,
        "channels": dm.channels,
        "data": dm.describe(),
        "device": str(runtime.device),
        "wall_seconds": time.time() - started,
        "checkpoint_sha256": file_sha256(run_dir / "best.pt"),
        "versions": {"torch": torch.__version__, "nncf": payload["quantization"].get("nncf_version"),
                     "python": platform.python_version()},
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
