"""Benchmark: teacher inference settings and cached vs live KD throughput on this machine.

Part 1 times the teacher's forward pass under each setting TeacherRunner offers (images/s, and the max abs
logit difference from the plain fp32 eager model). Part 2 trains the same KD pair for a few epochs with the
teacher live, and with the logit cache holding K augmentation variants per image (the teacher runs only
while variants are new), and reports images/s per epoch beside plain cross-entropy; with --torchdistill the
same pair also trains under torchdistill 1.1.5 (tools/bench_torchdistill.py; `pip install -e '.[bench]'`).
Part 3 (--accuracy-seeds) trains a real teacher once and checks that cached KD reaches live KD's accuracy.

    python tools/bench_teacher.py --threads 2 --limit 2000 --epochs 10 --variants 2 --torchdistill --teacher-opt low_res_stem=true
    python tools/bench_teacher.py --threads 1 --limit 4000 --epochs 10 --variants 2 --skip-throughput --accuracy-seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd import api  # noqa: E402
from edgekd.config import TrainConfig  # noqa: E402
from edgekd.distill.teacher_outputs import TeacherRunner  # noqa: E402
from edgekd.models import create_model  # noqa: E402
from edgekd.train.checkpoint import model_payload, save_atomic  # noqa: E402
from tools.benchdoc import ensure_run, mean_std, run_header, write_section  # noqa: E402


def time_forward(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * len(x) / (time.perf_counter() - start)


def inference_table(args) -> list[str]:
    torch.manual_seed(0)
    teacher = create_model(args.teacher, 10, input_size=args.resolution, **args.teacher_options).eval()
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


def teacher_macs(args) -> float:
    from edgekd.profile.graph import trace_model

    model = create_model(args.teacher, 10, input_size=args.resolution, **args.teacher_options).eval()
    return trace_model(model, args.resolution).model_macs


def throughput_table(args) -> tuple[list[str], dict]:
    out = args.out
    teacher_file = out / f"teacher{args.teacher_tag}.pt"
    from edgekd.data.datamodule import load_data

    data = load_data(args.data, resolution=args.resolution, limit=args.limit)
    if not teacher_file.exists():  # speed does not depend on the teacher's weights
        torch.manual_seed(0)
        save_atomic(model_payload(create_model(args.teacher, 10, **args.teacher_options), data.describe()), teacher_file)
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
    if args.torchdistill:
        from edgekd.train.checkpoint import load_model
        from tools.bench_torchdistill import EdgekdSplit, run_torchdistill

        label = "torchdistill 1.1.5 KD, teacher live (its no_grad forward)"
        teacher, _ = load_model(teacher_file)
        torch.manual_seed(0)
        student = create_model(args.student, data.info.num_classes, in_chans=data.channels, input_size=args.resolution)
        result = run_torchdistill(student, teacher, EdgekdSplit(data, "train", augment=True),
                                  EdgekdSplit(data, "test", augment=False), args.epochs, 128,
                                  TrainConfig().optim.lr)
        raw[label] = result["images_per_s"]
        rows.append(f"| {label} | {' / '.join(f'{s:.0f}' for s in raw[label])} | - |")
    return ["| run | images/s per epoch | cache hit rate per epoch |", "|---|---|---|", *rows], raw


def accuracy_table(args) -> list[str]:
    """Cached vs live KD accuracy with a trained teacher, several seeds (the cache must not cost accuracy)."""
    common = dict(data=args.data, resolution=args.resolution, limit=args.limit, batch_size=128,
                  checkpoint_interval_s=600.0, epochs=args.epochs)
    out = args.out / f"accuracy{args.teacher_tag}"
    teacher_run = out / "teacher"
    teacher = ensure_run(teacher_run, **{**common, "epochs": args.teacher_epochs}, student=args.teacher, method="ce",
                         teacher=None, seed=0, student_options=args.teacher_options)
    runs = {"KD, teacher live": dict(teacher_cache="off"),
            f"KD, cache with {args.variants} variants/image": dict(teacher_cache="memory",
                                                                teacher_cache_variants=args.variants)}
    rows = []
    for label, kw in runs.items():
        key = "live" if kw["teacher_cache"] == "off" else f"cached{args.variants}"
        accs = [ensure_run(out / f"{key}-s{seed}", **common, **kw, student=args.student, method="kd",
                           teacher=str(teacher_run), seed=seed)["last_epoch_test_acc"] for seed in args.accuracy_seeds]
        rows.append(f"| {label} | {mean_std(accs)} | {[round(100 * a, 2) for a in accs]} |")
    return [f"Accuracy with a trained teacher ({args.teacher_epochs} epochs, test accuracy "
            f"{100 * teacher['test_acc']:.2f}%), same data and epochs, seeds {args.accuracy_seeds}, test accuracy of "
            "the last epoch's weights:", "",
            "| run | test acc % (mean ± std) | per seed |", "|---|---|---|", *rows]


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
    parser.add_argument("--teacher-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="teacher model option, e.g. low_res_stem=true (CIFAR-style ResNet: 15x the MACs at 32 px)")
    parser.add_argument("--torchdistill", action="store_true", help="also train the pair under torchdistill 1.1.5")
    parser.add_argument("--accuracy-seeds", type=int, nargs="*", default=[], help="seeds for cached vs live accuracy")
    parser.add_argument("--teacher-epochs", type=int, default=8, help="the trained teacher of the accuracy check")
    parser.add_argument("--skip-throughput", action="store_true", help="only the accuracy check")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_teacher")
    args = parser.parse_args()
    args.teacher_options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.teacher_opt)}
    args.teacher_tag = "".join(f"-{k}={v}" for k, v in sorted(args.teacher_options.items()))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    head = run_header(args.threads)
    teacher_text = f"`{args.teacher}` {args.teacher_options or '(default options)'}"
    if not args.skip_throughput:
        body = "\n".join(head + throughput_body(args, teacher_text))
        write_section(ROOT / "docs" / "benchmarks.md", "teacher-outputs", "Teacher inference and cached KD throughput", body)
        print(body)
    if args.accuracy_seeds:  # its own section: a cheaper teacher may serve, accuracy does not depend on speed
        body = "\n".join(head + [f"Teacher {teacher_text}, student `{args.student}`, {args.data} ({args.limit} "
                                 f"images, {args.resolution} px, random crop + flip), batch 128, {args.epochs} epochs.",
                                 ""] + accuracy_table(args))
        write_section(ROOT / "docs" / "benchmarks.md", "teacher-cache-accuracy", "Cached vs live KD accuracy", body)
        print(body)


def throughput_body(args, teacher_text: str) -> list[str]:
    inference = inference_table(args)
    throughput, raw = throughput_table(args)
    ce = sum(raw["plain CE (no teacher)"]) / args.epochs
    cached_label = f"KD, cache with {args.variants} variants/image"
    later = raw[cached_label][args.variants:]
    mean = {label: sum(v) / len(v) for label, v in raw.items()}
    td = next((label for label in raw if label.startswith("torchdistill")), None)
    comparison = [] if td is None else [
        f"Over the whole {args.epochs}-epoch run: edgekd KD live (fast runner) {mean['KD, teacher live, fast runner']:.0f} "
        f"images/s = {mean['KD, teacher live, fast runner'] / mean[td]:.2f}x torchdistill's {mean[td]:.0f}; edgekd KD "
        f"cached {mean[cached_label]:.0f} images/s = {mean[cached_label] / mean[td]:.2f}x torchdistill's. Plain CE in "
        f"edgekd: {ce:.0f} images/s."]
    return [
        f"Teacher {teacher_text} at {args.resolution} px, {teacher_macs(args) / 1e6:.0f} MMACs per image, forward "
        "pass only:", "", *inference, "",
        f"Training throughput, `{args.student}` student, {args.data} ({args.limit} images, {args.resolution} px, "
        f"random crop + flip), batch 128, {args.epochs} epochs:", "", *throughput, "",
        (f"Cached KD epochs after the first {args.variants} run at {sum(later) / len(later) / ce:.2f}x plain-CE speed."
         if later else "Raise --epochs above --variants to see cached epochs."),
        *([""] + comparison if comparison else []),
    ]


if __name__ == "__main__":
    main()
