"""Benchmark: NetAug on Fashion-MNIST at 32 px - a tiny student (baseline, NetAug, KD, NetAug+KD) and a large
one (baseline, NetAug, where the paper expects no gain), several seeds, same epochs and learning rate.

    python tools/bench_netaug.py --limit 5000 --epochs 6 --seeds 0 1 2

Writes the table (test accuracy mean/std, training time per run and NetAug's overhead) into docs/benchmarks.md.
Runs live under --out; finished runs are reused by a rerun.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd import api  # noqa: E402
from edgekd.config import OptimConfig, TrainConfig  # noqa: E402
from tools.benchdoc import run_header, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--tiny", default="mobilenetv2_035")
    parser.add_argument("--large", default="resnet18")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02, help="one learning rate for every run (NetAug needs ~half of CE's usual)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--large-seeds", type=int, nargs="+", help="seeds for the large student (default: --seeds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_netaug")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(data=args.data, resolution=32, limit=args.limit, batch_size=128, checkpoint_interval_s=600.0,
                  optim=OptimConfig(lr=args.lr, warmup_epochs=0.5))
    teacher_run = args.out / "teacher"
    if not (teacher_run / "summary.json").exists():
        api.train(TrainConfig(run_dir=str(teacher_run), **common, student=args.teacher, method="ce", teacher=None,
                              epochs=args.teacher_epochs, student_options={"low_res_stem": False}, seed=0))
    teacher_acc = json.loads((teacher_run / "summary.json").read_text())["test_acc"]

    plan = [(args.tiny, "ce"), (args.tiny, "netaug"), (args.tiny, "kd"), (args.tiny, "netaug+kd"),
            (args.large, "ce"), (args.large, "netaug")]
    results: dict[tuple[str, str], list[dict]] = {}
    for student, method in plan:
        for seed in (args.large_seeds or args.seeds) if student == args.large else args.seeds:
            run = args.out / f"{student}-{method}-s{seed}"
            if not (run / "summary.json").exists():
                if run.exists():
                    api.train(TrainConfig(run_dir=str(run)), resume=True)
                else:
                    uses_teacher = method in ("kd", "netaug+kd")
                    api.train(TrainConfig(run_dir=str(run), **common, student=student, method=method,
                                          teacher=str(teacher_run) if uses_teacher else None, epochs=args.epochs,
                                          student_options={"low_res_stem": student == args.tiny}, seed=seed))
            summary = json.loads((run / "summary.json").read_text())
            epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            results.setdefault((student, method), []).append(
                {"acc": summary["test_acc"], "seconds": sum(e["train_seconds"] for e in epochs),
                 "augmented_epochs": sum("augmented" in e.get("terms", {}) for e in epochs)})

    lines = ["| student | method | test acc % (mean ± std) | per seed | train s per run | vs baseline |", "|---|---|---|---|---|---|"]
    for (student, method), rows in results.items():
        accs = [100 * r["acc"] for r in rows]
        secs = statistics.mean(r["seconds"] for r in rows)
        base = statistics.mean(r["seconds"] for r in results[(student, "ce")])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {student} | {method} | {statistics.mean(accs):.2f} ± {std:.2f} | "
                     f"{[round(a, 2) for a in accs]} | {secs:.0f} | {secs / base:.2f}x time |")
    body = ("\n".join(run_header(args.threads)) + "\n"
            f"Fashion-MNIST, {args.limit} training images, full test split, 32 px, {args.epochs} epochs, SGD lr "
            f"{args.lr} cosine (one rate for all: NetAug diverges at CE's usual 0.05 on small batches, see "
            f"docs/methods.md), batch 128, seeds {args.seeds} (large student: {args.large_seeds or args.seeds}); the tiny student with the MCU stem (stride 1), the large one "
            "with its standard stride-2 stem (to keep its CPU cost affordable). NetAug defaults (alpha 1, expand factors "
            "1.0-2.8, width factors 1.0-2.6, augmentation for the first half of the epochs). KD: T=4, alpha 0.9 "
            f"from a `{args.teacher}` teacher trained once ({args.teacher_epochs} epochs, test accuracy "
            f"{100 * teacher_acc:.2f}%). Training time includes NetAug's augmented forward/backward (first half "
            "only).\n\n" + "\n".join(lines))
    write_section(ROOT / "docs" / "benchmarks.md", "netaug", "NetAug vs baseline and KD, Fashion-MNIST 32 px (short-budget runs)", body)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
