"""Benchmark: every "what to match" distiller against scratch and KD, and SSKD against its multi-loss baseline and
against its number of stages - one ResNet teacher -> MobileNetV3-small-0.5 on Fashion-MNIST at 32 px, the same
epoch budget for every method, several seeds.

    python tools/bench_methods.py --limit 5000 --epochs 8 --seeds 0 1 2

Writes two tables into docs/benchmarks.md (methods; SSKD stages). Runs live under --out and are reused.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.config import OptimConfig, TrainConfig  # noqa: E402
from tools.benchdoc import ensure_run, run_header, write_section  # noqa: E402

METHODS = ["ce", "kd", "logit_l2", "fitnet", "at", "nst", "ab", "fsp", "rkd", "dml", "byot", "sskd", "sskd_multiloss"]
NO_TEACHER = {"ce", "dml", "byot"}


def run_once(args, common, teacher_run: Path, name: str, method: str, seed: int, options: dict) -> dict:
    summary = ensure_run(args.out / f"{name}-s{seed}", **common, method=method, method_options=options, seed=seed,
                         teacher=None if method in NO_TEACHER else str(teacher_run))
    if "failed" in summary:
        raise SystemExit(f"{name} seed {seed} failed: {summary['failed']}")
    return {"acc": summary["test_acc"], "images_per_s": summary["train_images_per_s"]}


def table(rows: dict[str, list[dict]], baseline: str) -> list[str]:
    lines = ["| training | test acc % (mean ± std) | per seed | train images/s (final phase) | vs scratch |",
             "|---|---|---|---|---|"]
    base_acc = statistics.mean(r["acc"] for r in rows[baseline]) * 100
    for name, runs in rows.items():
        accs = [100 * r["acc"] for r in runs]
        speed = [r["images_per_s"] for r in runs if r["images_per_s"]]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.2f} ± {std:.2f} | {[round(a, 2) for a in accs]} | "
                     f"{statistics.mean(speed):.0f} | {statistics.mean(accs) - base_acc:+.2f} pt |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--teacher-run", type=Path, help="reuse a trained teacher run (else one is trained)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], help="SSKD stage counts to compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_methods")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(data=args.data, resolution=32, limit=args.limit, batch_size=128, checkpoint_interval_s=600.0,
                  student=args.student, student_options={"low_res_stem": False}, epochs=args.epochs,
                  optim=OptimConfig(lr=0.05, warmup_epochs=0.5))
    teacher_run = args.teacher_run or args.out / "teacher"
    teacher_acc = ensure_run(teacher_run, **{**common, "student": args.teacher, "epochs": args.teacher_epochs},
                             method="ce", teacher=None, seed=0)["test_acc"]

    methods = {m: [run_once(args, common, teacher_run, m, m, s, {}) for s in args.seeds] for m in args.methods}
    stages = {}
    for k in args.stages:
        for method in ("sskd", "sskd_multiloss"):
            name = f"{method} ({k} stage{'s' if k > 1 else ''})"
            stages[name] = [run_once(args, common, teacher_run, f"{method}-k{k}", method, s, {"stages": str(k)})
                            for s in args.seeds]
    head = ("\n".join(run_header(args.threads)) + "\n"
            f"{args.data}, {args.limit} training images, full test split, 32 px, teacher `{args.teacher}` "
            f"({TrainConfig.load(teacher_run / 'config.yaml').epochs} epochs, test accuracy {100 * teacher_acc:.2f}%) -> `{args.student}`, "
            f"{args.epochs} epochs for every method (multi-phase methods split them per their defaults, "
            f"docs/methods.md), SGD lr 0.05 cosine, batch 128, seeds {args.seeds}, method defaults; test accuracy "
            "of the weights with the best validation accuracy.\n\n")
    write_section(ROOT / "docs" / "benchmarks.md", "methods", "Every distiller vs scratch and KD, Fashion-MNIST 32 px (short-budget runs)",
                  head + "\n".join(table(methods, "ce")))
    write_section(ROOT / "docs" / "benchmarks.md", "sskd-stages", "SSKD vs multi-loss and number of stages (short-budget runs)",
                  head + "\n".join(table({**{"ce": methods.get("ce", [])}, **stages} if "ce" in methods else stages,
                                         "ce" if "ce" in methods else next(iter(stages)))))


if __name__ == "__main__":
    main()
