"""One QAT epoch per optimiser setting from the same NNCF PTQ model: how QAT's optimiser choice was made.

    python tools/probe_qat_optimizer.py runs/bench_quant/mobilenetv3_small_050@48-nncf-qat

RUN is a QAT run written by `edgekd quantize` (its ptq.pt is the common start; its float source is the KD
teacher). Each setting trains a copy for one epoch (batch 128, cosine, the run's augmentation, Hinton KD T 4,
alpha 0.9) and prints the validation accuracy on 2,000 images and the largest and mean training loss. Prints
only: the numbers quoted in docs/benchmarks.md (Quantization) and docs/quantize.md came from this script.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekd.distill.kd import HintonKD, KDOptions  # noqa: E402
from edgekd.distill.step import Step  # noqa: E402
from edgekd.quantize import nncf_backend  # noqa: E402
from edgekd.quantize.config import CONFIG_NAME, QuantizeConfig  # noqa: E402
from edgekd.quantize.run import PTQ_FILE, _data  # noqa: E402
from edgekd.train.checkpoint import load_model, read_checkpoint  # noqa: E402

SETTINGS = {"sgd-1e-3": ("sgd", 1e-3, 0), "sgd-1e-3-warm10": ("sgd", 1e-3, 10), "sgd-1e-4": ("sgd", 1e-4, 0),
            "adamw-1e-5": ("adamw", 1e-5, 0), "adamw-3e-5": ("adamw", 3e-5, 0), "adamw-1e-4": ("adamw", 1e-4, 0)}


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    right = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    return right / sum(len(y) for _, y in batches)


def one_epoch(qmodel, teacher, dm, optimizer: str, lr: float, warmup_steps: int, batch_size: int = 128):
    model = copy.deepcopy(qmodel)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    distiller = HintonKD(model, teacher, KDOptions(temperature=4.0, alpha=0.9))
    loader = dm.loader("train", batch_size, shuffle=True, augment=True, seed=0)
    steps, losses = len(loader), []
    for i, (x, y) in enumerate(loader):
        scale = (i + 1) / warmup_steps if i < warmup_steps else 0.5 * (1 + math.cos(math.pi * i / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        model.train()
        loss = distiller(Step(x, y)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, max(losses), sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = QuantizeConfig.load(args.run / CONFIG_NAME)
    qmodel = nncf_backend.rebuild(read_checkpoint(args.run / PTQ_FILE, kind="model"))
    teacher, payload = load_model(Path(config.source))
    dm = _data(config, payload)
    val = list(dm.loader("val", 500, shuffle=False, augment=False))[:4]
    print(f"{args.run.name}: float {accuracy(teacher.eval(), val):.4f}, PTQ {accuracy(qmodel, val):.4f}", flush=True)
    for name in args.settings:
        model, worst, mean = one_epoch(qmodel, teacher.eval(), dm, *SETTINGS[name])
        print(f"  {name}: val {accuracy(model, val):.4f}, loss max {worst:.3f} mean {mean:.3f}", flush=True)


if __name__ == "__main__":
    main()
