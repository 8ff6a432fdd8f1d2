"""Benchmark: Masked Layer Distillation vs plain KD vs scratch on Fashion-MNIST at 32 px - accuracy per epoch, the
epochs each needs to reach plain KD's final accuracy (the paper claims 2-5x fewer for MLD), and a small version of
the paper's initialisation table (normal(0,1), normal(1,1), constant 1: scratch vs MLD).

    python tools/bench_mld.py --limit 3000 --epochs 10 --seeds 0 1 2 --teacher-run runs/bench_netaug/teacher

Writes tables and docs/img/mld-curves.png into docs/benchmarks.md. Runs live under --out and are reused.
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

INITS = ["normal:0,1", "normal:1,1", "constant:1"]


def val_curve(run: Path) -> list[float | None]:
    """Validation accuracy after every training epoch (None where the phase is not evaluated)."""
    return [e.get("val_acc") for e in epoch_records(run)]


def mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    return [None if any(c[i] is None for c in curves) else statistics.mean(c[i] for c in curves)
            for i in range(len(curves[0]))]


def epochs_to_reach(curve: list[float | None], level: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v is not None and v >= level), None)


def plot(curves: dict[str, dict[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (student, by_method) in zip(axes[0], curves.items()):
        for method, curve in by_method.items():
            xs = [i + 1 for i, v in enumerate(curve) if v is not None]
            ax.plot(xs, [100 * v for v in curve if v is not None], marker="o", label=method)
        ax.set_title(student)
        ax.set_xlabel("epoch (all phases counted)")
        ax.set_ylabel("validation accuracy % (mean of seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--students", nargs="+", default=["mobilenetv3_small_050", "efficientnet_lite0"])
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--teacher-run", type=Path, help="reuse a trained teacher run (else one is trained)")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mask-epochs", type=int, default=1)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--init-student", default="mobilenetv3_small_050")
    parser.add_argument("--init-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_mld")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(data=args.data, resolution=32, limit=args.limit, batch_size=128, checkpoint_interval_s=600.0,
                  optim=OptimConfig(lr=args.lr, warmup_epochs=0.5), epochs=args.epochs)
    teacher_run = args.teacher_run or args.out / "teacher"
    teacher = ensure_run(teacher_run, **{**common, "epochs": args.teacher_epochs}, student=args.teacher, method="ce",
                         teacher=None, student_options={"low_res_stem": False}, seed=0)
    mld_options = {"mask_epochs": str(args.mask_epochs), "local_epochs": str(args.local_epochs)}
    methods = {"scratch": ("ce", {}), "kd": ("kd", {}), "mld": ("mld", mld_options)}

    def run(student, label, seed, init="default"):
        method, options = methods[label]
        name = f"{student}-{label}-s{seed}" + ("" if init == "default" else "-" + init.replace(":", "").replace(",", "_"))
        summary = ensure_run(args.out / name, **common, student=student, method=method, method_options=options,
                             seed=seed, student_init=init, teacher=None if method == "ce" else str(teacher_run))
        return summary, None if "failed" in summary else val_curve(args.out / name)

    def init_cell(label, init="default"):
        summaries = [run(args.init_student, label, s, init)[0] for s in args.init_seeds]
        finished = [s["last_epoch_test_acc"] for s in summaries if "failed" not in s]
        failed = len(summaries) - len(finished)
        return " ".join(filter(None, [mean_std(finished) if finished else "",
                                      f"({failed} of {len(summaries)} diverged: loss nan)" if failed else ""]))

    rows, curves = [], {}
    for student in args.students:
        results = {label: [run(student, label, s) for s in args.seeds] for label in methods}
        curves[student] = {label: mean_curve([c for _, c in r]) for label, r in results.items()}
        kd_final = curves[student]["kd"][-1]
        for label, r in results.items():
            reach = epochs_to_reach(curves[student][label], kd_final)
            rows.append(f"| {student} | {label} | {mean_std([s['last_epoch_test_acc'] for s, _ in r])} | "
                        f"{100 * curves[student][label][-1]:.2f} | {reach if reach else f'not in {args.epochs}'} |")
    plot(curves, ROOT / "docs" / "img" / "mld-curves.png")
    curve_rows = [f"| {student} | {label} | " + " / ".join("-" if v is None else f"{100 * v:.1f}" for v in curve) + " |"
                  for student, by_method in curves.items() for label, curve in by_method.items()]

    init_rows = [f"| {init} | {init_cell('scratch', init)} | {init_cell('mld', init)} |" for init in INITS]
    init_rows.append(f"| default (the zoo's init) | {init_cell('scratch')} | {init_cell('mld')} |")

    body = "\n".join([
        *run_header(args.threads),
        f"{args.data}, {args.limit} training images (validation: 10% of the full training split, set aside "
        f"first), full test split, 32 px; "
        f"teacher `{args.teacher}` trained once (test accuracy {100 * teacher['test_acc']:.2f}%); every run "
        f"{args.epochs} epochs in total, SGD lr {args.lr} cosine (restarted per MLD phase), batch 128, seeds "
        f"{args.seeds}. MLD: {args.mask_epochs} mask epoch(s), {args.local_epochs} local-distillation epoch(s), the "
        "rest Hinton KD (T 4, alpha 0.9) - the same KD as the `kd` runs. Test accuracy of the last epoch's weights.",
        "",
        "| student | training | test acc % (mean ± std) | final val acc % (mean) | epochs to reach KD's final val acc |",
        "|---|---|---|---|---|", *rows, "",
        "Validation accuracy per epoch (mean of seeds; `-`: MLD's mask and local phases train no classifier):", "",
        "| student | training | val acc % per epoch |", "|---|---|---|", *curve_rows, "",
        "![MLD vs KD vs scratch per epoch](img/mld-curves.png)", "",
        f"Initialisation (the paper's Table 1 in small): `{args.init_student}`, every conv/linear weight and bias "
        f"re-initialised (`--student-init`), BatchNorm at gamma 1 / beta 0, seeds {args.init_seeds}, test accuracy %:", "",
        "| init | scratch | MLD |", "|---|---|---|", *init_rows,
    ])
    write_section(ROOT / "docs" / "benchmarks.md", "mld", "Masked Layer Distillation vs KD vs scratch, Fashion-MNIST 32 px (short-budget runs)", body)
    print(body)


if __name__ == "__main__":
    main()
