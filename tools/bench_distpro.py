"""Benchmark: DistPro vs its baselines (equally weighted pathways, the final searched weights only) vs Hinton KD,
a ResNet teacher -> MobileNetV3-small student on Fashion-MNIST at 32 px, at a short and a normal retrain budget,
several seeds; the search's cost; and a process searched on digits replayed on Fashion-MNIST (the paper's transfer).

    python tools/bench_distpro.py --limit 3000 --search-epochs 2 --budgets 3 8 --seeds 0 1 2 \\
        --teacher-run runs/bench_netaug/teacher

Each seed searches once (search + the shortest retrain, which is DistPro at that budget); the longer budgets
replay that seed's process.json. Every method at a budget trains the same number of retrain epochs from the same
initialisation; the search epochs are reported as DistPro's extra cost. Writes docs/benchmarks.md (section
distpro); runs live under --out and are reused.
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


def seconds(run: Path, phase: str | None = None) -> float:
    return sum(e["train_seconds"] for e in epoch_records(run) if phase is None or e["phase"] == phase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--transfer-from", default="digits", help="dataset the transferred process is searched on")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--teacher-run", type=Path, help="a trained teacher run on --data (else one is trained)")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--search-epochs", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[3, 8], help="retrain epochs, short first")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_distpro")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = sorted(args.budgets)
    common = dict(resolution=32, limit=args.limit, batch_size=128, checkpoint_interval_s=600.0,
                  optim=OptimConfig(lr=args.lr, warmup_epochs=0.5), student=args.student)

    def teacher(data: str, run: Path | None) -> tuple[Path, dict]:
        run = run or args.out / f"teacher-{data}"
        summary = ensure_run(run, **{**common, "student": args.teacher}, data=data, method="ce", teacher=None, seed=0,
                             epochs=args.teacher_epochs, student_options={"low_res_stem": False})
        return run, summary

    teacher_run, teacher_summary = teacher(args.data, args.teacher_run)
    source_teacher, source_summary = teacher(args.transfer_from, None)

    def distpro(name: str, data: str, teacher_dir: Path, seed: int, epochs: int, **options) -> dict:
        return ensure_run(args.out / name, **common, data=data, teacher=str(teacher_dir), method="distpro", seed=seed,
                          epochs=epochs, method_options={k: str(v) for k, v in options.items()})

    results: dict[tuple[str, int], list[float]] = {}
    search_cost = []
    for seed in args.seeds:
        search = f"search-s{seed}"
        distpro(search, args.data, teacher_run, seed, args.search_epochs + budgets[0],
                search_epochs=args.search_epochs, retrain_epochs=budgets[0])
        process = args.out / search / "process.json"
        search_cost.append((seconds(args.out / search, "search"), seconds(args.out / search, "retrain")))
        # the transfer: a process searched on the other dataset (its own teacher), same architectures
        transfer_search = f"search-{args.transfer_from}-s{seed}"
        distpro(transfer_search, args.transfer_from, source_teacher, seed, args.search_epochs + 1,
                search_epochs=args.search_epochs, retrain_epochs=1)
        transferred = args.out / transfer_search / "process.json"
        for budget in budgets:
            runs = {
                "DistPro": (search if budget == budgets[0] else f"distpro-r{budget}-s{seed}",
                            dict(process=process, retrain_epochs=budget)),
                "final alpha only": (f"final-r{budget}-s{seed}", dict(process=process, schedule="final", retrain_epochs=budget)),
                "equally weighted": (f"equal-r{budget}-s{seed}", dict(schedule="equal", retrain_epochs=budget)),
                f"DistPro, process from {args.transfer_from}": (f"transfer-r{budget}-s{seed}",
                                                                dict(process=transferred, retrain_epochs=budget)),
            }
            for label, (name, options) in runs.items():
                total = options["retrain_epochs"] + (args.search_epochs if name == search else 0)
                summary = distpro(name, args.data, teacher_run, seed, total, **options)
                results.setdefault((label, budget), []).append(summary["last_epoch_test_acc"])
            kd = ensure_run(args.out / f"kd-r{budget}-s{seed}", **common, data=args.data, teacher=str(teacher_run),
                            method="kd", seed=seed, epochs=budget)
            results.setdefault(("Hinton KD", budget), []).append(kd["last_epoch_test_acc"])
            ce = ensure_run(args.out / f"ce-r{budget}-s{seed}", **common, data=args.data, teacher=None, method="ce",
                            seed=seed, epochs=budget)
            results.setdefault(("scratch (CE)", budget), []).append(ce["last_epoch_test_acc"])

    labels = list(dict.fromkeys(label for label, _ in results))
    lines = ["| training | " + " | ".join(f"{b} retrain epochs: test acc %" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(mean_std(results[(label, b)]) for b in budgets) + " |")
    search_s = statistics.mean(s for s, _ in search_cost)
    retrain_s = statistics.mean(r for _, r in search_cost)
    body = "\n".join([
        *run_header(args.threads),
        f"{args.data}, {args.limit} training images, full test split, 32 px; teacher `{args.teacher}` trained once "
        f"(test accuracy {100 * teacher_summary['test_acc']:.2f}%) -> `{args.student}`; SGD lr {args.lr} cosine, batch "
        f"128, seeds {args.seeds}; test accuracy (mean ± std) of the last epoch's weights. DistPro defaults: 27 "
        "pathways (3 teacher x 3 student stage ends x 3 transforms), HCL distance, biased softmax g = 1, clip 0.5. "
        f"Each seed searches {args.search_epochs} epochs on the 80/20 split; every method at a budget then trains the "
        "same retrain epochs from the same initialisation (DistPro replays the interpolated process, \"final alpha "
        "only\" its last weights, \"equally weighted\" 1/27 each). The transferred process was searched on "
        f"{args.transfer_from} with its own `{args.teacher}` teacher (test accuracy "
        f"{100 * source_summary['test_acc']:.2f}%).", "", *lines, "",
        f"Search cost: {search_s:.0f} s for {args.search_epochs} search epochs vs {retrain_s:.0f} s for the "
        f"{budgets[0]}-epoch retrain ({search_s / args.search_epochs / (retrain_s / budgets[0]):.1f}x a retrain epoch), "
        "mean over seeds.",
    ])
    write_section(ROOT / "docs" / "benchmarks.md", "distpro", "DistPro vs equal / final weights vs KD, Fashion-MNIST 32 px (short-budget runs)", body)
    print(body)


if __name__ == "__main__":
    main()
