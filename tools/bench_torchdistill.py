"""Benchmark: the same Hinton-KD pair trained under torchdistill 1.1.5, for a side-by-side with edgekd.

Same data tensors, augmentation (edgekd's CropFlip), loss, optimizer (SGD, nesterov, no decay on 1-D params)
and schedule (edgekd's warmup + per-step cosine); reports images/s per epoch and test accuracy.

    pip install -e '.[bench]'    # torchdistill==1.1.5
    python tools/bench_torchdistill.py --data fashion-mnist --limit 4000 --epochs 10 --batch-size 128 \
        --lr 0.05 --threads 2 --teacher resnet18 --student mobilenetv3_small_050
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.config import OptimConfig  # noqa: E402
from edgekd.train.phases import build_optimizer  # noqa: E402
from edgekd.train.schedules import lr_at  # noqa: E402


class EdgekdSplit(Dataset):
    """An edgekd DataModule split as a per-sample torch Dataset of (uint8 CHW image, label).

    edgekd augments and normalises whole batches in BatchLoader, not per sample, so this keeps the raw uint8
    images and exposes `batch_transform`, which run_torchdistill applies to each collated batch (inside the
    timed loop, as edgekd's loader does): CropFlip with BatchLoader's per-epoch generator, then normalize."""

    def __init__(self, data, split: str, augment: bool):
        self.images = data.split(split)
        self.loader = data.loader(split, 1, augment=augment)  # only for its augment/normalize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images.get_batch(torch.tensor([i]))[0], int(self.images.labels[i])

    def batch_transform(self, x: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        aug = self.loader.augment
        if aug is not None:
            if getattr(self, "_epoch", None) != (seed, epoch):  # one stream per epoch, seeded like BatchLoader's
                self._epoch = (seed, epoch)
                self._gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777_777)
            x = aug.apply(x, aug.sample(len(x), self._gen))
        return self.loader.normalize(x)


def _edgekd_sgd(params, lr, momentum, weight_decay):
    # edgekd's own optimizer (decay only on >1-D params); torchdistill's plain SGD would decay BN/bias too
    return build_optimizer(list(params), OptimConfig(lr=lr, momentum=momentum, weight_decay=weight_decay))


def run_torchdistill(student: nn.Module, teacher: nn.Module, train_dataset, test_dataset, epochs: int,
                     batch_size: int, lr: float, temperature: float = 4.0, alpha: float = 0.9, seed: int = 0,
                     num_workers: int = 0) -> dict:
    """Train `student` from `teacher` with torchdistill's DistillationBox on CPU; images/s per epoch, test acc.

    `alpha` is edgekd's convention (weight of the T^2-scaled KL term, 0.9 = edgekd's kd default). torchdistill's
    KDLoss weights CE by its alpha and KL by 1 - alpha, so it gets 1 - alpha."""
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.optim.registry import register_optimizer

    register_optimizer(key="edgekd_sgd")(_edgekd_sgd)
    torch.manual_seed(seed)
    td_alpha = 1.0 - alpha
    # torchdistill's KDLoss returns the bare KL (no T^2) when its alpha == 0: restore T^2 via the term weight
    weight = temperature ** 2 if td_alpha == 0 else 1.0
    steps_per_epoch = len(train_dataset) // batch_size  # drop_last, as edgekd's trainer
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_dataset)} training images are fewer than one batch of {batch_size}")
    optim = OptimConfig(lr=lr)  # momentum 0.9, weight decay 5e-4, 1 warmup epoch, cosine: edgekd's defaults
    total = steps_per_epoch * epochs
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler,
                        "kwargs": {"generator": torch.Generator().manual_seed(seed)}},
            "kwargs": {"batch_size": batch_size, "num_workers": num_workers, "drop_last": True},
            "requires_supp": True,  # the box's default: BaseDatasetWrapper yields (x, y, {})
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False, "wrapper": None},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True, "wrapper": None},
        "optimizer": {"key": "edgekd_sgd",
                      "kwargs": {"lr": lr, "momentum": optim.momentum, "weight_decay": optim.weight_decay}},
        # stepped after every optimizer step (scheduling_step 1): lr = edgekd's lr_at(step)
        "scheduler": {"key": "LambdaLR", "scheduling_step": 1,
                      "kwargs": {"lr_lambda": lambda step: lr_at(step, total, steps_per_epoch, optim) / lr}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": temperature, "alpha": td_alpha, "reduction": "batchmean"}},
            "weight": weight}}}},
    }
    cpu = torch.device("cpu")
    box = get_distillation_box(teacher, student, {"train": train_dataset}, train_config, cpu, None, False, 1)
    box.teacher_model.eval()  # torchdistill never switches the teacher to eval (its BN would keep updating)
    transform = getattr(train_dataset, "batch_transform", None)
    speeds, seconds, losses = [], [], []
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        seen, loss_sum = 0, 0.0
        start = time.perf_counter()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            if transform is not None:
                sample_batch = transform(sample_batch, epoch, seed)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            loss_sum += loss.item() * len(targets)
            box.post_forward_process(loss=loss)
            seen += len(targets)
        seconds.append(time.perf_counter() - start)
        box.post_epoch_process()
        speeds.append(seen / seconds[-1])
        losses.append(loss_sum / seen)
    return {"images_per_s": speeds, "test_acc": evaluate(box.student_model, test_dataset),
            "seconds": seconds, "train_loss": losses}


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 512) -> float:
    model.eval()
    transform = getattr(dataset, "batch_transform", None)
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x = transform(x, 0, 0) if transform is not None else x
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9, help="edgekd convention: weight of the KD term")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from edgekd.data.datamodule import load_data
    from edgekd.models import create_model

    data = load_data(args.data, resolution=args.resolution, limit=args.limit)
    n = data.info.num_classes
    torch.manual_seed(args.seed)
    # as tools/bench_teacher.py: random-weight teacher (speed does not depend on weights), default options
    teacher = create_model(args.teacher, n, in_chans=data.channels, input_size=args.resolution)
    student = create_model(args.student, n, in_chans=data.channels, input_size=args.resolution)
    result = run_torchdistill(student, teacher, EdgekdSplit(data, "train", augment=True),
                              EdgekdSplit(data, "test", augment=False), args.epochs, args.batch_size, args.lr,
                              args.temperature, args.alpha, args.seed)
    print(f"torchdistill KD: {args.teacher} -> {args.student}, {args.data} ({len(data.train)} train images, "
          f"{args.resolution} px), batch {args.batch_size}, {args.threads} threads")
    print("| epoch | images/s | seconds | train loss |\n|---|---|---|---|")
    for e, (s, t, l) in enumerate(zip(result["images_per_s"], result["seconds"], result["train_loss"]), 1):
        print(f"| {e} | {s:.0f} | {t:.1f} | {l:.4f} |")
    print(f"test accuracy: {result['test_acc']:.4f} ({len(data.test)} images)")


if __name__ == "__main__":
    main()
