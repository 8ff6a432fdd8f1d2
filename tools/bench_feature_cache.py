"""Feature caches: training speed of the teacher-tapping methods once the teacher's maps are cached, against CE.

    python tools/bench_feature_cache.py --threads 1

Every method trains the same student on the same images with the strong teacher of "Distillation pays"
(EfficientNet-Lite0, 93.0% on Fashion-MNIST, reused from bench-runs/, not retrained). Feature methods pair the
teacher's stage maps with the student's at one resolution, so both run at --resolution (the teacher's 64 px by
default). --teacher-cache-variants 1: the first epoch runs the teacher and fills the cache (the "fill" column),
every later epoch reads it (hit rate 1.0); "cached" is the mean images/s of those epochs. CE runs no teacher.
Multi-phase methods: every phase after the fill reads the rows the first served phase wrote; MLD's mask phase
injects noise into the teacher and always runs it live (its epochs are listed apart). Resumable: each method is
one run (benchdoc.ensure_run), archived in bench-runs/bench_feature_cache/. Throughput only: these runs are too
short to say anything about accuracy (the seed benchmarks of issue 19 do that).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.benchdoc import (  # noqa: E402
    DISTILL_PAYS_TEACHER as TEACHER, ensure_run, epoch_records, restore, run_header, write_section)

DOC = Path(os.environ.get("EDGEKD_BENCH_DOC", ROOT / "docs" / "benchmarks.md"))
# method: (epochs, options). The first served epoch fills the cache and the next one still misses the images
# the fill epoch's dropped last batch left out, so every served phase gets 3 epochs: its third reads only.
METHODS = {"ce": (4, {}), "at": (4, {}), "nst": (4, {}), "rkd": (4, {}),
           "fitnet": (5, {"hint_epochs": 3}), "ab": (5, {"init_epochs": 3}), "fsp": (5, {"init_epochs": 3}),
           "mld": (5, {"mask_epochs": 1, "local_epochs": 3, "kd_epochs": 1}),
           "distpro": (5, {"search_epochs": 2, "retrain_epochs": 3})}  # search fills, the retrain reads
SPEED_GOAL = 0.7


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="mobilenetv3_small_050")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--limit", type=int, default=3000, help="training images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="the methods to train (or resume) now; the others' rows come from their finished runs, "
                        "as with --report-only (delete a method's run, in runs/ and bench-runs/, to measure it again)")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_feature_cache")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args()


def run(method: str, args, report_only: bool = False) -> dict:
    from edgekd.config import OptimConfig

    name = f"{method}-{args.cache_dtype}" if args.cache_dtype != "float32" else method
    config = dict(data="fashion-mnist", resolution=args.resolution, student=args.student,
                  teacher=None if method == "ce" else str(TEACHER / "best.pt"), method=method,
                  method_options=METHODS[method][1], epochs=METHODS[method][0], batch_size=args.batch_size,
                  limit=args.limit,
                  optim=OptimConfig(lr=0.05, warmup_epochs=0.5), seed=0, teacher_cache="memory",
                  teacher_cache_variants=1, teacher_cache_dtype=args.cache_dtype, checkpoint_interval_s=1e9)
    run_dir = args.out / name
    if (args.report_only or report_only) and not restore(run_dir):  # finished here or archived in bench-runs/
        return {}
    summary = ensure_run(run_dir, **config)
    if "failed" in summary:
        return {"failed": summary["failed"]}
    records = epoch_records(run_dir)
    served = [r for r in records if "teacher_cache" in r]
    cached = [f"{r['phase']} {r['images_per_s']:.0f}" for r in served if r["teacher_cache"]["hit_rate"] == 1.0]
    slowest = min((r["images_per_s"] for r in served if r["teacher_cache"]["hit_rate"] == 1.0), default=None)
    partial = [f"{r['phase']} {r['images_per_s']:.0f} ({100 * r['teacher_cache']['hit_rate']:.0f}% hits)"
               for r in served if r["teacher_cache"]["hit_rate"] < 1.0]
    live = [f"{r['phase']} {r['images_per_s']:.0f}" for r in records if "teacher_cache" not in r and method != "ce"]
    return {"method": method, "cached": cached, "slowest_cached": slowest, "filling": partial, "live_phases": live,
            # CE: the epochs after the first, like the cached epochs of the others
            "all": sum(r["images_per_s"] for r in records[1:]) / max(len(records) - 1, 1),
            "bytes": served[-1]["teacher_cache"]["bytes"] if served else None}


def report(results: dict[str, dict], args) -> str:
    ce = results.get("ce", {}).get("all")
    lines = ["| method | cache MiB | epochs filling the cache, img/s | epochs read from the cache, img/s | slowest "
             "cached vs CE | epochs not served (MLD masks: teacher live; FSP ce: no teacher) |",
             "|---|---|---|---|---|---|"]
    worst = None
    for method, r in results.items():
        if not r:
            continue
        if "failed" in r:
            lines.append(f"| {method} | failed: {r['failed'][:120]} | | | | |")
            continue
        if method == "ce":
            lines.append(f"| ce (no teacher) | - | - | {r['all']:.0f} | 1.00 | - |")
            continue
        ratio = r["slowest_cached"] / ce if ce and r["slowest_cached"] else None
        if ratio is not None:
            worst = ratio if worst is None else min(worst, ratio)
        lines.append(f"| {method} | {r['bytes'] / 2**20:.0f} | {', '.join(r['filling']) or '-'} | "
                     f"{', '.join(r['cached']) or '-'} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{', '.join(r['live_phases']) or '-'} |")
    goal = ("no cached method measured yet" if worst is None else
            f"{'met' if worst >= SPEED_GOAL else 'missed'} (slowest {worst:.2f}x CE)")
    return "\n".join([
        *run_header(args.threads),
        f"Student {args.student} at {args.resolution} px, {args.limit} Fashion-MNIST training images, batch "
        f"{args.batch_size}, 4 epochs (multi-phase methods 5: 3 in the served phase), crop/flip augmentation with "
        "one banked variant per image; teacher "
        f"efficientnet_lite0 at {args.resolution} px (the Distillation-pays teacher, 93.0%); cache rows "
        f"{args.cache_dtype}, in memory. img/s = training images per second of an epoch, one thread.",
        "",
        *lines,
        "",
        f"Goal: cached feature methods train at >= {SPEED_GOAL}x plain CE's images/s after the bank is filled: {goal}.",
    ])


def main() -> None:
    args = parse_args()
    sys.argv = [a for a in sys.argv if a != "--report-only"]
    torch.set_num_threads(args.threads)
    results = {}
    for method in ["ce"] + [m for m in METHODS if m != "ce"]:  # every row, in the table's order
        print(f"{method} ...", flush=True)
        results[method] = run(method, args, report_only=method != "ce" and method not in args.methods)
    body = report(results, args)
    write_section(DOC, "feature-cache", "Feature caches: teacher-tapping methods at CE's speed", body)
    print(body)


if __name__ == "__main__":
    main()
