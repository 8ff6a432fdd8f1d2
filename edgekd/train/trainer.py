"""The training loop: phases, AMP on CUDA, DDP, atomic checkpoints and exact resume.

Resume guarantee: with the same config, an interrupted-then-resumed run ends with the same weights as an
uninterrupted one, because the batch order and augmentation depend only on (seed, epoch), the learning rate
is a pure function of the step, and the checkpoint carries optimizer, scaler and RNG state plus the position
inside the epoch.
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.augment import Mix, RandAugment
from ..data.datamodule import DataModule
from ..data.loader import UNLABELED
from ..distill.phase import Phase
from ..distill.step import Step
from ..distill.teacher_outputs import TeacherOutputs
from ..distributed import DistEnv, all_reduce_sum, barrier
from ..errors import EdgekdError
from .checkpoint import model_payload, read_checkpoint, save_atomic
from .phases import build_optimizer
from .schedules import lr_at


@dataclass(frozen=True)
class TrainViews:
    """How the student's training batches are made beyond the data's crop/flip.

    `teacher_data`: the same splits at the teacher's resolution; training images are augmented there, the
    teacher sees that view (normalised with `teacher_norm`) and the student the same view resized to its own
    resolution. `with_unlabeled`: the data's unlabeled images join the training set (label UNLABELED)."""

    randaug: RandAugment | None = None
    mix: Mix | None = None
    teacher_data: DataModule | None = None
    teacher_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    with_unlabeled: bool = False


class TrainingInterrupted(Exception):
    """Raised after the state was saved because the user (or the scheduler) asked to stop."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool
    dist: DistEnv = field(default_factory=DistEnv)

    @property
    def use_scaler(self) -> bool:
        return self.amp_dtype == torch.float16


def make_runtime(device: str, amp: bool, channels_last: bool, dist: DistEnv) -> Runtime:
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgekdError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        # autocast on CPU is slower than fp32 on most CPUs and changes numerics; keep CPU runs exact
        return Runtime(torch.device("cpu"), None, False, dist)
    amp_dtype = None
    if amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Runtime(torch.device("cuda", dist.local_rank), amp_dtype, channels_last, dist)


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    terms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # images with a label, train_acc's denominator (None, in checkpoints from before unlabeled data: `seen`)
    labelled: int | None = None

    def add(self, loss: float, correct: int, n: int, terms: dict[str, float], labelled: int | None = None) -> None:
        self.labelled = (self.seen if self.labelled is None else self.labelled) + (n if labelled is None else labelled)
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v * n

    def summary(self) -> dict:
        n = max(self.seen, 1)
        return {
            "train_loss": self.loss_sum / n,
            "train_acc": self.correct / max(self.labelled if self.labelled is not None else self.seen, 1),
            "terms": {k: v / n for k, v in self.terms.items()},
            "images_per_s": self.seen / self.seconds if self.seconds > 0 else None,
            "train_seconds": self.seconds,
        }


class Trainer:
    """Runs phases over a DataModule, writing a run directory.

    Run directory: config (written by the caller), metrics.jsonl (one line per epoch), last.pt (training
    state), best.pt (model by best validation accuracy in the final phase), summary.json.
    """

    def __init__(
        self,
        run_dir: Path,
        data: DataModule,
        runtime: Runtime,
        *,
        batch_size: int,
        micro_batches: int = 1,
        augment: bool = True,
        seed: int = 0,
        checkpoint_interval_s: float = 300.0,
        console=None,
        on_step: Callable[["Trainer", int], None] | None = None,
        teacher_outputs: "TeacherOutputs | None" = None,
        variants: int = 0,
        bank_seed: int = 0,
        views: TrainViews | None = None,
    ):
        world = runtime.dist.world_size
        if batch_size % (world * micro_batches):
            raise EdgekdError(
                f"batch size {batch_size} must divide evenly over {world} processes x {micro_batches} micro-batches"
            )
        self.run_dir = Path(run_dir)
        self.data = data
        self.rt = runtime
        self.batch_size = batch_size
        self.micro_batches = micro_batches
        self.augment = augment
        self.seed = seed
        self.checkpoint_interval_s = checkpoint_interval_s
        self.console = console
        self.on_step = on_step
        # the cached/fast teacher outputs served to phases whose distiller declares teacher_needs
        # (distill/step.py, distill/teacher_outputs.py)
        self.teacher_outputs = teacher_outputs
        self.variants = variants
        self.bank_seed = bank_seed
        self.views = views or TrainViews()
        self._stop = threading.Event()

    # ---- public -------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current step, save, then raise TrainingInterrupted."""
        self._stop.set()

    def fit(self, phases: list[Phase], *, resume: bool = False, start_val_acc: float | None = None) -> dict:
        """`start_val_acc`: the validation accuracy of the model the final phase starts from, whose weights the
        caller has written to best.pt; an epoch must beat it to replace it (best_epoch -1: none did)."""
        state = self._load_resume_state(phases) if resume else None
        if self.rt.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if state is None:
                (self.run_dir / "metrics.jsonl").write_text("")
            else:
                self._truncate_metrics(state["phase"], state["epoch"])
        if state is None:
            torch.manual_seed(self.seed)
        if state:
            best = state["best"]
        elif start_val_acc is not None:
            best = {"val_acc": start_val_acc, "epoch": -1}
        else:
            best = {"val_acc": -1.0, "epoch": None}
        start_phase = state["phase"] if state else 0
        with self._stop_on_signals():
            for index in range(start_phase, len(phases)):
                best = self._run_phase(index, phases, state if index == start_phase else None, best)
        return self._finish(phases[-1], best)

    # ---- phases -------------------------------------------------------------------------------------
    def _run_phase(self, index: int, phases: list[Phase], state: dict | None, best: dict) -> dict:
        phase = phases[index]
        is_final = index == len(phases) - 1
        distiller = phase.distiller.to(self.rt.device)
        if self.rt.channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        trainable = {id(p) for p in phase.trainable}
        for p in distiller.parameters():
            p.requires_grad_(id(p) in trainable)
        module: nn.Module = distiller
        if self.rt.dist.enabled:
            device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            module = DistributedDataParallel(distiller, device_ids=device_ids)
        optimizer = build_optimizer(phase.trainable, phase.optim, phase.head)
        scaler = torch.amp.GradScaler("cuda", enabled=self.rt.use_scaler)
        loader = self._train_loader(phase)
        if len(loader) == 0:
            raise EdgekdError(
                f"the training split ({len(loader.images)} images) is smaller than one batch ({self.batch_size}): lower --batch-size"
            )
        steps_per_epoch = len(loader)
        total_steps = steps_per_epoch * phase.epochs
        start_epoch, start_step, stats = 0, 0, EpochStats()
        if state is not None:
            self._restore(state, distiller, optimizer, scaler)
            start_epoch, start_step = state["epoch"], state["step"]
            stats = EpochStats(**state["epoch_stats"])
        for epoch in range(start_epoch, phase.epochs):
            loader.set_epoch(index * 100_003 + epoch)  # distinct orders per phase, same on every rank
            distiller.train()
            phase.distiller.on_epoch_start(epoch, phase.epochs, optimizer, steps_per_epoch)
            stats = self._train_epoch(
                index, phase, module, distiller, optimizer, scaler, loader, epoch, start_step,
                steps_per_epoch, total_steps, stats, best,
            )
            record = {"phase": phase.name, "phase_index": index, "epoch": epoch, **stats.summary()}
            record["lr"] = optimizer.param_groups[0]["lr"]
            if self._uses_teacher_outputs(phase) and self.teacher_outputs.cache is not None:
                record["teacher_cache"] = self.teacher_outputs.cache.stats(reset=True)
            if phase.evaluate:
                record.update(self.evaluate(phase.eval_model, "val"))
                if is_final and record["val_acc"] > best["val_acc"]:
                    best = {"val_acc": record["val_acc"], "epoch": epoch}
                    self._save_model(phase.eval_model, "best.pt", {"val_acc": record["val_acc"], "epoch": epoch})
            self._log_epoch(record, phase.epochs)
            start_step, stats = 0, EpochStats()
            self._save_state(index, epoch + 1, 0, distiller, optimizer, scaler, stats, best)
        if is_final and best["epoch"] is None:
            # a final phase that never evaluates (unusual): its last weights are the result
            self._save_model(phase.eval_model, "best.pt", {})
        return best

    def _train_loader(self, phase: Phase):
        views = self.views
        uses_teacher = self._uses_teacher_outputs(phase)
        source = views.teacher_data if views.teacher_data is not None and uses_teacher else self.data
        different = source is not self.data  # the student's view comes from the teacher-resolution images
        return source.loader(
            "train",
            self.batch_size // self.rt.dist.world_size,
            shuffle=True,
            augment=self.augment,
            seed=self.seed,
            rank=self.rt.dist.rank,
            world_size=self.rt.dist.world_size,
            drop_last=True,  # equal shards keep DDP and micro-batch gradients exact averages
            variants=self.variants if uses_teacher else 0,
            bank_seed=self.bank_seed,
            randaug=views.randaug if self.augment else None,
            mix=views.mix if self.augment else None,
            with_unlabeled=views.with_unlabeled,
            resolution=self.data.resolution if different else None,
            mean=self.data.mean if different else None,
            std=self.data.std if different else None,
            teacher_norm=views.teacher_norm if uses_teacher else None,
        )

    def _train_epoch(self, index, phase, module, distiller, optimizer, scaler, loader, epoch, start_step,
                     steps_per_epoch, total_steps, stats, best) -> EpochStats:
        progress = self._progress(f"{phase.name} {epoch + 1}/{phase.epochs}", steps_per_epoch, start_step)
        last_save = time.monotonic()
        tick = time.perf_counter()
        try:
            for step, batch in enumerate(loader.iterate_batches(start_step), start=start_step):
                global_step = epoch * steps_per_epoch + step
                lr = lr_at(global_step, total_steps, steps_per_epoch, phase.optim)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                teacher_logits, teacher_features = self._served_teacher_outputs(phase, batch)
                train_step = Step(batch.x, batch.y, batch.index, batch.y_partner, batch.lam, teacher_logits,
                                  teacher_features, epoch=epoch, iteration=global_step)
                loss, correct, seen, labelled, terms = self._step(module, phase, optimizer, scaler, train_step)
                stats.add(loss, correct, seen, terms, labelled)
                now = time.perf_counter()
                stats.seconds += now - tick
                tick = now
                if progress is not None:
                    progress[0].update(progress[1], advance=1, description=f"{phase.name} {epoch + 1}/{phase.epochs} loss {loss:.3f}")
                if self.on_step is not None:
                    self.on_step(self, global_step)
                stop = self._stop_requested()
                if stop or time.monotonic() - last_save > self.checkpoint_interval_s:
                    self._save_state(index, epoch, step + 1, distiller, optimizer, scaler, stats, best)
                    last_save = time.monotonic()
                if stop:
                    raise TrainingInterrupted(
                        f"stopped in {phase.name} epoch {epoch + 1} step {step + 1}; state saved: "
                        f"resume with `edgekd train --resume {self.run_dir}`"
                    )
                tick = time.perf_counter()
        finally:
            if progress is not None:
                progress[0].stop()
        return stats

    def _uses_teacher_outputs(self, phase: Phase) -> bool:
        return self.teacher_outputs is not None and phase.distiller.teacher_needs is not None

    def _served_teacher_outputs(self, phase: Phase, batch) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """The teacher's cached/fast logits and the feature maps at the taps the phase's distiller declared, or
        (None, ()) when it declared nothing (it runs the teacher itself)."""
        if not self._uses_teacher_outputs(phase):
            return None, ()
        # the teacher's view of the same image, made only if the teacher has to run (a cache miss)
        x = batch.x if batch.teacher_view is None else (lambda: batch.teacher_x)
        logits, features = self.teacher_outputs.with_features(x, batch.index, batch.variant)
        served = self.teacher_outputs.runner.taps  # every phase's taps (api: combined_needs)
        return logits, tuple(features[served.index(tap)] for tap in phase.distiller.teacher_needs.taps)

    def _step(self, module, phase, optimizer, scaler, step: Step) -> tuple[float, int, int, int, dict[str, float]]:
        x = step.x.to(self.rt.device, non_blocking=True)
        if self.rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        moved = {"x": x, "y": step.y.to(self.rt.device, non_blocking=True)}
        if step.mix is not None:  # (partner labels, own weight) of mixed images, for the label term
            moved.update(y_partner=step.y_partner.to(self.rt.device), lam=step.lam.to(self.rt.device))
        step = replace(step, **moved)
        k = self.micro_batches
        loss_total, correct, seen, labelled_total = 0.0, 0, 0, 0
        terms: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        for m in range(k):
            part = step.micro(m, k)
            sync = contextlib.nullcontext() if m == k - 1 or not isinstance(module, DistributedDataParallel) else module.no_sync()
            with sync, torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype or torch.float32, enabled=self.rt.amp_dtype is not None):
                out = module(part)
            if not torch.isfinite(out.loss):
                raise EdgekdError(
                    f"loss became {out.loss.item()} in phase '{phase.name}': lower the learning rate (--lr) or enable gradient clipping (--grad-clip)"
                )
            scaler.scale(out.loss / k).backward()
            loss_total += out.loss.item() / k
            labels = out.labels if out.labels is not None else part.y
            labelled = labels != UNLABELED
            correct += int((out.logits.argmax(1) == labels)[labelled].sum())
            labelled_total += int(labelled.sum())
            seen += len(labels)
            for name, value in out.terms.items():
                terms[name] = terms.get(name, 0.0) + float(value) / k
        if phase.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(phase.trainable, phase.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        for name, value in phase.distiller.after_step(step, optimizer).items():
            terms[name] = terms.get(name, 0.0) + value
        return loss_total, correct, seen, labelled_total, terms

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int = 512) -> dict:
        was_training = model.training
        model.eval()
        loader = self.data.loader(split, batch_size, shuffle=False, augment=False,
                                  rank=self.rt.dist.rank, world_size=self.rt.dist.world_size)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for x, y in loader:
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            if self.rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype or torch.float32, enabled=self.rt.amp_dtype is not None):
                logits = model(x)
            totals += torch.tensor([F.cross_entropy(logits.float(), y, reduction="sum").item(),
                                    (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
        totals = all_reduce_sum(totals, self.rt.dist)
        model.train(was_training)
        n = max(totals[2].item(), 1)
        return {f"{split}_loss": totals[0].item() / n, f"{split}_acc": totals[1].item() / n}

    # ---- state --------------------------------------------------------------------------------------
    def _save_state(self, phase, epoch, step, distiller, optimizer, scaler, stats: EpochStats, best) -> None:
        if self.teacher_outputs is not None and self.teacher_outputs.cache is not None:
            self.teacher_outputs.cache.flush()  # every rank owns its cache shard
        if self.rt.dist.is_main:
            state = {
                "format": "edgekd-checkpoint",
                "version": 1,
                "kind": "training",
                "phase": phase,
                "epoch": epoch,
                "step": step,
                "student": {k: v.detach().cpu() for k, v in distiller.student.state_dict().items()},
                "extra": {k: v.detach().cpu() for k, v in distiller.extra_state().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if self.rt.device.type == "cuda" else [],
                "epoch_stats": {**stats.__dict__, "terms": dict(stats.terms)},
                "best": best,
            }
            save_atomic(state, self.run_dir / "last.pt")
        barrier(self.rt.dist)

    def _load_resume_state(self, phases: list[Phase]) -> dict | None:
        path = self.run_dir / "last.pt"
        if not path.exists():
            return None  # nothing saved yet: start from the beginning
        state = read_checkpoint(path, kind="training")
        if state["phase"] >= len(phases):
            raise EdgekdError(f"{path} is from a method with more phases: it belongs to another run")
        return state

    def _restore(self, state: dict, distiller, optimizer, scaler) -> None:
        try:
            distiller.student.load_state_dict(state["student"])
            distiller.load_extra_state(state["extra"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise EdgekdError(f"{self.run_dir / 'last.pt'} does not match this run's model or method ({str(e).splitlines()[0][:120]})") from None
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def _save_model(self, model: nn.Module, name: str, metrics: dict) -> None:
        if self.rt.dist.is_main:
            save_atomic(model_payload(model, self.data.describe(), metrics), self.run_dir / name)
        barrier(self.rt.dist)

    def _finish(self, final: Phase, best: dict) -> dict:
        model = final.eval_model
        last_test = self.evaluate(model, "test")["test_acc"]
        extra = {f"last_epoch_{name}_test_acc": self.evaluate(m, "test")["test_acc"]
                 for name, m in final.distiller.extra_eval_models().items()}
        payload = read_checkpoint(self.run_dir / "best.pt", kind="model")
        model.load_state_dict(payload["state_dict"])
        best_metrics = {**self.evaluate(model, "val"), **self.evaluate(model, "test")}
        epochs = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]
        final_epochs = [e for e in epochs if e["phase"] == final.name and e.get("images_per_s")]
        throughput = sum(e["images_per_s"] for e in final_epochs) / len(final_epochs) if final_epochs else None
        summary = {
            "best_epoch": best["epoch"],
            "val_acc": best_metrics["val_acc"],
            "test_acc": best_metrics["test_acc"],
            "test_loss": best_metrics["test_loss"],
            "last_epoch_test_acc": last_test,
            "train_images_per_s": throughput,  # per process
            "parameters": sum(p.numel() for p in model.parameters()),
            **extra,
        }
        return summary

    # ---- console / signals / metrics ----------------------------------------------------------------
    def _stop_requested(self) -> bool:
        stop = torch.tensor([1.0 if self._stop.is_set() else 0.0])
        if self.rt.dist.enabled:
            # every rank must stop at the same step or the collective ops would hang
            stop = all_reduce_sum(stop, self.rt.dist)
        return bool(stop.item() > 0)

    @contextlib.contextmanager
    def _stop_on_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, _frame):
            if self._stop.is_set():  # a second Ctrl-C stops at once
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop.set()
            if self.console is not None and self.rt.dist.is_main:
                self.console.print("[yellow]stopping after this step and saving (Ctrl-C again to abort)[/]")

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _progress(self, description: str, total: int, completed: int):
        if self.console is None or not self.rt.dist.is_main or not self.console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=self.console, transient=True)
        task = progress.add_task(description, total=total, completed=completed)
        progress.start()
        return progress, task

    def _log_epoch(self, record: dict, epochs: int) -> None:
        if not self.rt.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.console is not None:
            val = f" val_acc {record['val_acc']:.4f}" if "val_acc" in record else ""
            speed = f" {record['images_per_s']:.0f} img/s" if record.get("images_per_s") else ""
            self.console.print(
                f"{record['phase']} epoch {record['epoch'] + 1}/{epochs}: loss {record['train_loss']:.4f}"
                f" train_acc {record['train_acc']:.4f}{val}{speed}"
            )

    def _truncate_metrics(self, phase_index: int, epoch: int) -> None:
        """Drop epoch lines written after the checkpoint being resumed (they will be written again)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line and (json.loads(line)["phase_index"], json.loads(line)["epoch"]) < (phase_index, epoch)]
        path.write_text("".join(line + "\n" for line in keep))
