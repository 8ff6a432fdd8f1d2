"""Teacher outputs without paying for the teacher every step.

`TeacherRunner` makes live teacher inference cheap (inference mode, BatchNorm folded into convolutions,
channels_last, optional autocast and torch.compile). `TeacherCache` keeps the teacher's logits per
(training image, augmentation variant), in memory or memory-mapped on disk, so a variant the teacher has
seen is never run again: within a run when augmentation is off or banked (fast knowledge distillation,
Shen & Xing 2021), and across runs with the same teacher, data and transform. The cache is keyed by a hash of
everything that determines the logits; a mismatch means a different cache, never a stale one.

Distillers whose `teacher_needs` (distill/step.py) name taps (module paths: AT, NST, FitNets, AB, FSP, RKD) get
the tapped teacher feature maps cached beside the logits, one flat row per (image, variant). Rows are float32, or
float16 to halve the cache (served as float32, rounded the same whether just computed or read back). A cache
lives in memory within the memory budget, else (teacher_cache auto) memory-mapped on disk when the disk has room,
else the teacher runs live every step (the runner still makes it cheaper), and the run says so.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgekdError
from ..models.fold import fold_batchnorm
from ..resources import DEFAULT_CACHE_DIR
from .features import run_with_taps

log = logging.getLogger("edgekd.teacher")

CACHE_VERSION = 1
TEACHER_CACHE_DIR = DEFAULT_CACHE_DIR / "teacher-outputs"  # disk caches, unless teacher_cache_dir says otherwise
DTYPES = {"float32": np.float32, "float16": np.float16}
TEACHER_BATCH = 16  # TeacherOutputs' fixed teacher batch (its `chunk`), at most the training batch
DISK_RESERVE_BYTES = 1 << 30  # a disk cache leaves this much free: the run still has checkpoints to write


def _folded(teacher: nn.Module) -> nn.Module:
    model, folded = fold_batchnorm(teacher)
    if not folded:
        raise EdgekdError(f"cannot fold BatchNorm of {type(teacher).__name__} (torch.fx cannot trace it): "
                          "set teacher_fold_bn: false")
    return model


class TeacherRunner:
    """Runs the frozen teacher as fast as the settings allow; outputs are float32 logits (and, with `taps`, the
    float32 feature maps at those module paths). With taps, BatchNorm is not folded and nothing is compiled: the
    fx-folded graph calls leaf modules only, so hooks on stage containers would never fire, and hooks added per
    call would recompile a compiled model."""

    def __init__(self, teacher: nn.Module, device: torch.device, *, fold_bn: bool = True,
                 autocast: str = "off", compile: bool = False, channels_last: bool | None = None,
                 taps: tuple[str, ...] = ()):
        if autocast not in ("off", "bf16", "fp16"):
            raise EdgekdError(f"teacher_autocast must be off, bf16 or fp16, got '{autocast}'")
        if autocast == "fp16" and device.type != "cuda":
            raise EdgekdError("teacher_autocast fp16 needs a CUDA GPU: use bf16 or off on CPU")
        # note: bf16 on a CPU without native bf16 units was measured ~20x slower than fp32; it is opt-in
        self.taps = tuple(taps)
        fold_bn, compile = fold_bn and not self.taps, compile and not self.taps
        self.settings = {"fold_bn": fold_bn, "autocast": autocast, "compile": compile,
                         **({"taps": list(self.taps)} if self.taps else {})}
        model = _folded(teacher) if fold_bn else copy.deepcopy(teacher).eval()
        # channels_last measured 1.9x faster for a ResNet-18 teacher on this project's x86 CPU too (docs/benchmarks.md)
        self.channels_last = True if channels_last is None else channels_last
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = torch.compile(model) if compile else model
        self.device = device
        self.dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, feature maps at the taps), float32, contiguous."""
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            out, feats = run_with_taps(self.model, x, self.taps) if self.taps else (self.model(x), [])
        # cloned outside inference mode: plain tensors, which a loss may save for backward (MSE to a hint does)
        return out.float().clone(), [f.float().contiguous().clone() for f in feats]

    def row_shapes(self, sample_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Per-image shapes of (logits, features...), from one blank forward."""
        logits, feats = self.outputs(torch.zeros(1, *sample_shape))
        return [tuple(t.shape[1:]) for t in (logits, *feats)]


def state_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(images) -> str:
    """Hash of the training images' pixels and labels (in-memory sets) or their file list (lazy sets)."""
    digest = hashlib.sha256()
    parts = getattr(images, "parts", None)  # ConcatImageSet, LabelsReplaced: hash what they serve
    if parts is not None or hasattr(images, "base"):
        for part in parts if parts is not None else [images.base]:
            digest.update(images_fingerprint(part).encode())
        digest.update(images.labels.numpy().tobytes())
        return digest.hexdigest()
    tensor = getattr(images, "images", None)
    if tensor is not None:
        digest.update(tensor.contiguous().numpy().tobytes())
    else:
        digest.update(json.dumps([str(p) for p in getattr(images, "paths", [])]).encode())
    digest.update(images.labels.numpy().tobytes())
    return digest.hexdigest()


def cache_bytes(num_images: int, variants: int, width: int, dtype: str = "float32") -> int:
    return num_images * max(variants, 1) * width * np.dtype(DTYPES[dtype]).itemsize


def disk_room(directory: Path) -> int:
    """Bytes a disk cache under `directory` may take (free space less the reserve)."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free - DISK_RESERVE_BYTES


class TeacherCache:
    """One row per (image, variant): [N, K, width] (width = classes, plus the flattened tapped features for
    feature distillers) in float32 or float16, and a filled mask; in memory (within `memory_budget_bytes`) or
    memory-mapped under `directory` (within the disk's free space)."""

    def __init__(self, key: dict, num_images: int, variants: int, width: int, *,
                 directory: Path | None = None, memory_budget_bytes: int = 1 << 30, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise EdgekdError(f"teacher_cache_dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.shape = (num_images, max(variants, 1), width)
        self.dtype = dtype
        self.nbytes = cache_bytes(num_images, variants, width, dtype)
        if directory is None and self.nbytes > memory_budget_bytes:
            raise EdgekdError(
                f"the teacher cache would need {self.nbytes / 2**20:.0f} MiB (> budget {memory_budget_bytes / 2**20:.0f} MiB):"
                " raise teacher_cache_budget_mb, use teacher_cache_dtype float16 or teacher_cache disk, lower "
                "teacher_cache_variants, or set teacher_cache: off"
            )
        # float32 caches keep the key they always had, so existing caches stay valid
        self.key = {**key, "version": CACHE_VERSION, "shape": list(self.shape),
                    **({"dtype": dtype} if dtype != "float32" else {})}
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.directory = Path(directory) / self.digest[:24] if directory is not None else None
        self.hits = self.misses = 0  # since the last stats(reset=True)
        self.total_hits = self.total_misses = 0
        if self.directory is None:
            self.rows = np.zeros(self.shape, dtype=DTYPES[self.dtype])
            self.filled = np.zeros(self.shape[:2], dtype=bool)
            self.warm_entries = 0
        else:
            self._open_disk()

    # ---- disk ---------------------------------------------------------------------------------------
    def _open_disk(self) -> None:
        meta_path = self.directory / "meta.json"
        meta = None
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = None
            if meta != self.key:  # same digest prefix but different content: never reuse
                log.warning("teacher cache %s does not match this run; rebuilding it", self.directory)
                shutil.rmtree(self.directory)
        data_path = self.directory / ("logits.f32" if self.dtype == "float32" else "rows.f16")
        if not data_path.exists() and self.nbytes > disk_room(self.directory.parent):
            raise EdgekdError(
                f"the teacher cache would need {self.nbytes / 2**20:.0f} MiB on disk and {self.directory.parent} has "
                f"{max(disk_room(self.directory.parent), 0) / 2**20:.0f} MiB to spare: free space, use "
                "teacher_cache_dtype float16, lower teacher_cache_variants, or set teacher_cache: off")
        self.directory.mkdir(parents=True, exist_ok=True)
        mode = "r+" if data_path.exists() else "w+"
        self.rows = np.memmap(data_path, dtype=DTYPES[self.dtype], mode=mode, shape=self.shape)
        filled_path = self.directory / "filled.npy"
        self.filled = np.load(filled_path) if filled_path.exists() else np.zeros(self.shape[:2], dtype=bool)
        if self.filled.shape != self.shape[:2]:
            raise EdgekdError(f"teacher cache {self.directory} is damaged (mask shape): delete the directory")
        if meta != self.key:  # atomically: runs sharing the cache (edgekd run's candidates) may read it meanwhile
            tmp = self.directory / f".meta.{os.getpid()}.json"
            tmp.write_text(json.dumps(self.key, sort_keys=True))
            os.replace(tmp, meta_path)
        self.warm_entries = int(self.filled.sum())

    def flush(self) -> None:
        """Persist: rows first, then the mask that claims them (atomic rename), so a crash never claims garbage."""
        if self.directory is None:
            return
        self.rows.flush()
        tmp = self.directory / f".filled.{os.getpid()}.tmp.npy"  # per process: runs may share the cache
        np.save(tmp, self.filled)
        os.replace(tmp, self.directory / "filled.npy")

    # ---- lookups ------------------------------------------------------------------------------------
    def lookup(self, index: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit mask (B,), rows (B, width) where hit)."""
        i, v = index.numpy(), variant.numpy()
        hit = torch.from_numpy(self.filled[i, v].copy())
        rows = torch.from_numpy(np.asarray(self.rows[i, v], dtype=np.float32))
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += len(hit) - n_hit
        self.total_hits += n_hit
        self.total_misses += len(hit) - n_hit
        return hit, rows

    def store(self, index: torch.Tensor, variant: torch.Tensor, rows: torch.Tensor) -> None:
        i, v = index.numpy(), variant.numpy()
        self.rows[i, v] = rows.detach().cpu().float().numpy().astype(DTYPES[self.dtype])
        self.filled[i, v] = True

    def rounded(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` as a lookup would return them after a store: a step serves the same values either way."""
        return rows if self.dtype == "float32" else rows.to(torch.float16).float()

    def stats(self, reset: bool = False) -> dict:
        """Hit counts since the last reset (the trainer resets every epoch) and fill level."""
        total = self.hits + self.misses
        out = {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
               "total_hits": self.total_hits, "total_misses": self.total_misses,
                "entries_filled": int(self.filled.sum()), "entries": int(np.prod(self.shape[:2])),
                "warm_entries_at_start": self.warm_entries, "bytes": self.nbytes, "dtype": self.dtype,
                "directory": str(self.directory) if self.directory else None}
        if reset:
            self.hits = self.misses = 0
        return out


class TeacherOutputs:
    """What the trainer asks for teacher outputs: cache first, the fast runner for the misses."""

    def __init__(self, runner: TeacherRunner, cache: TeacherCache | None,
                 row_shapes: list[tuple[int, ...]] | None = None, chunk: int | None = None):
        self.runner = runner
        self.cache = cache
        self.row_shapes = row_shapes  # (logits, features...) per image; needed to cache features
        # misses run in batches of exactly `chunk` images (the last zero-padded): a CPU GEMM's result for an
        # image depends on the batch size it ran in, so a row must not depend on which images missed with it,
        # or a resumed run that refills rows lost with an in-memory cache would not train exactly as before
        self.chunk = chunk
        if cache is not None and runner.taps and row_shapes is None:
            raise ValueError("caching teacher features needs their row_shapes")

    def logits(self, x, index: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        return self.with_features(x, index, variant)[0]

    def with_features(self, x, index: torch.Tensor,
                      variant: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`x`: the teacher's input batch, or a function that makes it (called only if the teacher runs)."""
        if self.cache is None:
            logits, feats = self._outputs(x() if callable(x) else x)
            return logits.to(self.runner.device), [f.to(self.runner.device) for f in feats]
        hit, rows = self.cache.lookup(index, variant)
        if not bool(hit.all()):
            x = x() if callable(x) else x
            miss = ~hit
            fresh = self._rows(x[miss.to(x.device)])
            self.cache.store(index[miss], variant[miss], fresh)
            rows[miss] = self.cache.rounded(fresh)
        rows = rows.to(self.runner.device, non_blocking=True)  # the cache is in host memory, x may be too
        if not self.runner.taps:
            return rows, []
        sizes = [int(np.prod(shape)) for shape in self.row_shapes]
        parts = torch.split(rows, sizes, dim=1)
        return parts[0], [p.reshape(len(rows), *shape) for p, shape in zip(parts[1:], self.row_shapes[1:])]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Flat (logits, features...) rows of the teacher for `x`, on the host."""
        logits, feats = self._outputs(x)
        return torch.cat([t.cpu().flatten(1) for t in (logits, *feats)], 1)

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The runner's (logits, features) for `x`, in batches of exactly `chunk` images when set."""
        if not self.chunk or len(x) == self.chunk:
            return self.runner.outputs(x)
        parts = []
        for start in range(0, len(x), self.chunk):
            part = x[start : start + self.chunk]
            padded = torch.cat([part, part.new_zeros(self.chunk - len(part), *part.shape[1:])])
            logits, feats = self.runner.outputs(padded)
            parts.append([t[: len(part)] for t in (logits, *feats)])
        joined = [torch.cat(ts) for ts in zip(*parts)]
        return joined[0], joined[1:]
