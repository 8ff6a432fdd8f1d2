"""Data layer: sources, splits, stats, loaders, augmentation replay and the user-facing errors."""
from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.data import sources
from edgekd.data.augment import CropFlip
from edgekd.data.datamodule import load_data, resize_uint8, stratified_pick
from edgekd.data.imageset import TensorImageSet
from edgekd.data.sources import LazyImageSet, read_idx
from edgekd.errors import EdgekdError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)


# ---------------------------------------------------------------- fixtures: file-format writers

def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write an IDX file (the MNIST container): magic 00 00 <type> <ndim>, big-endian dims, data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    array = np.ascontiguousarray(array)
    data = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_mnist(n: int, classes: int = 10, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    return images, labels


def write_mnist_dir(d: Path, n_train: int = 120, n_test: int = 40, *, gz: bool = False, size: int = 28) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        if n == 0:
            continue
        images, labels = fake_mnist(n, size=size, seed=seed)
        write_idx(d / f"{split}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(d / f"{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)
    return d


def write_cifar(d: Path, *, hundred: bool = False, per_batch: int = 6) -> dict[str, np.ndarray]:
    """Fake-format CIFAR python batches (bytes keys, as the Python 2 originals have)."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(3)
    label_key, classes = (b"fine_labels", 100) if hundred else (b"labels", 10)

    def batch(name: str, n: int) -> np.ndarray:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, n)]
        (d / name).write_bytes(pickle.dumps({b"batch_label": b"x", label_key: labels, b"data": data}, protocol=2))
        return data

    if hundred:
        out = {"train": batch("train", 5 * per_batch), "test": batch("test", per_batch)}
        names = [f"c{i}".encode() for i in range(100)]
        (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}, protocol=2))
    else:
        out = {f"b{i}": batch(f"data_batch_{i}", per_batch) for i in range(1, 6)}
        out["test"] = batch("test_batch", per_batch)
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return out


CLASS_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}


def write_pngs(d: Path, per_class: int, size: tuple[int, int] = (12, 9)) -> None:
    from PIL import Image

    rng = np.random.default_rng(5)
    for name, colour in CLASS_COLOURS.items():
        (d / name).mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(np.array(colour)[None, None] + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8), "RGB").save(d / name / f"{i:03d}.png")
        (d / name / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def fashion():
    return load_data("fashion-mnist", resolution=32)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", resolution=16, channels=1)


# ---------------------------------------------------------------- sources

@needs_fashion
def test_fashion_mnist_debian(fashion):
    dm = fashion
    sizes = dm.describe()["sizes"]
    assert sizes["train"] + sizes["val"] == 60_000 and sizes["val"] == 6_000
    assert sizes["test"] == 10_000
    assert dm.info.num_classes == 10 and dm.info.class_names[0] == "T-shirt/top"
    assert dm.info.source_channels == 1 and dm.channels == 3
    assert dm.train.images.shape[1:] == (1, 32, 32)  # grey stays 1 channel in memory
    assert len(dm.mean) == 3 and len(set(dm.mean)) == 1 and len(set(dm.std)) == 1
    assert 0.27 < dm.mean[0] < 0.30 and 0.32 < dm.std[0] < 0.36
    assert dm.augment == CropFlip(pad=4, hflip=True)
    # resized once at load into uint8 tensors in memory (what makes loading and batching fast), never lazy
    assert not dm.lazy and all(isinstance(dm.split(s), TensorImageSet) for s in ("train", "val", "test"))
    assert dm.train.images.dtype == torch.uint8 and dm.train.images.is_contiguous()
    json.dumps(dm.describe())


@needs_fashion
def test_grey_becomes_three_channels(fashion):
    dm = fashion
    x, y = next(iter(dm.loader("val", 16)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    expected = (dm.val.images[:16].float() / 255 - dm.mean[0]) / dm.std[0]
    assert torch.allclose(x[:, :1], expected)


def test_fashion_mnist_dir(tmp_path):
    write_mnist_dir(tmp_path / "fm", gz=True)
    dm = load_data(f"fashion-mnist:{tmp_path / 'fm'}", resolution=32, channels=1)
    assert dm.info.name == "fashion-mnist" and dm.info.class_names[-1] == "Ankle boot"
    assert len(dm.train) + len(dm.val) == 120 and len(dm.test) == 40
    assert dm.train.images.shape[1:] == (1, 32, 32) and len(dm.mean) == 1


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIRS", (tmp_path / "nowhere",))
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no dpkg")))

    def offline(cache_dir):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nURLError: no network")

    monkeypatch.setattr(sources, "_download_fashion_mnist", offline)
    with pytest.raises(EdgekdError, match=r"apt-get install dataset-fashion-mnist.*fashion-mnist:DIR"):
        load_data("fashion-mnist", resolution=32, root=tmp_path / "cache")


def test_digits(digits):
    dm = digits
    assert dm.info.num_classes == 10 and dm.info.source_channels == 1
    assert len(dm.train) + len(dm.val) + len(dm.test) == 1797
    assert len(dm.test) == round(0.2 * 1797)
    assert dm.train.images.shape[1:] == (1, 16, 16) and dm.train.images.max() == 255
    assert dm.augment == CropFlip(pad=2, hflip=False)
    assert dm.split_origin == {"test": "train", "val": "train", "train": "train"}
    # the three splits partition the source
    all_idx = torch.cat([dm.split_indices[s] for s in ("train", "val", "test")])
    assert torch.equal(all_idx.sort().values, torch.arange(1797))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir(tmp_path, gz):
    write_mnist_dir(tmp_path, n_train=100, n_test=30, gz=gz, size=20)
    images, labels = fake_mnist(100, size=20, seed=0)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}"), images)
    dm = load_data(f"idx:{tmp_path}", resolution=20)
    assert len(dm.test) == 30 and len(dm.train) + len(dm.val) == 100
    assert dm.augment == CropFlip(pad=2, hflip=False)
    # native resolution: no resampling, pixels are the file's
    idx = dm.split_indices["train"]
    assert torch.equal(dm.train.images[:, 0], torch.from_numpy(images)[idx])
    assert torch.equal(dm.train.labels, torch.from_numpy(labels.astype(np.int64))[idx])


def test_idx_without_test_split(tmp_path):
    write_mnist_dir(tmp_path, n_train=100, n_test=0)
    dm = load_data(f"idx:{tmp_path}", resolution=28, test_fraction=0.3)
    assert len(dm.test) == 30 and dm.split_origin["test"] == "train"


def test_resize_keeps_constant_images_and_shape():
    x = torch.full((3, 1, 28, 28), 77, dtype=torch.uint8)
    y = resize_uint8(x, 32)
    assert y.shape == (3, 1, 32, 32) and y.dtype == torch.uint8 and bool((y == 77).all())
    assert resize_uint8(x, 28) is x


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_parser(tmp_path, nested):
    data = write_cifar(tmp_path / "cifar-10-batches-py")
    spec = f"cifar10:{tmp_path / 'cifar-10-batches-py' if nested else tmp_path}"
    dm = load_data(spec, resolution=32, val_fraction=0.2)
    assert dm.info.class_names[1] == "automobile" and dm.info.source_channels == 3
    assert len(dm.test) == 6 and len(dm.train) + len(dm.val) == 30
    assert dm.augment == CropFlip(pad=4, hflip=True)
    # channel planes: the first 1024 bytes of a row are red, row-major
    raw = np.concatenate([data[f"b{i}"] for i in range(1, 6)])
    i = int(dm.split_indices["train"][0])
    img = dm.train.images[0]
    assert img.shape == (3, 32, 32)
    assert torch.equal(img[0].reshape(-1), torch.from_numpy(raw[i, :1024]))
    assert torch.equal(img[2, 0], torch.from_numpy(raw[i, 2048:2080]))


def test_cifar100_parser(tmp_path):
    data = write_cifar(tmp_path / "cifar-100-python", hundred=True)
    dm = load_data(f"cifar100:{tmp_path}", resolution=16, val_fraction=0.2)
    assert dm.info.num_classes == 100 and dm.info.class_names[99] == "c99"
    assert len(dm.test) == 6 and dm.train.images.shape[1:] == (3, 16, 16)
    # RGB source, grey model: converted once at load with luma weights, stored as 1 channel
    grey = load_data(f"cifar100:{tmp_path}", resolution=32, channels=1, val_fraction=0.2)
    rgb = torch.from_numpy(data["test"][0].reshape(3, 32, 32)).float()
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).round()
    assert grey.test.images.shape[1:] == (1, 32, 32) and torch.equal(grey.test.images[0, 0].float(), luma)
    assert len(grey.mean) == 1 and grey.info.source_channels == 3


def test_imagefolder_train_val_layout(tmp_path):
    write_pngs(tmp_path / "train", per_class=5)
    write_pngs(tmp_path / "val", per_class=2)
    dm = load_data(f"imagefolder:{tmp_path}", resolution=8, val_fraction=0.2)
    assert dm.info.class_names == ("cat", "dog", "fox")
    assert len(dm.test) == 6 and dm.split_origin["test"] == "test"  # val/ is the held-out set
    assert len(dm.train) == 12 and len(dm.val) == 3
    # colours survive decode + centre crop + resize: red channel dominates for "cat"
    cat = dm.test.images[dm.test.labels == 0].float().mean((0, 2, 3))
    assert cat[0] > 150 and cat[1] < 90
    assert dm.describe()["storage"] == "memory"


def test_imagefolder_flat_layout_and_lazy_agree(tmp_path):
    write_pngs(tmp_path, per_class=10, size=(14, 11))
    kw = dict(resolution=10, val_fraction=0.2, test_fraction=0.2, seed=3)
    mem = load_data(f"imagefolder:{tmp_path}", **kw)
    lazy = load_data(f"imagefolder:{tmp_path}", memory_budget=1, **kw)
    assert isinstance(mem.train, TensorImageSet) and isinstance(lazy.train, LazyImageSet) and lazy.lazy
    assert (len(mem.train), len(mem.val), len(mem.test)) == (19, 5, 6)
    for s in ("train", "val", "test"):
        a, b = mem.split(s), lazy.split(s)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.get_batch(torch.arange(len(a))), b.get_batch(torch.arange(len(b))))
    assert mem.mean == lazy.mean and mem.std == lazy.std
    batches_mem = list(mem.loader("train", 4, seed=1))
    batches_lazy = list(lazy.loader("train", 4, seed=1))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches_mem, batches_lazy))
    # grey decodes straight to one channel in both modes
    grey = load_data(f"imagefolder:{tmp_path}", channels=1, memory_budget=1, **kw)
    assert grey.train.get_batch(torch.arange(2)).shape == (2, 1, 10, 10) and len(grey.mean) == 1


def _truncate(path: Path) -> None:
    """A partial download: the PNG header is there, most of the pixel data is not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("memory_budget", [sources.DEFAULT_MEMORY_BUDGET, 1], ids=["memory", "lazy"])
def test_imagefolder_skips_unreadable_images_unless_strict(tmp_path, memory_budget):
    write_pngs(tmp_path, per_class=10)
    bad = tmp_path / "dog" / "003.png"
    _truncate(bad)
    kw = dict(resolution=8, val_fraction=0.2, memory_budget=memory_budget)
    dm = load_data(f"imagefolder:{tmp_path}", **kw)
    assert [path for path, _ in dm.skipped] == [str(bad)] and "truncated" in dm.skipped[0][1]
    assert len(dm.train) + len(dm.val) + len(dm.test) == 29
    everything = torch.cat([dm.split(s).get_batch(torch.arange(len(dm.split(s)))) for s in ("train", "val", "test")])
    assert everything.shape == (29, 3, 8, 8)  # every kept image decodes, lazily too
    with pytest.raises(EdgekdError, match=r"^cannot decode image .*dog/003\.png: .*truncated.*; remove or replace"):
        load_data(f"imagefolder:{tmp_path}", strict=True, **kw)


def test_imagefolder_stops_when_too_many_images_are_unreadable(tmp_path):
    write_pngs(tmp_path, per_class=10)
    for i in range(3):  # 3 of 30: exactly the limit, still skipped
        _truncate(tmp_path / "cat" / f"{i:03d}.png")
    assert sources.MAX_UNREADABLE_FRACTION == 0.10
    assert len(load_data(f"imagefolder:{tmp_path}", resolution=8).skipped) == 3
    (tmp_path / "fox" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a stray header: 4 of 30
    with pytest.raises(EdgekdError, match=r"^4 of 30 images under .* cannot be decoded \(more than 10%; first: "):
        load_data(f"imagefolder:{tmp_path}", resolution=8)
    few = tmp_path / "few"
    write_pngs(few, per_class=10)
    (few / "owl").mkdir()
    (few / "owl" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # 1 of 31, but the class's only image
    with pytest.raises(EdgekdError, match=r"^class 'owl' under .* has no readable training images"):
        load_data(f"imagefolder:{few}", resolution=8)


def test_skipped_images_are_listed_in_the_run_and_counted_in_the_summary(tmp_path):
    import io

    from rich.console import Console

    from edgekd import api
    from edgekd.config import OptimConfig, TrainConfig

    write_pngs(tmp_path / "images", per_class=12, size=(20, 20))
    bad = tmp_path / "images" / "fox" / "005.png"
    _truncate(bad)
    out = io.StringIO()
    config = TrainConfig(run_dir=str(tmp_path / "run"), data=f"imagefolder:{tmp_path / 'images'}", resolution=16,
                         student="mobilenetv3_small_035", student_options={"low_res_stem": True}, teacher=None,
                         method="ce", epochs=1, batch_size=16,
                         optim=OptimConfig(warmup_epochs=0.0), checkpoint_interval_s=1e9)
    summary = api.train(config, console=Console(file=out, width=400))
    listed = (tmp_path / "run" / "skipped-files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(bad)]
    assert summary["skipped_files"] == 1 == json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"]
    warnings = [line for line in out.getvalue().splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and "skipped 1 unreadable image" in warnings[0] and "skipped-files.txt" in warnings[0]
    with pytest.raises(EdgekdError, match=r"cannot decode image .*fox/005\.png"):
        api.train(config.replace(run_dir=str(tmp_path / "strict"), strict_data=True))
    assert not (tmp_path / "strict").exists()


# ---------------------------------------------------------------- splits

def test_stratified_pick_exact_and_proportional():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rest, picked = stratified_pick(labels, 10, torch.Generator().manual_seed(0))
    assert len(picked) == 10 and len(rest) == 90
    assert torch.bincount(labels[picked]).tolist() == [5, 3, 2]
    assert torch.equal(torch.cat([rest, picked]).sort().values, torch.arange(100))
    again = stratified_pick(labels, 10, torch.Generator().manual_seed(0))[1]
    other = stratified_pick(labels, 10, torch.Generator().manual_seed(1))[1]
    assert torch.equal(picked, again) and not torch.equal(picked, other)


def test_splits_deterministic_and_stratified(digits):
    again = load_data("digits", resolution=16, channels=1)
    other = load_data("digits", resolution=16, channels=1, seed=1)
    for s in ("train", "val", "test"):
        assert torch.equal(digits.split_indices[s], again.split_indices[s])
        assert torch.equal(digits.split(s).images, again.split(s).images)
    assert not torch.equal(digits.split_indices["val"], other.split_indices["val"])
    full = torch.bincount(torch.cat([digits.split(s).labels for s in ("train", "val", "test")]), minlength=10)
    for s, frac in (("test", 0.2), ("val", 0.1 * 0.8)):
        counts = torch.bincount(digits.split(s).labels, minlength=10)
        assert (counts - full * frac).abs().max() <= 1.5, s


def test_limit_is_stratified(digits):
    dm = load_data("digits", resolution=16, channels=1, limit=100)
    assert len(dm.train) == 100
    assert torch.bincount(dm.train.labels, minlength=10).min() >= 9
    # val/test untouched by limit, so quick runs are scored on the same images
    assert torch.equal(dm.split_indices["val"], digits.split_indices["val"])
    assert torch.equal(dm.split_indices["test"], digits.split_indices["test"])


# ---------------------------------------------------------------- loaders and augmentation

def _batches(loader, start_step=0):
    return [(x.clone(), y.clone()) for x, y in loader.iterate(start_step)]


def test_loader_determinism_and_resume(digits):
    a = digits.loader("train", 100, seed=7)
    b = digits.loader("train", 100, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    first, second = _batches(a), _batches(b)
    assert len(first) == len(a) == 13
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))
    resumed = _batches(b, start_step=5)
    assert len(resumed) == len(first) - 5
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first[5:], resumed))
    b.set_epoch(3)
    assert not torch.equal(_batches(b)[0][1], first[0][1])
    # eval loaders: in order, no augmentation
    ev = digits.loader("test", 64)
    assert not ev.shuffle and ev.augment is None
    assert torch.equal(torch.cat([y for _, y in ev]), digits.test.labels)


def test_ddp_shards_concatenate_to_global_batch(digits):
    single = _batches(digits.loader("train", 64, seed=4, drop_last=True))
    ranks = [_batches(digits.loader("train", 32, seed=4, rank=r, world_size=2, drop_last=True)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        # ranks take strided shards of each global batch
        assert torch.equal(torch.cat([x0, x1]), torch.cat([x[0::2], x[1::2]]))
        assert torch.equal(torch.cat([y0, y1]), torch.cat([y[0::2], y[1::2]]))


def test_augmentation_replay(digits):
    loader = digits.loader("train", 50, seed=9)
    loader.set_epoch(1)
    assert loader.augment == CropFlip(pad=2, hflip=False)
    steps = _batches(loader)
    # replay from the recipe: same permutation, same per-position params -> the same augmented images
    order = loader.order()
    params = loader.augment.sample(len(order), loader._generator_for_augment())
    pos = torch.arange(50, 100)
    replay = loader.augment.apply(digits.train.get_batch(order[pos]), type(params)(params.dx[pos], params.dy[pos],
                                                                               params.flip[pos]))
    assert torch.equal(steps[1][0], loader.normalize(replay))
    aug = CropFlip(pad=3, hflip=True)
    p1, p2 = (aug.sample(8, torch.Generator().manual_seed(5)) for _ in range(2))
    imgs = digits.train.get_batch(torch.arange(8))
    assert torch.equal(aug.apply(imgs, p1), aug.apply(imgs, p2))
    assert not torch.equal(aug.apply(imgs, p1), imgs)


# ---------------------------------------------------------------- errors

def test_error_messages(tmp_path):
    def fails(match, spec, **kw):
        kw.setdefault("resolution", 16)
        with pytest.raises(EdgekdError, match=match) as e:
            load_data(spec, **kw)
        assert "\n" not in str(e.value)

    fails(r"unknown data source 'mnistt'.*known: fashion-mnist.*imagefolder:PATH", "mnistt")
    fails(r"did you mean 'cifar10'", "cifar1:x")
    fails(r"'idx' needs a path; write idx:DIR", "idx")
    fails(r"'digits' takes no path", "digits:/tmp")
    fails(r"not found: .*nope; check the path", f"imagefolder:{tmp_path / 'nope'}")
    fails(r"resolution 4 out of range; use 8\.\.1024", "digits", resolution=4)
    fails(r"resolution 2048 out of range", "digits", resolution=2048)
    fails(r"channels must be 1 \(grey\) or 3 \(RGB\), got 2", "digits", channels=2)
    fails(r"the val split of digits is empty.*raise val_fraction", "digits", val_fraction=0.0)
    fails(r"val_fraction must be in \[0, 1\)", "digits", val_fraction=1.5)

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(r"is empty", f"imagefolder:{empty}")
    fails(r"is empty", f"idx:{empty}")

    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.png").write_bytes(b"")
    fails(r"no class subfolders in .*images lie directly in it", f"imagefolder:{loose}")
    noimg = tmp_path / "noimg"
    (noimg / "cat").mkdir(parents=True)
    (noimg / "cat" / "readme.txt").write_text("x")
    fails(r"class folder .*cat contains no images", f"imagefolder:{noimg}")
    bad = tmp_path / "badimg"
    (bad / "cat").mkdir(parents=True)
    (bad / "cat" / "x.jpg").write_bytes(b"not a jpeg")
    fails(r"1 of 1 images under .*badimg cannot be decoded \(more than 10%; first: .*x\.jpg", f"imagefolder:{bad}")
    fails(r"cannot decode image .*x\.jpg.*remove or replace", f"imagefolder:{bad}", strict=True)
    tiny = tmp_path / "tiny"
    write_pngs(tiny, per_class=1)
    fails(r"the (test|val) split of .* is empty", f"imagefolder:{tiny}")
    badval = tmp_path / "badval"
    write_pngs(badval / "train", per_class=2)
    (badval / "val" / "wolf").mkdir(parents=True)
    fails(r"class folder .*wolf is not among the train classes", f"imagefolder:{badval}")

    idx = write_mnist_dir(tmp_path / "idx", n_train=20, n_test=0)
    fails(r"no train-images-idx3-ubyte.*pair in", f"idx:{tmp_path / 'loose'}")
    (idx / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    fails(r"not an IDX file \(bad magic number 12345678\)", f"idx:{idx}")
    write_idx(idx / "train-images-idx3-ubyte", fake_mnist(20)[0])
    write_idx(idx / "train-labels-idx1-ubyte", fake_mnist(19)[1])
    fails(r"20 images but 19 labels", f"idx:{idx}")
    data = (idx / "train-images-idx3-ubyte").read_bytes()
    (idx / "train-images-idx3-ubyte").write_bytes(data[:-10])
    fails(r"truncated or corrupt", f"idx:{idx}")
    (idx / "train-images-idx3-ubyte").write_bytes(gzip.compress(data)[:30])
    fails(r"cannot read IDX file", f"idx:{idx}")

    cif = tmp_path / "cifar"
    write_cifar(cif / "cifar-10-batches-py")
    (cif / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    fails(r"data_batch_3 is not a CIFAR python pickle", f"cifar10:{cif}")
    (cif / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(object()))
    fails(r"data_batch_3 is not a CIFAR python pickle \(unexpected object", f"cifar10:{cif}")
    (cif / "cifar-10-batches-py" / "data_batch_5").unlink()
    fails(r"lacks data_batch_5", f"cifar10:{cif}")
    fails(r"no CIFAR-100 batches in", f"cifar100:{cif}")

    with pytest.raises(EdgekdError, match=r"unknown split 'valid'; use one of train, val, test"):
        load_data("digits", resolution=8).loader("valid", 4)
