"""Benchmark: MetaDistiller on Fashion-MNIST at 32 px - a MobileNetV2-class and a ResNet-18 student, each trained
as baseline (CE), deeply supervised (exits on hard labels), self-distillation (final output as the exits'
teacher) and MetaDistiller, same epochs, several seeds; final-exit and ensemble accuracy, training time.

    python tools/bench_metadistiller.py --limit 5000 --epochs 10 --seeds 0 1 2

Writes the table into docs/benchmarks.md. Runs live under --out; finished runs are reused by a rerun.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd.config import OptimConfig  # noqa: E402
from tools.benchdoc import ensure_run, epoch_records, mean_std, run_header, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--students", nargs="+", default=["mobilenetv2_035", "resnet18"])
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--meta-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_metadistiller")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(data=args.data, resolution=32, limit=args.limit, batch_size=128, checkpoint_interval_s=600.0,
                  optim=OptimConfig(lr=args.lr, warmup_epochs=0.5), teacher=None, epochs=args.epochs)
    variants = [("ce", "ce", {}), ("deep", "metadistiller", {"mode": "deep"}),
                ("self", "metadistiller", {"mode": "self"}),
                ("metadistiller", "metadistiller", {"mode": "meta", "meta_every": str(args.meta_every)})]
    results: dict[tuple[str, str], list[dict]] = {}
    for student in args.students:
        for label, method, options in variants:
            for seed in args.seeds:
                run = args.out / f"{student}-{label}-s{seed}"
                summary = ensure_run(run, **common, student=student, method=method, method_options=options, seed=seed,
                                     student_options={"low_res_stem": student != "resnet18"})
                epochs = epoch_records(run)
                results.setdefault((student, label), []).append(
                    {"acc": summary["last_epoch_test_acc"], "ensemble": summary.get("last_epoch_ensemble_test_acc"),
                     "seconds": sum(e["train_seconds"] for e in epochs)})

    lines = ["| student | training | final exit acc % | ensemble acc % | train s per run | vs CE |", "|---|---|---|---|---|---|"]
    for (student, label), rows in results.items():
        base = statistics.mean(r["seconds"] for r in results[(student, "ce")])
        secs = statistics.mean(r["seconds"] for r in rows)
        ensemble = mean_std([r["ensemble"] for r in rows]) if rows[0]["ensemble"] is not None else "-"
        lines.append(f"| {student} | {label} | {mean_std([r['acc'] for r in rows])} | {ensemble} | {secs:.0f} | {secs / base:.2f}x |")
    body = ("\n".join(run_header(args.threads)) + "\n"
            f"Fashion-MNIST, {args.limit} training images, full test split, 32 px, {args.epochs} epochs, SGD lr {args.lr} "
            f"cosine, batch 128, seeds {args.seeds}; accuracies of the last epoch's weights (the ensemble averages all "
            f"exits' probabilities). MetaDistiller: alpha 0.5, tau 1, meta step in every {args.meta_every}th epoch "
            "(from the first), generator Adam 1e-3. deep / self use the same exits without the generator.\n\n"
            + "\n".join(lines))
    write_section(ROOT / "docs" / "benchmarks.md", "metadistiller", "MetaDistiller vs its baselines, Fashion-MNIST 32 px (short-budget runs)", body)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
