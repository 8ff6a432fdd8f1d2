"""Dataset sources: one loader per `--data` spec, each returning raw uint8 images, int64 labels and class names.

Specs: `fashion-mnist[:DIR]`, `digits`, `idx:DIR`, `cifar10:PATH`, `cifar100:PATH`, `imagefolder:PATH`.
Tensor sources return images at their native size (resizing is done once by the data module). `imagefolder`
has a different size per file, so it decodes straight to the training resolution: into memory when the
decoded set fits the memory budget, else as a lazy ImageSet that decodes in `get_batch`.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import EdgekdError
from ..registry import Registry
from ..resources import DEFAULT_CACHE_DIR
from .imageset import ImageSet

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of decoded uint8 pixels imagefolder may hold in memory
# imagefolder skips files it cannot decode (a truncated download, a stray header) unless strict; above this
# fraction of the folder's images the folder itself is suspect (a partial copy, a wrong format) and loading stops
MAX_UNREADABLE_FRACTION = 0.10

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# where the Debian package `dataset-fashion-mnist` puts the IDX files; `dpkg -L` is asked if this moves
FASHION_MNIST_DEBIAN_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class SourceSplit:
    # tensor: uint8 (N, C, H, W) at native size (imagefolder: already at the training resolution);
    # or a lazy ImageSet already at the training resolution
    images: torch.Tensor | ImageSet
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SourceData:
    name: str
    class_names: tuple[str, ...]
    channels: int  # of the source: 1 grey, 3 RGB
    hflip: bool  # whether horizontal flips are label-preserving for this kind of data
    # "train" always; "test" (and "val") only when the source defines them
    splits: dict[str, SourceSplit] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of image files that could not be decoded


@dataclass(frozen=True)
class LoadContext:
    resolution: int
    channels: int
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    cache_dir: Path = DEFAULT_CACHE_DIR
    strict: bool = False  # an undecodable image file is an error instead of being skipped


SourceFn = Callable[["Path | None", LoadContext], SourceData]
SOURCES: Registry[SourceFn] = Registry(
    "data source",
    "known: fashion-mnist[:DIR], digits, idx:DIR, cifar10:PATH, cifar100:PATH, imagefolder:PATH",
)
NEEDS_PATH = {"idx": "DIR", "cifar10": "PATH", "cifar100": "PATH", "imagefolder": "PATH"}
TAKES_PATH = set(NEEDS_PATH) | {"fashion-mnist"}


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """'name' or 'name:PATH' -> (name, path). Validates the name and whether it needs a path."""
    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower()
    SOURCES.get(name)  # raises the "unknown data source" error listing the known ones
    if sep and name not in TAKES_PATH:
        raise EdgekdError(f"data source '{name}' takes no path; write just '{name}'")
    if sep and not rest.strip():
        raise EdgekdError(f"data spec '{spec}' has an empty path; write {name}:{NEEDS_PATH.get(name, 'DIR')}")
    if name in NEEDS_PATH and not sep:
        raise EdgekdError(f"data source '{name}' needs a path; write {name}:{NEEDS_PATH[name]}")
    return name, (Path(rest.strip()).expanduser() if sep else None)


def load_source(spec: str, ctx: LoadContext) -> SourceData:
    name, path = parse_spec(spec)
    return SOURCES.get(name)(path, ctx)


def _one_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(text).__name__


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise EdgekdError(f"{what} not found: {path}; check the path")
    if not path.is_dir():
        raise EdgekdError(f"{what} must be a directory, got a file: {path}")
    if not any(path.iterdir()):
        raise EdgekdError(f"{what} {path} is empty; put the dataset files there or fix the path")
    return path


def _check_labels(name: str, images_n: int, labels: torch.Tensor, where: object) -> None:
    if images_n != len(labels):
        raise EdgekdError(
            f"{where}: {images_n} images but {len(labels)} labels; the files are from different sets or truncated"
        )
    if len(labels) and int(labels.min()) < 0:
        raise EdgekdError(f"{where}: negative labels in {name} data; the label file is corrupt")


# ---------------------------------------------------------------- IDX (MNIST layout)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or not, detected from the content)."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise EdgekdError(f"cannot read IDX file {path}: {_one_line(e)}; re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise EdgekdError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); re-download it")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise EdgekdError(f"{path} has a truncated IDX header; re-download it")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise EdgekdError(
            f"{path} holds {len(data) - header} data bytes but its header {shape} needs {expected}; "
            "the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _idx_images(path: Path) -> torch.Tensor:
    arr = read_idx(path)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise EdgekdError(
            f"{path} holds {arr.dtype} data of shape {arr.shape}, expected uint8 images (N, H, W); "
            "pass the images file, not the labels file"
        )
    t = torch.from_numpy(arr.copy())
    # (N, H, W) grey, or (N, H, W, C) for colour IDX variants
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def _idx_labels(path: Path) -> torch.Tensor:
    arr = read_idx(path)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise EdgekdError(
            f"{path} holds {arr.dtype} data of shape {arr.shape}, expected integer labels (N,); "
            "pass the labels file, not the images file"
        )
    return torch.from_numpy(arr.astype(np.int64))


_IDX_NAME = re.compile(r"^(train|t10k|test)-(images|labels)[-.]idx\d-ubyte(\.gz)?$", re.IGNORECASE)


def _find_idx_files(directory: Path) -> dict[tuple[str, str], Path]:
    """{("train"|"test", "images"|"labels"): path}. Uncompressed wins over .gz when both exist."""
    found: dict[tuple[str, str], Path] = {}
    for p in sorted(directory.iterdir(), key=lambda q: (q.name.lower().endswith(".gz"), q.name)):
        m = _IDX_NAME.match(p.name)
        if m and p.is_file():
            split = "train" if m.group(1).lower() == "train" else "test"
            found.setdefault((split, m.group(2).lower()), p)
    return found


def load_idx_dir(directory: Path, *, name: str = "idx") -> tuple[dict[str, SourceSplit], int]:
    """MNIST-layout IDX pairs: train-images/train-labels and optional t10k-* (or test-*).

    Returns the splits and the source channel count."""
    _require_dir(directory, f"{name} data directory")
    files = _find_idx_files(directory)
    if ("train", "images") not in files or ("train", "labels") not in files:
        raise EdgekdError(
            f"no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] pair in {directory}; "
            "point to the directory holding the MNIST-layout IDX files"
        )
    splits: dict[str, SourceSplit] = {}
    for split in ("train", "test"):
        img_path, lab_path = files.get((split, "images")), files.get((split, "labels"))
        if img_path is None and lab_path is None:
            continue
        if img_path is None or lab_path is None:
            have, missing = ("labels", "images") if img_path is None else ("images", "labels")
            raise EdgekdError(f"{directory} has a {split} {have} IDX file but no {split} {missing} file; "
                              "add the missing file or remove the other one")
        images, labels = _idx_images(img_path), _idx_labels(lab_path)
        _check_labels(name, len(images), labels, f"{img_path.name} / {lab_path.name}")
        splits[split] = SourceSplit(images, labels)
    if "test" in splits and splits["test"].images.shape[1:] != splits["train"].images.shape[1:]:
        raise EdgekdError(
            f"train and test IDX images in {directory} differ in shape; the files are from different sets"
        )
    return splits, splits["train"].images.shape[1]


def _idx_class_names(splits: dict[str, SourceSplit]) -> tuple[str, ...]:
    top = max(int(s.labels.max()) for s in splits.values() if len(s))
    return tuple(str(i) for i in range(top + 1))


@SOURCES.register("idx")
def load_idx(path: Path | None, ctx: LoadContext) -> SourceData:
    splits, channels = load_idx_dir(path)
    return SourceData("idx", _idx_class_names(splits), channels, hflip=False, splits=splits)


# ---------------------------------------------------------------- Fashion-MNIST

def _has_fashion_files(directory: Path) -> bool:
    files = _find_idx_files(directory) if directory.is_dir() else {}
    return ("train", "images") in files and ("train", "labels") in files


def _debian_fashion_dir() -> Path | None:
    for d in FASHION_MNIST_DEBIAN_DIRS:
        if _has_fashion_files(d):
            return d
    try:  # the package may install elsewhere on other releases
        listing = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        if "train-images-idx3-ubyte" in line and _has_fashion_files(Path(line).parent):
            return Path(line).parent
    return None


def _download_fashion_mnist(cache_dir: Path) -> Path:
    """torchvision's downloader; returns the directory holding the raw IDX files."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(cache_dir), train=True, download=True)
    FashionMNIST(str(cache_dir), train=False, download=True)
    return cache_dir / "FashionMNIST" / "raw"


@SOURCES.register("fashion-mnist")
def load_fashion_mnist(path: Path | None, ctx: LoadContext) -> SourceData:
    if path is not None:
        directory = path
    else:
        directory = _debian_fashion_dir()
        cache = ctx.cache_dir.expanduser()
        if directory is None and _has_fashion_files(cache / "FashionMNIST" / "raw"):
            directory = cache / "FashionMNIST" / "raw"
        if directory is None:
            try:
                directory = _download_fashion_mnist(cache)
            except Exception as e:  # offline, proxy, disk full: all end in the same advice
                raise EdgekdError(
                    f"Fashion-MNIST not found and download failed ({_one_line(e)}); "
                    "run `apt-get install dataset-fashion-mnist` or pass fashion-mnist:DIR with the IDX files"
                ) from None
    splits, channels = load_idx_dir(directory, name="fashion-mnist")
    if int(max(s.labels.max() for s in splits.values())) >= len(FASHION_MNIST_CLASSES):
        raise EdgekdError(f"labels in {directory} go beyond the 10 Fashion-MNIST classes; use idx:{directory} instead")
    return SourceData("fashion-mnist", FASHION_MNIST_CLASSES, channels, hflip=True, splits=splits)


# ---------------------------------------------------------------- scikit-learn digits

@SOURCES.register("digits")
def load_digits_source(path: Path | None, ctx: LoadContext) -> SourceData:
    from sklearn.datasets import load_digits

    d = load_digits()
    # values are 0..16 ink counts
    images = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    names = tuple(str(n) for n in d.target_names)
    return SourceData("digits", names, 1, hflip=False, splits={"train": SourceSplit(images, labels)})


# ---------------------------------------------------------------- CIFAR python pickles

class _CifarUnpickler(pickle.Unpickler):
    """Only what the CIFAR batches contain (dicts, lists, numpy arrays): a crafted pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 moved it; avoids the deprecation shim
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise EdgekdError(f"cannot read {path}: {_one_line(e)}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... all mean a damaged or foreign file
        raise EdgekdError(f"{path} is not a CIFAR python pickle ({_one_line(e)}); re-extract the archive") from None
    if not isinstance(obj, dict):
        raise EdgekdError(f"{path} is not a CIFAR python pickle (holds {type(obj).__name__}); re-extract the archive")
    # the original batches were written by Python 2, so keys arrive as bytes
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = _read_cifar_pickle(path)
    if "data" not in d or label_key not in d:
        raise EdgekdError(f"{path} lacks the 'data' or '{label_key}' entry; it is not a CIFAR batch of this kind")
    data = np.asarray(d["data"])
    labels = torch.as_tensor(np.asarray(d[label_key], dtype=np.int64))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise EdgekdError(
            f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); re-extract the archive"
        )
    _check_labels("cifar", len(data), labels, path)
    # rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _cifar_dir(path: Path, extracted: str, marker: str, kind: str) -> Path:
    _require_dir(path, f"{kind} directory")
    for d in (path, path / extracted):
        if (d / marker).is_file():
            return d
    raise EdgekdError(
        f"no {kind} batches in {path} (looked for {marker} there and in {extracted}/); "
        f"pass the extracted {extracted} directory or its parent"
    )


def _names_from_meta(meta_path: Path, key: str, n: int, fallback: tuple[str, ...] | None) -> tuple[str, ...]:
    if meta_path.is_file():
        names = _read_cifar_pickle(meta_path).get(key)
        if isinstance(names, (list, tuple)) and len(names) >= n:
            return tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in names)
    if fallback is not None and len(fallback) >= n:
        return fallback
    return tuple(str(i) for i in range(n))


def _check_range(kind: str, splits: dict[str, SourceSplit], n: int, where: Path) -> None:
    top = max(int(s.labels.max()) for s in splits.values() if len(s))
    if top >= n:
        raise EdgekdError(f"{where}: label {top} outside the {n} {kind} classes; the batches are corrupt")


@SOURCES.register("cifar10")
def load_cifar10(path: Path | None, ctx: LoadContext) -> SourceData:
    d = _cifar_dir(path, "cifar-10-batches-py", "data_batch_1", "CIFAR-10")
    batches = [d / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in batches + [d / "test_batch"] if not p.is_file()]
    if missing:
        raise EdgekdError(f"{d} lacks {', '.join(missing)}; re-extract cifar-10-python.tar.gz")
    parts = [_cifar_batch(p, "labels") for p in batches]
    splits = {
        "train": SourceSplit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])),
        "test": SourceSplit(*_cifar_batch(d / "test_batch", "labels")),
    }
    names = _names_from_meta(d / "batches.meta", "label_names", 10, CIFAR10_CLASSES)[:10]
    _check_range("CIFAR-10", splits, 10, d)
    return SourceData("cifar10", names, 3, hflip=True, splits=splits)


@SOURCES.register("cifar100")
def load_cifar100(path: Path | None, ctx: LoadContext) -> SourceData:
    d = _cifar_dir(path, "cifar-100-python", "train", "CIFAR-100")
    if not (d / "test").is_file():
        raise EdgekdError(f"{d} lacks test; re-extract cifar-100-python.tar.gz")
    splits = {s: SourceSplit(*_cifar_batch(d / s, "fine_labels")) for s in ("train", "test")}
    names = _names_from_meta(d / "meta", "fine_label_names", 100, None)[:100]
    _check_range("CIFAR-100", splits, 100, d)
    return SourceData("cifar100", names, 3, hflip=True, splits=splits)


# ---------------------------------------------------------------- image folders

class UnreadableImage(EdgekdError):
    """An image file that cannot be decoded; imagefolder skips these unless strict."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}; remove or replace the file")
        self.path, self.reason = path, reason


def decode_image(path: str, resolution: int, mode: str = "RGB") -> np.ndarray:
    """Decode one file to a (resolution, resolution[, 3]) uint8 array: centre square crop, antialiased resize.

    The crop keeps the aspect ratio (a squashed image would be a different image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB" if mode == "RGB" else "L", (resolution, resolution))  # JPEG: decode at a reduced scale
            im = im.convert(mode)
            w, h = im.size
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            out = im.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
            return np.array(out, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(path, _one_line(e)) from None


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _decode_into(out: torch.Tensor | None, paths: list[str], resolution: int, mode: str, pool: ThreadPoolExecutor,
                 skip: bool = False) -> list[tuple[int, UnreadableImage]]:
    """Decodes paths[i] into out[i] (out None: only checks that each file decodes). An undecodable file raises
    UnreadableImage, or with `skip` is returned as (index, error) and leaves its row of `out` unset."""
    def one(i: int) -> UnreadableImage | None:
        try:
            arr = decode_image(paths[i], resolution, mode)
        except UnreadableImage as e:
            if not skip:
                raise
            return e
        if out is not None:
            out[i] = torch.from_numpy(arr).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)[None]
        return None

    # PIL releases the GIL while decoding and resizing, so threads use all cores
    return [(i, e) for i, e in enumerate(pool.map(one, range(len(paths)))) if e is not None]


class LazyImageSet:
    """ImageSet over image files, decoded on demand in `get_batch` by a small thread pool.

    Used when the decoded dataset would not fit the memory budget. Correct but slower than the in-memory
    path: every batch pays decode + resize again (budget roughly 1-5 ms per JPEG per core)."""

    def __init__(self, paths: list[str], labels: torch.Tensor, resolution: int, mode: str = "RGB",
                 threads: int | None = None):
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = list(paths)
        self.labels = labels.to(torch.int64)
        self.resolution = resolution
        self.mode = mode
        self.threads = threads or _worker_count()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        out = torch.empty((len(idx), self.channels, self.resolution, self.resolution), dtype=torch.uint8)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="edgekd-decode")
        _decode_into(out, [self.paths[i] for i in idx], self.resolution, self.mode, self._pool)
        return out

    def subset(self, indices: torch.Tensor) -> "LazyImageSet":
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return LazyImageSet([self.paths[i] for i in idx.tolist()], self.labels[idx], self.resolution, self.mode,
                            self.threads)

    def __getstate__(self):  # picklable for spawned workers/ranks; the pool is recreated on first use
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(directory: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted: file order is deterministic
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _scan_split(directory: Path, classes: list[str] | None) -> tuple[list[str], list[str], list[int]]:
    """(class names, paths, labels) for directory/<class>/...; with `classes` given, map onto those names."""
    dirs = _class_dirs(directory)
    if not dirs:
        loose = any(_is_image(p.name) for p in directory.iterdir() if p.is_file())
        hint = "images lie directly in it; " if loose else ""
        raise EdgekdError(
            f"no class subfolders in {directory}; {hint}arrange images as {directory}/<class>/*.jpg "
            "(or train/<class>/ and val/<class>/)"
        )
    names = [d.name for d in dirs] if classes is None else classes
    index = {n: i for i, n in enumerate(names)}
    paths: list[str] = []
    labels: list[int] = []
    for d in dirs:
        if d.name not in index:
            raise EdgekdError(f"class folder {d} is not among the train classes; rename or remove it")
        files = _images_under(d)
        if not files and classes is None:
            raise EdgekdError(
                f"class folder {d} contains no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
            )
        paths.extend(files)
        labels.extend([index[d.name]] * len(files))
    if not paths:
        raise EdgekdError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {directory}; add images")
    return names, paths, labels


@SOURCES.register("imagefolder")
def load_imagefolder(path: Path | None, ctx: LoadContext) -> SourceData:
    root = _require_dir(path, "image folder")
    held_out = {"val": root / "val", "test": root / "test"}
    if (root / "train").is_dir():
        classes, train_paths, train_labels = _scan_split(root / "train", None)
        lists = {"train": (train_paths, train_labels)}
        present = [s for s, d in held_out.items() if d.is_dir()]
        if present == ["val"]:
            lists["test"] = _scan_split(held_out["val"], classes)[1:]  # ImageNet-style: val/ is the held-out set
        else:
            for s in present:
                lists[s] = _scan_split(held_out[s], classes)[1:]
    else:
        classes, paths, labels = _scan_split(root, None)
        lists = {"train": (paths, labels)}

    mode = "L" if ctx.channels == 1 else "RGB"
    channels = 1 if mode == "L" else 3
    total = sum(len(p) for p, _ in lists.values())
    in_memory = total * channels * ctx.resolution ** 2 <= ctx.memory_budget
    splits: dict[str, SourceSplit] = {}
    skipped: list[tuple[str, str]] = []
    # every file is decoded once here, also for a lazy set (which then decodes again per batch), so that an
    # unreadable file is found before training rather than in the middle of it
    with ThreadPoolExecutor(_worker_count(), thread_name_prefix="edgekd-decode") as pool:
        for s, (paths, labels) in lists.items():
            out = torch.empty((len(paths), channels, ctx.resolution, ctx.resolution), dtype=torch.uint8) \
                if in_memory else None
            failed = _decode_into(out, paths, ctx.resolution, mode, pool, skip=not ctx.strict)
            skipped += [(e.path, e.reason) for _, e in failed]
            lt = torch.tensor(labels, dtype=torch.int64)
            if failed:
                keep = torch.ones(len(paths), dtype=torch.bool)
                keep[[i for i, _ in failed]] = False
                out, lt = (out[keep] if out is not None else None), lt[keep]
                paths = [p for p, k in zip(paths, keep.tolist()) if k]
            images = out if out is not None else LazyImageSet(paths, lt, ctx.resolution, mode)
            splits[s] = SourceSplit(images, lt)
    if skipped:
        _check_skipped(root, skipped, total, splits["train"].labels, classes)
    # the source is RGB; with channels=1 it was decoded straight to grey (PIL "L") so both modes agree
    return SourceData("imagefolder", tuple(classes), 3, hflip=True, splits=splits, skipped=tuple(skipped))


def _check_skipped(root: Path, skipped: list[tuple[str, str]], total: int, train_labels: torch.Tensor,
                   classes: list[str]) -> None:
    """Skipping is for a few bad files: too many, or a train class left without images, stop the load."""
    path, reason = skipped[0]
    if len(skipped) > MAX_UNREADABLE_FRACTION * total:
        raise EdgekdError(
            f"{len(skipped)} of {total} images under {root} cannot be decoded (more than "
            f"{MAX_UNREADABLE_FRACTION:.0%}; first: {path}: {reason}); check the folder's files and format"
        )
    empty = sorted(set(range(len(classes))) - set(train_labels.tolist()))
    if empty:
        raise EdgekdError(f"class '{classes[empty[0]]}' under {root} has no readable training images "
                          f"({len(skipped)} unreadable files, first: {path}); add images or remove the folder")
