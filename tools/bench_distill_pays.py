"""Benchmark: does distillation pay? A strong teacher, consistent views and modern logit losses against
training from scratch with the same augmentation, at two schedule lengths, plus a label-scarce table.

Setup (issue "Distillation that pays"): Fashion-MNIST, the full training split, student MobileNetV3-small-0.5
with the MCU (stride-1) stem at 32 px. The teacher is the ImageNet-pretrained EfficientNet-Lite0 fine-tuned at
its own resolution (64 px) once and reused by every arm; its outputs for the bank of augmented views (RandAugment,
crop/flip, mixup/cutmix partner and lambda) are cached on disk once and served to every seed and schedule.

Arms at equal student epochs: scratch (ce, same augmentation, mixup included), Hinton KD (edgekd's default
method before this benchmark; DKD is now), FM, DKD, DIST. Label-scarce: N labels per class; scratch on those
labels; the pretrained teacher fine-tuned on the same labels; the chosen distiller on the labelled images plus
the rest of the training split as unlabeled images.

Every run goes through `benchdoc.ensure_run`: finished runs are reused and interrupted ones resumed, so the
command can be re-run (or run as `--shard K/N` processes side by side, one thread each) until the tables fill.
Finished runs (and the teachers' weights) are also kept in bench-runs/bench_distill_pays/, so a fresh checkout
continues where the last session stopped.

    python tools/bench_distill_pays.py --threads 1 --shard 1/2   # and --shard 2/2 beside it
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd import api  # noqa: E402
from edgekd.config import OptimConfig, TrainConfig  # noqa: E402
from tools.benchdoc import archive, ensure_run, epoch_records, mean_std, restore, run_header, write_section  # noqa: E402

ARMS = ("ce", "kd", "fm", "dkd", "dist")
DOC = Path(os.environ.get("EDGEKD_BENCH_DOC", ROOT / "docs" / "benchmarks.md"))  # smoke runs write elsewhere
LABELS = {"ce": "scratch (CE)", "kd": "Hinton KD (T 4, alpha 0.9)", "fm": "FM (KL at T 1, no labels)",
          "dkd": "DKD (alpha 1, beta 8, T 4)", "dist": "DIST (beta 1, gamma 1, tau 1)"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--student", default="mobilenetv3_small_050")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument("--teacher-resolution", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=0.05)
    p.add_argument("--teacher-body-lr-scale", type=float, default=1.0)
    p.add_argument("--short", type=int, default=2, help="epochs of the short schedule")
    p.add_argument("--long", type=int, default=8, help="epochs of the long schedule (>= 4x short)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--randaug", default="2,9", help="N,M (0 for none)")
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="training images (smoke runs only; the benchmark uses all)")
    p.add_argument("--labels-per-class", type=int, default=100)
    p.add_argument("--scarce-method", default="fm", choices=ARMS[1:])
    p.add_argument("--scarce-epochs", type=int, default=None, help="epochs over labelled + unlabeled (default --short)")
    p.add_argument("--scarce-scratch-epochs", type=int, default=60, help="scratch epochs over the labelled images")
    p.add_argument("--scarce-teacher-epochs", type=int, default=15)
    p.add_argument("--stages", nargs="+", default=["teacher", "short", "long", "scarce"],
                   choices=["teacher", "short", "long", "scarce"])
    p.add_argument("--shard", default="1/1", help="K/N: this process trains every N-th run, from the K-th")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_distill_pays")
    p.add_argument("--no-doc", action="store_true", help="train only; write no section")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the section from the finished runs (progress of a long benchmark)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    shard, shards = (int(v) for v in args.shard.split("/"))
    ops, _, magnitude = args.randaug.partition(",")
    common = dict(data=args.data, resolution=args.resolution, limit=args.limit, student=args.student,
                  student_options={"low_res_stem": True}, batch_size=128, optim=OptimConfig(lr=0.05),
                  device=args.device, checkpoint_interval_s=300.0,
                  randaug_ops=int(ops), randaug_magnitude=int(magnitude or 9), mixup=args.mixup, cutmix=args.cutmix,
                  teacher_resolution=args.teacher_resolution, teacher_cache="disk",
                  teacher_cache_dir=str(args.out / "teacher-cache"), teacher_cache_variants=args.long)
    teacher_optim = OptimConfig(lr=args.teacher_lr, body_lr_scale=args.teacher_body_lr_scale, warmup_epochs=0.5)
    teacher_cfg = dict(teacher=args.teacher, teacher_pretrained=True, teacher_optim=teacher_optim)

    full_teacher = args.out / "teacher-full"
    if args.report_only:
        args.stages = []
        sys.argv = [a for a in sys.argv if a != "--report-only"]  # the section names the command that trains
    if {"teacher", "short", "long"} & set(args.stages):
        _teacher(full_teacher, common, teacher_cfg, args.teacher_epochs)
    plan = []  # (stage, run dir, config); short before long, seeds interleaved across arms
    for stage, epochs in (("short", args.short), ("long", args.long)):
        for seed in args.seeds:
            for arm in args.arms:
                cfg = dict(common, method=arm, epochs=epochs, seed=seed,
                           teacher=str(args.out / "teacher-full" / "teacher") if arm != "ce" else None)
                if arm == "ce":
                    cfg.pop("teacher_resolution")
                plan.append((stage, args.out / f"{stage}-{arm}-seed{seed}", cfg))
    scarce_common = dict(common, labels_per_class=args.labels_per_class)
    for seed in args.seeds:
        plan.append(("scarce", args.out / f"scarce-ce-seed{seed}",
                     dict(scarce_common, method="ce", teacher=None, epochs=args.scarce_scratch_epochs, seed=seed,
                          teacher_resolution=None)))
        plan.append(("scarce", args.out / f"scarce-{args.scarce_method}-seed{seed}",
                     dict(scarce_common, method=args.scarce_method, epochs=args.scarce_epochs or args.short, seed=seed,
                          teacher=str(args.out / "teacher-scarce" / "teacher"), unlabeled="rest")))

    if "scarce" in args.stages:
        _teacher(args.out / "teacher-scarce", scarce_common, teacher_cfg, args.scarce_teacher_epochs)
    for i, (stage, run, cfg) in enumerate(p for p in plan if p[0] in args.stages):
        if i % shards == shard - 1:
            started = time.time()
            result = ensure_run(run, **cfg)
            print(f"{run.name}: {result.get('test_acc', result.get('failed'))} ({time.time() - started:.0f} s)",
                  flush=True)
    if not args.no_doc:
        for run in [run for _, run, _ in plan] + [full_teacher / "teacher", args.out / "teacher-scarce" / "teacher"]:
            restore(run)  # finished elsewhere (another checkout): its records are enough for the tables
        summary = full_teacher / "teacher" / "summary.json"
        write(args, json.loads(summary.read_text()) if summary.exists() else None, plan)


def _teacher(run_dir: Path, common: dict, teacher_cfg: dict, epochs: int) -> dict:
    """Fine-tune the pretrained teacher once (resumable) into run_dir/teacher; a process beside this one that is
    training it already is waited for."""
    import fcntl

    summary = run_dir / "teacher" / "summary.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not summary.exists() and not restore(run_dir / "teacher"):
            from rich.console import Console

            cfg = {k: v for k, v in common.items() if not k.startswith(("randaug", "mix", "cutmix"))}
            api.train_teacher(TrainConfig(run_dir=str(run_dir), **cfg, **teacher_cfg, teacher_epochs=epochs),
                              console=Console(width=200))
        archive(run_dir / "teacher", extra=("best.pt",))  # the arms still to run need its weights
    return json.loads(summary.read_text())


def _summaries(plan, stage: str, prefix: str) -> list[dict]:
    out = []
    for s, run, _ in plan:
        if s == stage and run.name.startswith(prefix) and (run / "summary.json").exists():
            out.append(json.loads((run / "summary.json").read_text()) | {"run": run})
    return out


def _cell(runs: list[dict]) -> str:
    if not runs:
        return "not run yet"
    return f"{mean_std([r['test_acc'] for r in runs])} (n={len(runs)})"


def _seconds(runs: list[dict]) -> str:
    if not runs:
        return "-"
    per_run = [sum(e.get("train_seconds") or 0.0 for e in epoch_records(r["run"])) for r in runs]
    return f"{statistics.mean(per_run) / 60:.1f} min"


def _speed(plan, arm: str) -> tuple[float, int] | None:
    """Mean training images/s of `arm`'s long-schedule epochs that ran without the teacher (every teacher output
    from the cache, or no teacher), and how many epochs that is. Long runs only: they ran one per quiet core, while
    the first short runs shared the cores with other work (their images/s is not comparable)."""
    speeds = []
    for stage, run, _ in plan:
        if stage != "long" or run.name.split("-")[1] != arm or not (run / "summary.json").exists():
            continue
        for e in epoch_records(run):
            cache = e.get("teacher_cache")
            if e.get("images_per_s") and (cache is None or cache["hit_rate"] == 1.0):
                speeds.append(e["images_per_s"])
    return (statistics.mean(speeds), len(speeds)) if speeds else None


def _goals(args, plan, ce_speed, fm_speed) -> list[str]:
    """The issue's three goals, read off the finished runs (met / missed by how much / not measured yet)."""
    def accs(stage, arm):
        return [100 * r["test_acc"] for r in _summaries(plan, stage, f"{stage}-{arm}-")]

    out = []
    scratch = accs("long", "ce")
    distilled = {arm: accs("long", arm) for arm in args.arms if arm != "ce" and accs("long", arm)}
    if len(scratch) >= 2 and distilled:
        best = max(distilled, key=lambda arm: statistics.mean(distilled[arm]))
        b, c = distilled[best], scratch
        gain = statistics.mean(b) - statistics.mean(c)
        spread = (statistics.mean(b) - (statistics.stdev(b) if len(b) > 1 else 0.0)) - \
                 (statistics.mean(c) + statistics.stdev(c))
        met = gain >= 1.5 and spread > 0 and len(b) >= 3 and len(c) >= 3
        out.append(f"- Long schedule, best distiller ({LABELS[best]}, n={len(b)}) against scratch (n={len(c)}): "
                   f"**{gain:+.2f} points** (goal >= 1.5), mean - std minus scratch's mean + std {spread:+.2f} "
                   f"(goal > 0): {'met' if met else 'not met yet' if min(len(b), len(c)) < 3 else 'missed'}.")
    else:
        out.append("- Long schedule: not measured yet (needs scratch and a distiller at 8 epochs).")
    ce, fm = accs("scarce", "ce"), accs("scarce", args.scarce_method)
    if ce and fm:
        gain = statistics.mean(fm) - statistics.mean(ce)
        out.append(f"- Label-scarce: {LABELS[args.scarce_method]} (n={len(fm)}) against scratch on the labels "
                   f"(n={len(ce)}): **{gain:+.2f} points** (goal >= 5): {'met' if gain >= 5 else 'missed'}.")
    else:
        out.append("- Label-scarce: not measured yet.")
    if ce_speed and fm_speed:
        ratio = fm_speed[0] / ce_speed[0]
        out.append(f"- Speed: FM from the cache at **{ratio:.2f}x** scratch's images/s (goal >= 0.8): "
                   f"{'met' if ratio >= 0.8 else 'missed'}.")
    else:
        out.append("- Speed: not measured yet (needs a long FM run whose every teacher output came from the cache).")
    return out


def _plot(args, plan) -> str | None:
    """Validation accuracy per epoch of the long schedule, mean over finished seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for arm in args.arms:
        curves = [[e["val_acc"] for e in epoch_records(r["run"])] for r in _summaries(plan, "long", f"long-{arm}-")]
        if curves:
            mean = [100 * statistics.mean(c[i] for c in curves) for i in range(min(map(len, curves)))]
            ax.plot(range(1, len(mean) + 1), mean, marker="o", label=f"{LABELS[arm]} (n={len(curves)})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{args.student} @ {args.resolution} px, long schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = DOC.parent / "img" / "distill-pays-curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "img/distill-pays-curves.png"


def write(args, teacher: dict | None, plan) -> None:
    lines = run_header(args.threads)
    teacher = teacher or {"test_acc": float("nan")}
    t_min = teacher.get("train_seconds", 0.0) / 60
    finished = [json.loads((r / "summary.json").read_text()) for _, r, _ in plan
                if not r.name.startswith("scarce") and (r / "summary.json").exists()]
    train_images = finished[0]["data"]["sizes"]["train"] if finished else "the"
    lines += [
        f"`{args.data}`, all {train_images} training images (10% of "
        f"the split held out for validation), the full test split. Student `{args.student}` with the MCU stem "
        f"(stride 1) at {args.resolution} px, SGD lr 0.05 cosine, batch 128, seeds {args.seeds}. Augmentation for "
        f"every arm: RandAugment {args.randaug} (N,M), crop/flip, mixup alpha {args.mixup} / CutMix alpha "
        f"{args.cutmix} (per image, one or the other with p 0.5). Teacher: `{args.teacher}` from ImageNet weights, "
        f"fine-tuned at {args.teacher_resolution} px for {args.teacher_epochs} epochs (SGD lr {args.teacher_lr}, "
        f"body lr x{args.teacher_body_lr_scale}, warm-up 0.5 epoch), test accuracy "
        f"**{100 * teacher['test_acc']:.2f}%**, trained once in {t_min:.0f} min and reused by every arm; each arm's "
        f"student sees the teacher's view resized to {args.resolution} px. The teacher's outputs for a bank of "
        f"{args.long} views per image are cached on disk on first use and shared by all arms, seeds and schedules.",
        "",
        "Test accuracy (%) of the weights with the best validation accuracy, mean ± std over seeds, and training "
        "time per run (student epochs only; the teacher's one-off cost is above). Each 8-epoch run had a core to "
        "itself (one thread); the first 2-epoch runs shared the cores with other jobs, so their times run high.",
        "",
        f"| arm | {args.short} epochs | time | {args.long} epochs | time |",
        "|---|---|---|---|---|",
    ]
    for arm in args.arms:
        short = _summaries(plan, "short", f"short-{arm}-")
        long = _summaries(plan, "long", f"long-{arm}-")
        lines.append(f"| {LABELS[arm]} | {_cell(short)} | {_seconds(short)} | {_cell(long)} | {_seconds(long)} |")
    filled = [r.name for s, r, _ in plan if s != "scarce" and (r / "summary.json").exists()
              and any((e.get("teacher_cache") or {}).get("misses") for e in epoch_records(r))]
    if filled:
        lines += ["", f"Runs whose time includes teacher passes (cache misses, filling the shared cache for the runs "
                      f"after them): {', '.join(filled)}."]
    ce_speed, fm_speed = _speed(plan, "ce"), _speed(plan, "fm")
    if ce_speed and fm_speed:
        lines += ["", f"Speed once the teacher's passes are done: FM from the cache {fm_speed[0]:.0f} images/s "
                      f"({fm_speed[1]} long-schedule epochs with every teacher output from the cache) against "
                      f"scratch {ce_speed[0]:.0f} "
                      f"images/s ({ce_speed[1]} epochs): **{fm_speed[0] / ce_speed[0]:.2f}x** (FM's views are made at "
                      f"{args.teacher_resolution} px and resized; scratch's at {args.resolution} px)."]
    plot = _plot(args, plan)
    if plot:
        lines += ["", f"![validation accuracy per epoch]({plot})"]
    scarce_teacher = args.out / "teacher-scarce" / "teacher" / "summary.json"
    ce = _summaries(plan, "scarce", "scarce-ce-")
    distilled = _summaries(plan, "scarce", f"scarce-{args.scarce_method}-")
    teacher_cell = (f"{100 * json.loads(scarce_teacher.read_text())['test_acc']:.2f}" if scarce_teacher.exists()
                    else "not run yet")
    lines += [
        "",
        f"Label-scarce: {args.labels_per_class} labels per class "
        f"({10 * args.labels_per_class} labelled images), the other training images without labels.",
        "",
        "| arm | test accuracy (%) | time |",
        "|---|---|---|",
        f"| scratch (CE) on the labelled images, {args.scarce_scratch_epochs} epochs | {_cell(ce)} | {_seconds(ce)} |",
        f"| teacher `{args.teacher}` pretrained, fine-tuned on the labelled images at {args.teacher_resolution} px, "
        f"{args.scarce_teacher_epochs} epochs | {teacher_cell} | - |",
        f"| {LABELS[args.scarce_method]} on labelled + unlabeled, {args.scarce_epochs or args.short} epochs | "
        f"{_cell(distilled)} | {_seconds(distilled)} |",
    ]
    lines += ["", "Goals (issue \"Distillation that pays\"):", *_goals(args, plan, ce_speed, fm_speed)]
    write_section(DOC, "distill-pays", "Distillation pays: strong teacher, FM, DKD, DIST, "
                  "unlabeled data (Fashion-MNIST 32 px)", "\n".join(lines))


if __name__ == "__main__":
    main()
