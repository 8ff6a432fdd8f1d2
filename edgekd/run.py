"""`edgekd run`: one command from data to the recommended firmware-ready student.

Stages, in order; each is recorded in OUT/run.json (written atomically) and a re-run of the same command skips
the finished ones:

  select    the K candidates on (or next to) the target's estimated cost front (edgekd.profile.select); checked
            before anything is written, with the teacher, the data's classes and the Ray address
  teacher   the given teacher (a run directory or checkpoint), or one trained / fine-tuned once into OUT/teacher/
            (an ordinary resumable run)
  outputs   the teacher's outputs for every training image and augmentation variant, computed once into the
            disk cache OUT/teacher-cache/ that every candidate shares (the candidates never run the teacher)
  sweep     per candidate an ordinary edgekd run in OUT/candidates/<label>/: distilled with the recipe (resumes
            from its last checkpoint), exported to the target's format and verified, profiled; its state is in
            OUT/candidates/<label>.json. Sequential in this process, or Ray tasks (one per candidate)
  report    OUT/report.json, report.md and a self-contained report.html (edgekd.profile.run_report)

This module sits beside edgekd.api: api.run hands it the API's training functions (`Stages`), so it never imports
the api module (which imports this one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import OptimConfig, TrainConfig
from .errors import EdgekdError

STATE_FILE = "run.json"
STATE_VERSION = 1
RAY_PROBE_TIMEOUT_S = 5.0  # an unreachable --ray-address fails within this, before anything is written
DEFAULT_TEACHER = "efficientnet_lite0"  # ImageNet weights shipped offline: fine-tuned, never trained from scratch


@dataclass(frozen=True)
class Recipe:
    """How every candidate is distilled (and the default teacher fine-tuned). Measured choices, see
    docs/benchmarks.md, section "edgekd run"."""

    epochs: int = 2
    # not train's default (dkd, the 8-epoch winner): at 2 epochs DIST leads (82.41 +- 0.46 vs DKD 82.16 +- 0.47,
    # docs/benchmarks.md "Distillation pays"), and with DKD a 2-epoch digits student failed the int8 gate
    method: str = "dist"
    # short schedules need steps: batch 32 gives 4x the steps of the default 128 on the same images (lr 0.025 =
    # 0.1 per 128 images) and a short warm-up leaves most of them at full rate
    batch_size: int = 32
    lr: float = 0.025
    warmup_epochs: float = 0.25
    teacher_epochs: int = 1
    teacher_resolution: int = 64  # the pretrained teacher is queried at 64 px: at 32 px it learns far worse
    teacher_lr: float = 0.05
    teacher_warmup_epochs: float = 0.5
    # augmentation variants per image whose teacher outputs are cached (the students cycle through them);
    # None: one per epoch, as many distinct views as without a cache
    variants: int | None = None
    checkpoint_interval_s: float = 60.0  # candidates checkpoint at least this often, so a kill loses little


RECIPE = Recipe()


@dataclass(frozen=True)
class RunSpec:
    """What defines a run's results; a re-run must match it (budget, workers, threads and Ray may change)."""

    out_dir: str
    target: str
    data: str
    teacher: str | None  # None: the default teacher, fine-tuned here
    candidates: int | tuple[str, ...]  # K, or NAME@RES labels
    resolution: int | None  # only candidates at this input size (None: select's default sizes)
    limit: int | None
    epochs: int
    teacher_epochs: int
    method: str
    seed: int

    @classmethod
    def make(cls, *, target: str, data: str, teacher: str | None, candidates, resolution: int | None,
             limit: int | None, epochs: int | None, teacher_epochs: int | None, method: str | None, seed: int,
             out_dir) -> "RunSpec":
        if isinstance(candidates, int) and candidates < 1:
            raise EdgekdError(f"--candidates takes a count >= 1 or NAME@RES,...; got {candidates}")
        if not isinstance(candidates, int):
            candidates = tuple(str(c).strip() for c in candidates if str(c).strip())
            if not candidates:
                raise EdgekdError("--candidates: give a count or at least one NAME@RES")
        for name, value in (("epochs", epochs), ("teacher_epochs", teacher_epochs), ("limit", limit),
                            ("resolution", resolution)):
            if value is not None and value < 1:
                raise EdgekdError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        out = str(out_dir) if out_dir else f"runs/run-{target}"
        return cls(out, target, data, teacher, candidates, resolution, limit, epochs or RECIPE.epochs,
                   teacher_epochs or RECIPE.teacher_epochs, method or RECIPE.method, seed)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidates"] = d["candidates"] if isinstance(d["candidates"], int) else list(d["candidates"])
        d.pop("out_dir")
        d["recipe"] = dataclasses.asdict(RECIPE)  # a changed recipe is a different run
        return d


@dataclass(frozen=True)
class Stages:
    """The API functions the stages call (edgekd.api passes its own; they pickle by reference for Ray)."""

    train: Callable[..., dict]
    train_teacher: Callable[..., dict]
    fill_teacher_outputs: Callable[..., dict]


@dataclass(frozen=True)
class CandidateJob:
    """One candidate: an ordinary edgekd run, then export and profile. Runs in this process or a Ray worker."""

    label: str
    macs: float
    config: TrainConfig
    state_path: str
    calib_images: int = 200
    verify_images: int = 1000


# ---- state files ---------------------------------------------------------------------------------------------

def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a resumed run) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise EdgekdError(f"{path} is not valid JSON: it was not written by edgekd run; delete it to start over") from None


# ---- one candidate -------------------------------------------------------------------------------------------

def run_candidate(job: CandidateJob, stages: Stages, threads: int | None = None, console=None) -> dict:
    """Distil (or resume), export and verify, profile one candidate; each step skipped when its output exists.

    Bad input for this candidate (EdgekdError, e.g. an export that does not fit the target) comes back as a
    failed result; anything else propagates so that the caller can retry the candidate once."""
    import torch

    from .export.pipeline import export
    from .profile.profiler import profile_one, resolve_source
    from .targets import load_target

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    run_dir, state_path = Path(job.config.run_dir), Path(job.state_path)
    state = read_json(state_path) or {}
    state.update(state="running", pid=os.getpid(), host=socket.gethostname(), attempts=state.get("attempts", 0) + 1,
                 threads=torch.get_num_threads(), error=None)
    state.setdefault("seconds", {})
    write_json(state_path, state)

    def step(name: str, fn) -> None:
        started = time.monotonic()
        fn()
        state["seconds"][name] = state["seconds"].get(name, 0.0) + time.monotonic() - started
        write_json(state_path, state)

    try:
        target = load_target(job.config.target)
        if not (run_dir / "summary.json").exists():
            if (run_dir / "last.pt").exists():
                step("train", lambda: stages.train(TrainConfig(run_dir=str(run_dir)), resume=True, console=console))
            else:
                shutil.rmtree(run_dir, ignore_errors=True)  # stopped before its first checkpoint: nothing to keep
                step("train", lambda: stages.train(job.config, console=console))
        bundle = run_dir / "export" / f"{target.export.format}-{target.export.precision}"
        if not (bundle / "manifest.json").exists():  # a bundle appears only after verification passed
            step("export", lambda: export(run_dir, target=target, calib_images=job.calib_images,
                                          verify_images=job.verify_images, console=console))
        profile_path = run_dir / "profile.json"
        if not profile_path.exists():
            step("profile", lambda: write_json(profile_path, profile_one(resolve_source(str(run_dir)), target, ())))
        state.update(state="done", result=_candidate_row(job, run_dir, bundle, profile_path))
    except EdgekdError as e:
        state.update(state="failed", error=str(e))
    finally:
        torch.set_num_threads(previous_threads)
        if state["state"] == "running":  # an unexpected exception: the caller decides (retry once, or failed)
            state["state"] = "interrupted"
        write_json(state_path, state)
    return state


def _candidate_row(job: CandidateJob, run_dir: Path, bundle: Path, profile_path: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    profile = json.loads(profile_path.read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    acc = profile.get("accuracy") or {}
    measured, estimate = profile["measured"], profile["estimate"]
    files = sorted(p.name for p in bundle.iterdir() if p.is_file())
    return {
        "label": job.label, "model": summary["student"]["name"], "resolution": summary["resolution"],
        "macs": estimate["macs"], "params": summary.get("parameters"),
        "accuracy": {"float": summary.get("test_acc"), "test_images": summary["data"]["sizes"]["test"],
                     "deployed": acc.get("exported"), "deployed_runtime": acc.get("exported_runtime"),
                     "deployed_images": acc.get("exported_images"), "val": summary.get("val_acc")},
        "latency_ms": estimate["latency_ms"],
        "sram_bytes": measured.get("tflm_arena_bytes", estimate["sram_bytes"]),
        "flash_bytes": measured.get("tflite_bytes", manifest["artifact"]["bytes"]),
        "sram_measured": "tflm_arena_bytes" in measured,
        "teacher_cache": {k: (summary.get("teacher_cache") or {}).get(k) for k in ("total_hits", "total_misses")},
        "artifact": {"bundle": str(bundle), "format": manifest.get("format"), "precision": manifest.get("precision"),
                     "files": files},
        "run_dir": str(run_dir), "epochs": summary.get("epochs"), "train_images_per_s": summary.get("train_images_per_s"),
    }


# ---- the run -------------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self, budget_minutes: float | None):
        self.started = time.monotonic()
        self.budget_s = None if budget_minutes is None else 60.0 * budget_minutes

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def spent(self) -> bool:
        return self.budget_s is not None and self.elapsed >= self.budget_s


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, markup=False, highlight=False)


def execute(spec: RunSpec, stages: Stages, *, budget_minutes: float | None = None, workers: int = 1,
            ray_address: str | None = None, threads: int | None = None, console=None) -> dict:
    """Run (or continue) every stage; returns the report. See the module docstring."""
    from .targets import load_target

    clock = _Clock(budget_minutes)
    if budget_minutes is not None and budget_minutes <= 0:
        raise EdgekdError(f"--budget-minutes must be > 0, got {budget_minutes:g}")
    if workers < 1 or (threads is not None and threads < 1):
        raise EdgekdError("--workers and --threads must be >= 1")
    target = load_target(spec.target)
    out = Path(spec.out_dir)
    state = read_json(out / STATE_FILE)
    if state is not None and state.get("spec") != spec.to_dict():
        differ = sorted(k for k, v in spec.to_dict().items() if state.get("spec", {}).get(k) != v)
        raise EdgekdError(f"{out} holds a run with other settings ({', '.join(differ)} differ): re-run it with its own "
                          f"options (see {out / STATE_FILE}) or choose another --out")
    # everything that can be refused is checked before anything is written
    needs_teacher = _check_method(spec)
    if ray_address is not None and ray_address not in ("auto", "local"):
        _probe(ray_address)  # first: an unreachable cluster fails in seconds
    info = _data_info(spec)
    teacher_check = None
    if needs_teacher and spec.teacher and _is_checkpoint(spec.teacher):
        teacher_check = _check_given_teacher(spec, info)
    elif needs_teacher and spec.teacher:
        from .models import get_model_info

        get_model_info(spec.teacher)  # an unknown zoo name: one line with the closest names
    plan = state["select"] if state else _select(spec, target, info["num_classes"])
    if state is None and clock.spent():
        raise EdgekdError(f"--budget-minutes was spent after {clock.elapsed / 60:.2f} min, before the teacher "
                          "trained: nothing was trained; give a larger budget (or none)")
    if state is None:
        state = {"version": STATE_VERSION, "spec": spec.to_dict(), "select": plan, "stages": {}}
        write_json(out / STATE_FILE, state)
        _say(console, f"run {out}: {len(plan['candidates'])} candidates for {target.name}: "
                      + ", ".join(c["label"] for c in plan["candidates"]))
    else:
        _say(console, f"continuing run {out} (finished stages are skipped)")
    runner = _Runner(spec, stages, target, out, state, clock, console)
    if needs_teacher:
        runner.teacher(teacher_check)
        runner.outputs()
    runner.sweep(lambda: _connect_ray(workers, ray_address, console), workers, threads, local=ray_address is None)
    return runner.report()


def _check_method(spec: RunSpec) -> bool:
    """Whether the recipe's method needs a teacher (an unknown method fails here, before anything is written)."""
    from .distill import METHODS

    return METHODS.get(spec.method).requires_teacher


def _takes_only_logits(method: str) -> bool:
    from .distill import takes_only_logits  # lazily: the CLI imports run.py and should start fast

    return takes_only_logits(method)


def _is_checkpoint(teacher: str) -> bool:
    return teacher.endswith((".pt", ".pth")) or Path(teacher).is_dir() or "/" in teacher


def _data_info(spec: RunSpec) -> dict:
    from .data.datamodule import load_data

    data = load_data(spec.data, resolution=8, channels=1, seed=0, limit=spec.limit)
    return {"num_classes": data.info.num_classes, "class_names": list(data.info.class_names),
            "train_images": len(data.train)}


def _check_given_teacher(spec: RunSpec, info: dict) -> dict:
    """A given teacher must predict the data's classes, in the same order."""
    from .train.checkpoint import load_model, resolve_model_file

    path = resolve_model_file(Path(spec.teacher))
    if not path.exists():
        raise EdgekdError(f"teacher {spec.teacher} does not exist: pass a run directory or a .pt checkpoint")
    _, payload = load_model(path)
    names = list((payload.get("data") or {}).get("class_names") or [])
    if names and names != info["class_names"]:
        raise EdgekdError(f"teacher {spec.teacher} was trained on other classes ({', '.join(names[:4])}, ...) than "
                          f"{spec.data} has ({', '.join(info['class_names'][:4])}, ...): pass a teacher trained on "
                          "this data, or leave --teacher out to fine-tune one")
    if payload["model_config"].get("num_classes") != info["num_classes"]:
        raise EdgekdError(f"teacher {spec.teacher} predicts {payload['model_config'].get('num_classes')} classes but "
                          f"{spec.data} has {info['num_classes']}: pass a teacher trained on this data")
    return {"path": spec.teacher, "name": payload["model_config"]["name"],
            "resolution": (payload.get("data") or {}).get("resolution"),
            "test_acc": (payload.get("metrics") or {}).get("test_acc")}


def _select(spec: RunSpec, target, num_classes: int) -> dict:
    """The candidates: given NAME@RES labels as they are, else K spread along the fitting cost front."""
    from .profile import select as sel

    if not isinstance(spec.candidates, int):
        chosen = sel.candidates_from_specs(list(spec.candidates), [spec.resolution] if spec.resolution else None)
        rows = [sel.estimate_candidate(c, target, num_classes) for c in chosen]
        how = "given"
    else:
        pool = sel.default_candidates(target)
        if spec.resolution:
            pool = [sel.Candidate(m, spec.resolution) for m in dict.fromkeys(c.model for c in pool)]
        result = sel.select(target, pool, num_classes)  # no candidate fits: one line naming the closest's misses
        front = sorted(result.front, key=lambda r: -r["macs"])
        near = sorted((r for r in result.rows if not r["misses"] and not r["pareto"]), key=lambda r: -r["macs"])
        rows = _spread(front, spec.candidates) + near[:max(0, spec.candidates - len(front))]
        how = (f"{len(rows)} of the {len(front)} on the estimated cost front of the {len(result.rows)} zoo students "
               f"that select considered, spread from the most to the least compute")
    rows = sorted(rows, key=lambda r: -r["macs"])
    labels = [r["candidate"] for r in rows]
    if len(set(labels)) != len(labels):
        raise EdgekdError(f"--candidates names one student twice: {', '.join(labels)}")
    return {"how": how, "candidates": [
        {"label": r["candidate"], "model": r["model"], "resolution": r["resolution"], "width_mult": r["width_mult"],
         "model_options": {k: v for k, v in r["model_options"].items() if k not in target.model_options},
         "macs": r["macs"], "estimate": {k: r[k] for k in ("sram_bytes", "flash_bytes", "latency_ms")},
         "estimated_misses": r["misses"]} for r in rows]}


def _spread(front: list[dict], k: int) -> list[dict]:
    """k of the front (sorted by MACs, most first), evenly spaced by rank: always the largest and the smallest."""
    if k >= len(front):
        return list(front)
    if k == 1:
        return [front[0]]
    picks = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)})
    return [front[i] for i in picks]


# ---- Ray -----------------------------------------------------------------------------------------------------

def _connect_ray(workers: int, address: str | None, console):
    """The Ray module, initialised (a local instance for workers > 1, else the cluster at `address`), or None to
    run the candidates one after another in this process."""
    if address is None and workers == 1:
        return None
    try:
        import ray
    except ImportError:
        if address is not None:
            raise EdgekdError("--ray-address needs Ray: pip install 'edgekd[ray]'") from None
        _say(console, f"note: Ray is not installed (pip install 'edgekd[ray]'), so the {workers} workers become one: "
                      "candidates run one after another")
        return None
    try:
        if address is None:
            # address "local": a new instance of our own, even where another Ray instance runs on this machine
            # worker_niceness 0: Ray runs its workers at nice 15 by default, starved beside any other load
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", _system_config={"worker_niceness": 0})
        else:  # reachable (probed before anything was written); Ray bounds its own connection attempts
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ...: all mean no cluster
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise EdgekdError(f"could not start or reach {where}: {reason}") from None
    return ray


def _probe(address: str) -> None:
    """Fail fast (a bounded TCP connect) when nothing listens at HOST:PORT."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise EdgekdError("--ray-address needs Ray: pip install 'edgekd[ray]'") from None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise EdgekdError(f"--ray-address must be HOST:PORT (or ray://HOST:PORT, auto), got '{address}'")
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise EdgekdError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): start it with "
                          "`ray start --head` there, or leave --ray-address out to run locally") from None


# ---- the stages ----------------------------------------------------------------------------------------------

class _Runner:
    def __init__(self, spec: RunSpec, stages: Stages, target, out: Path, state: dict, clock: _Clock, console):
        self.spec, self.stages, self.target, self.out, self.state = spec, stages, target, out, state
        self.clock, self.console = clock, console
        self.stage_seconds: dict[str, float] = {}

    # -- bookkeeping
    def _save(self) -> None:
        write_json(self.out / STATE_FILE, self.state)

    def _stage(self, name: str) -> dict:
        return self.state["stages"].setdefault(name, {"state": "pending"})

    def _finish(self, stage_name: str, started: float, **data) -> None:
        stage = self._stage(stage_name)
        stage.update(state="done", seconds=stage.get("seconds", 0.0) + time.monotonic() - started, **data)
        self._save()

    def _budget_check(self, what: str) -> None:
        if self.clock.spent():
            raise EdgekdError(f"--budget-minutes was spent after {self.clock.elapsed / 60:.1f} min, before {what}: "
                              "nothing was trained; give a larger budget (or none) and run the same command again")

    # -- teacher
    def teacher(self, given: dict | None) -> None:
        stage = self._stage("teacher")
        if stage["state"] == "done":
            _say(self.console, f"teacher: done ({stage['path']})")
            return
        started = time.monotonic()
        if given is not None:
            self._finish("teacher", started, path=given["path"], name=given["name"], source="given",
                         resolution=given["resolution"], test_acc=given["test_acc"])
            return
        self._budget_check("the teacher trained")
        name = self.spec.teacher or DEFAULT_TEACHER
        pretrained = name == DEFAULT_TEACHER
        # the pretrained teacher learns far better at 64 px than at 32 (docs/benchmarks.md); others at the students'
        resolution = max([RECIPE.teacher_resolution if pretrained else 0]
                         + [c["resolution"] for c in self.state["select"]["candidates"]])
        stage.update(state="running")
        self._save()
        _say(self.console, f"teacher: {'fine-tuning the ImageNet' if pretrained else 'training'} {name} at "
                           f"{resolution} px for {self.spec.teacher_epochs} epoch(s)")
        config = self._base_config(self.out).replace(
            teacher=name, teacher_pretrained=pretrained, teacher_epochs=self.spec.teacher_epochs,
            teacher_resolution=resolution, resolution=min(c["resolution"] for c in self.state["select"]["candidates"]),
            teacher_optim=OptimConfig(lr=RECIPE.teacher_lr, warmup_epochs=RECIPE.teacher_warmup_epochs))
        info = self.stages.train_teacher(config, console=self.console)
        self._finish("teacher", started, path=str(self.out / "teacher"), name=name,
                     source=f"{'ImageNet weights fine-tuned' if pretrained else 'trained'} here, "
                            f"{self.spec.teacher_epochs} epoch(s)",
                     resolution=resolution, test_acc=info.get("test_acc"))

    # -- configs
    def _base_config(self, run_dir: Path) -> TrainConfig:
        return TrainConfig(run_dir=str(run_dir), data=self.spec.data, target=self.spec.target, limit=self.spec.limit,
                           seed=self.spec.seed, checkpoint_interval_s=RECIPE.checkpoint_interval_s)

    def candidate_config(self, c: dict) -> TrainConfig:
        teacher = self.state["stages"].get("teacher") or {}
        logits_only = _takes_only_logits(self.spec.method) and bool(teacher)
        t_res = teacher.get("resolution")
        options = dict(c["model_options"])
        if c.get("width_mult") is not None:
            options["width_mult"] = c["width_mult"]
        return self._base_config(self.out / "candidates" / c["label"]).replace(
            student=c["model"], student_options=options, resolution=c["resolution"], teacher=teacher.get("path"),
            teacher_resolution=t_res if logits_only and t_res and t_res > c["resolution"] else None,
            teacher_cache="disk" if logits_only else "auto", teacher_cache_dir=str(self.out / "teacher-cache"),
            teacher_cache_variants=(RECIPE.variants or self.spec.epochs) if logits_only else 0, method=self.spec.method,
            epochs=self.spec.epochs, batch_size=RECIPE.batch_size,
            optim=OptimConfig(lr=RECIPE.lr, warmup_epochs=RECIPE.warmup_epochs))

    # -- teacher outputs
    def outputs(self) -> None:
        stage = self._stage("outputs")
        if stage["state"] == "done":
            return
        if not _takes_only_logits(self.spec.method):
            stage.update(state="skipped", note=f"{self.spec.method} runs its teacher live")
            self._save()
            return
        self._budget_check("the teacher's outputs were cached")
        started = time.monotonic()
        stage.update(state="running")
        self._save()
        per_resolution = {}
        for c in self.state["select"]["candidates"]:  # the cache key holds the student's resolution
            per_resolution.setdefault(c["resolution"], c)
        stats = {}
        for resolution, c in sorted(per_resolution.items()):
            _say(self.console, f"teacher outputs: caching them for every training image x "
                               f"{RECIPE.variants or self.spec.epochs} augmentation variant(s) ({resolution} px students)")
            s = self.stages.fill_teacher_outputs(self.candidate_config(c), console=self.console)
            stats[str(resolution)] = {k: s[k] for k in ("entries", "entries_filled", "bytes", "directory")}
        self._finish("outputs", started, caches=stats)

    # -- sweep
    def jobs(self) -> list[CandidateJob]:
        return [CandidateJob(c["label"], c["macs"], self.candidate_config(c),
                             str(self.out / "candidates" / f"{c['label']}.json"))
                for c in self.state["select"]["candidates"]]

    def sweep(self, connect_ray, workers: int, threads: int | None, local: bool) -> None:
        stage = self._stage("sweep")
        started = time.monotonic()
        jobs = self.jobs()
        # failed candidates stay failed (their reason is in the report); delete OUT/candidates/<label>.json to retry
        todo = [j for j in jobs if (read_json(Path(j.state_path)) or {}).get("state") not in ("done", "failed")]
        finished_before = len(jobs) - len(todo)
        if not todo:
            if stage["state"] != "done":
                self._finish("sweep", started)
            return
        if self.clock.spent() and not finished_before:
            self._budget_check("any candidate was trained")
        stage.update(state="running")
        self._save()
        for job in todo:  # each candidate's config, for training it out of band (torchrun: see the README)
            path = Path(job.state_path).with_suffix(".config.yaml")
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                job.config.save(Path(tmp))
                os.replace(tmp, path)
        ray = connect_ray()  # only now: its processes would idle beside the teacher
        if ray is None:
            self._sequential(todo, threads or os.cpu_count() or 1)
        else:
            try:
                self._ray(ray, todo, workers, threads, local)
            finally:
                ray.shutdown()
        states = [(read_json(Path(j.state_path)) or {}).get("state") for j in jobs]
        if all(s in ("done", "failed") for s in states):
            self._finish("sweep", started)
        else:
            self._pause("sweep", started)
        if not any(s == "done" for s in states) and self.clock.spent():
            self._budget_check("any candidate finished")

    def _pause(self, name: str, started: float) -> None:
        stage = self._stage(name)
        stage.update(state="incomplete", seconds=stage.get("seconds", 0.0) + time.monotonic() - started)
        self._save()

    def _launchable(self, job: CandidateJob) -> bool:
        if self.clock.spent():
            _say(self.console, f"{job.label}: not launched, --budget-minutes spent "
                               f"({self.clock.elapsed / 60:.1f} min); run the same command again to continue")
            state = read_json(Path(job.state_path)) or {}
            if state.get("state") != "done":
                write_json(Path(job.state_path), {**state, "state": "not run", "error": "budget spent"})
            return False
        return True

    def _announce(self, job: CandidateJob, result: dict) -> None:
        if result.get("state") == "done":
            r = result["result"]
            acc = r["accuracy"]
            _say(self.console, f"{job.label}: done, test accuracy {100 * acc['float']:.2f}% (float), "
                               + (f"{100 * acc['deployed']:.2f}% deployed, " if acc.get("deployed") is not None else "")
                               + f"{r['artifact']['bundle']}")
        else:
            _say(self.console, f"{job.label}: {result.get('state')}: {result.get('error')}")

    def _sequential(self, todo: list[CandidateJob], threads: int) -> None:
        from .train.trainer import TrainingInterrupted

        for i, job in enumerate(todo):
            if not self._launchable(job):
                continue
            _say(self.console, f"candidate {i + 1}/{len(todo)}: {job.label} ({threads} thread(s))")
            for attempt in (1, 2):  # an unexpected crash is retried once, then reported
                try:
                    result = run_candidate(job, self.stages, threads, self.console)
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except TrainingInterrupted:
                    raise TrainingInterrupted(f"stopped in candidate {job.label}, its state saved: run the same "
                                              "edgekd run command again to continue") from None
                except Exception as e:
                    result = {"state": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                    if attempt == 1:
                        _say(self.console, f"{job.label}: crashed ({result['error']}); retrying once")
            if result.get("state") == "failed" and "result" not in result:
                state = read_json(Path(job.state_path)) or {}
                write_json(Path(job.state_path), {**state, "state": "failed", "error": result["error"]})
            self._announce(job, result)

    def _ray(self, ray, todo: list[CandidateJob], workers: int, threads: int | None, local: bool) -> None:
        cluster = int(ray.cluster_resources().get("CPU", workers))
        # N workers on C cores: C/N torch threads each; a local instance has N slots of one "CPU" each
        per_task = threads or max(1, (os.cpu_count() or 1 if local else cluster) // workers)
        task = ray.remote(num_cpus=1 if local else min(per_task, cluster), max_retries=1, retry_exceptions=True)(
            run_candidate)
        _say(self.console, f"sweep on Ray: {len(todo)} candidate task(s), {workers} at a time, {per_task} torch "
                           f"thread(s) each ({'local instance' if local else f'cluster of {cluster} CPUs'})")
        pending, inflight = list(todo), {}
        try:
            self._ray_loop(ray, task, pending, inflight, workers, per_task)
        except KeyboardInterrupt:  # Ctrl-C: stop the tasks now; each candidate resumes from its last checkpoint
            for ref in inflight:
                ray.cancel(ref, force=True)
            raise

    def _ray_loop(self, ray, task, pending: list, inflight: dict, workers: int, per_task: int) -> None:
        last_note = time.monotonic()
        while pending or inflight:
            while pending and len(inflight) < workers:
                job = pending.pop(0)
                if self._launchable(job):
                    inflight[task.remote(job, self.stages, per_task, None)] = job
                    _say(self.console, f"{job.label}: launched")
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)  # short: Ctrl-C is seen
            if not ready:
                if time.monotonic() - last_note > 60:
                    _say(self.console, "running: " + "; ".join(_progress_note(j) for j in inflight.values()))
                    last_note = time.monotonic()
                continue
            for ref in ready:
                job = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the task died (or raised) twice: report it, keep the others going
                    first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                    result = {"state": "failed", "error": f"task failed after a retry: {first}"}
                    state = read_json(Path(job.state_path)) or {}
                    write_json(Path(job.state_path), {**state, "state": "failed", "error": result["error"]})
                self._announce(job, result)

    # -- report
    def report(self) -> dict:
        from .profile import run_report

        started = time.monotonic()
        rows = []
        for job, c in zip(self.jobs(), self.state["select"]["candidates"]):
            s = read_json(Path(job.state_path)) or {}
            row = dict(s.get("result") or {"label": c["label"], "model": c["model"], "resolution": c["resolution"],
                                            "macs": c["macs"]})
            row.update(state=s.get("state", "not run"), error=s.get("error"), attempts=s.get("attempts", 0),
                       seconds=s.get("seconds", {}))
            if row["state"] == "done":
                row["misses"] = run_report.misses(row, self.target)
            rows.append(row)
        teacher = self.state["stages"].get("teacher", {})
        report = {"target": self.target.name, "data": self.spec.data, "out_dir": str(self.out),
                  "spec": self.spec.to_dict(), "selection": self.state["select"]["how"],
                  "teacher": {k: teacher.get(k) for k in ("name", "source", "path", "resolution", "test_acc")},
                  "recipe_text": _recipe_text(self.spec, self.state), "candidates": rows,
                  "fronts": run_report.fronts(rows), "notes": []}
        try:
            report["recommended"] = run_report.recommend(rows, self.target)
        except EdgekdError as e:
            report["recommended"], report["no_recommendation"] = None, str(e)
        not_run = [r["label"] for r in rows if r["state"] not in ("done", "failed")]
        if not_run:
            report["notes"].append(f"not run yet: {', '.join(not_run)} (--budget-minutes spent or interrupted); run "
                                   "the same command again to continue")
        self._stage("report")
        report["stages"] = {k: v for k, v in self.state["stages"].items() if k != "report"}
        report["wall_seconds_this_invocation"] = self.clock.elapsed
        markdown = run_report.markdown(report, self.target)
        page = run_report.html(report, self.target)
        write_json(self.out / "report.json", report)
        for name, text in (("report.md", markdown), ("report.html", page)):
            fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.out / name)
        self._finish("report", started, candidates={r["label"]: r["state"] for r in rows})
        _say(self.console, f"report: {self.out / 'report.md'}, {self.out / 'report.html'}")
        if report["recommended"]:
            _say(self.console, f"recommended: {report['recommended']['label']}, {report['recommended']['reason']}")
            _say(self.console, f"firmware-ready artifact: {report['recommended']['artifact']['bundle']}")
        elif any(r["state"] == "done" for r in rows):
            raise EdgekdError(report["no_recommendation"])
        else:
            states = ", ".join(f"{r['label']}: {r['state']}" for r in rows)
            raise EdgekdError(f"no candidate finished ({states}); the report says why: {self.out / 'report.md'}")
        return report


def _progress_note(job: CandidateJob) -> str:
    metrics = Path(job.config.run_dir) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if not lines:
        return f"{job.label} starting"
    last = json.loads(lines[-1])
    val = f", val {100 * last['val_acc']:.1f}%" if "val_acc" in last else ""
    return f"{job.label} epoch {last['epoch'] + 1}/{job.config.epochs}{val}"


def _recipe_text(spec: RunSpec, state: dict) -> str:
    limit = f"{spec.limit} training images" if spec.limit else "all training images"
    return (f"{spec.data}, {limit}; each candidate distilled with {spec.method} for {spec.epochs} epoch(s) (seed "
            f"{spec.seed}) from the teacher's cached outputs ({RECIPE.variants or spec.epochs} augmentation variant(s) per image); "
            f"candidates: {state['select']['how']}")
