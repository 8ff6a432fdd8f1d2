"""Benchmark: teacher inference settings and cached vs live KD throughput on this machine.

Part 1 times the teacher's forward pass under each setting TeacherRunner offers (images/s, and the max abs
logit difference from the plain fp32 eager model). Part 2 trains the same KD pair for a few epochs with the
teacher live, and with the logit cache holding K augmentation variants per image (the teacher runs only
while variants are new), and reports images/s per epoch beside plain cross-entropy.

    python tools/bench_teacher.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd import api  # noqa: E402
from edgekd.config import TrainConfig  # noqa: E402
from edgekd.distill.teacher_outputs import TeacherRunner  # noqa: E402
from edgekd.models import create_model  # noqa: E402
from edgekd.train.checkpoint import model_payload, save_atomic  # noqa: E402
from tools.benchdoc import write_section  # noqa: E402


def time_forward(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - start)


def inference_table(args) -> list[str]:
    torch.manual_seed(0)
    teacher = create_model(args.teacher, 10, input_size=args.resolution).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    cpu = torch.device("cpu")
    rows = []
    for batch in (128, 512):
        x = torch.randn(batch, 3, args.resolution, args.resolution)
        with torch.no_grad():
            reference = teacher(x)

        def eager(inp):
            with torch.no_grad():
                return teacher(inp)

        settings = [("eager, no_grad (edgekd before the runner)", eager)]
        for label, kw in (("inference_mode", dict(fold_bn=False, channels_last=False)),
                          ("inference_mode + BN folded", dict(fold_bn=True, channels_last=False)),
                          ("+ channels_last (the runner's default)", dict(fold_bn=True, channels_last=True)),
                          ("+ bf16 autocast", dict(fold_bn=True, channels_last=True, autocast="bf16")),
                          ("+ torch.compile", dict(fold_bn=True, channels_last=True, compile=True))):
            if "compile" in kw and not args.compile:
                continue
            settings.append((label, TeacherRunner(teacher, cpu, **kw)))
        for label, fn in settings:
            speed = time_forward(fn, x, args.repeats)
            error = (fn(x) - reference).abs().max().item()
            rows.append(f"| {batch} | {label} | {speed:.0f} | {error:.1e} |")
    return ["| batch | teacher setting | images/s | max abs logit diff vs eager fp32 |", "|---|---|---|---|", *rows]


def throughput_table(args) -> tuple[list[str], dict]:
    out = args.out
    teacher_file = out / "teacher.pt"
    from edgekd.data.datamodule import load_data

    data = load_data(args.data, resolution=args.resolution, limit=args.limit)
    if not teacher_file.exists():  # speed does not depend on the teacher's weights
        torch.manual_seed(0)
        save_atomic(model_payload(create_model(args.teacher, 10), data.describe()), teacher_file)
    common = dict(data=args.data, resolution=args.resolution, limit=args.limit, student=args.student,
                  epochs=args.epochs, batch_size=128, checkpoint_interval_s=1e9)
    runs = {
        "plain CE (no teacher)": dict(method="ce", teacher=None),
        "KD, teacher live, no BN folding": dict(method="kd", teacher=str(teacher_file), teacher_cache="off", teacher_fold_bn=False),
        "KD, teacher live, fast runner": dict(method="kd", teacher=str(teacher_file), teacher_cache="off"),
        f"KD, cache with {args.variants} variants/image": dict(method="kd", teacher=str(teacher_file), teacher_cache="memory",
                                                          teacher_cache_variants=args.variants),
    }
    rows, raw = [], {}
    for label, kw in runs.items():
        run_dir = out / label.split(",")[0].replace(" ", "_") / str(abs(hash(label)) % 10**6)
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        api.train(TrainConfig(run_dir=str(run_dir), **common, **kw))
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        speeds = [e["images_per_s"] for e in epochs]
        raw[label] = speeds
        hits = [e.get("teacher_cache", {}).get("hit_rate") for e in epochs]
        hit_text = " / ".join("-" if h is None else f"{h:.0%}" for h in hits)
        rows.append(f"| {label} | {' / '.join(f'{s:.0f}' for s in speeds)} | {hit_text} |")
    return ["| run | images/s per epoch | cache hit rate per epoch |", "|---|---|---|", *rows], raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--limit", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_teacher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    inference = inference_table(args)
    throughput, raw = throughput_table(args)
    ce = sum(raw["plain CE (no teacher)"]) / args.epochs
    cached = raw[f"KD, cache with {args.variants} variants/image"]
    later = cached[args.variants:]
    body = "\n".join([
        f"Command: `python tools/bench_teacher.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} threads, no GPU.  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        f"Teacher `{args.teacher}` at {args.resolution} px (standard stem), forward pass only:",
        "",
        *inference,
        "",
        f"Training throughput, `{args.student}` student, {args.data} ({args.limit} images, {args.resolution} px, "
        f"random crop + flip), batch 128, {args.epochs} epochs:",
        "",
        *throughput,
        "",
        (f"Cached KD epochs after the first {args.variants} run at {sum(later) / len(later) / ce:.2f}x plain-CE speed."
         if later else "Raise --epochs above --variants to see cached epochs."),
    ])
    write_section(ROOT / "docs" / "benchmarks.md", "teacher-outputs", "Teacher inference and cached KD throughput", body)
    print(body)


if __name__ == "__main__":
    main()
