"""Benchmark: zoo students on Fashion-MNIST at two resolutions, exported and profiled.

For each student and resolution: train from scratch (CE; the exported accuracy is the point here, not the
distiller), export TFLite fp32 and full-int8 (for cortex-m7: verified in LiteRT and TFLite Micro), then profile
the run on cortex-m7, cortex-m4 and jetson-nano with all four host runners. Writes two sections of
docs/benchmarks.md (export accuracy/sizes/arena/conversion time; profile table + plot) and keeps every run under
--out, so a rerun skips finished work.

    python tools/bench_zoo.py --limit 10000 --epochs 5 --resolutions 32 48
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd import api  # noqa: E402
from edgekd.config import TrainConfig  # noqa: E402
from edgekd.targets import load_target  # noqa: E402
from tools.benchdoc import write_section  # noqa: E402

DEFAULT_MODELS = ["mcunet_tiny", "mobilenetv3_small_035", "mobilenetv3_small_050", "mobilenetv2_035",
                  "mobilenetv2_050", "mobilenetv3_large_035"]
PROFILE_TARGETS = ["cortex-m7", "cortex-m4", "jetson-nano"]


def train_and_export(model: str, resolution: int, args) -> dict:
    run = args.out / f"{model}@{resolution}"
    if not (run / "summary.json").exists() and (run / "last.pt").exists():
        api.train(TrainConfig(run_dir=str(run)), resume=True)  # an interrupted benchmark run continues
    elif not (run / "summary.json").exists():
        shutil.rmtree(run, ignore_errors=True)  # stopped before its first checkpoint
        api.train(TrainConfig(run_dir=str(run), data=args.data, student=model, method="ce", teacher=None,
                              resolution=resolution, limit=args.limit, epochs=args.epochs, seed=0,
                              student_options={"low_res_stem": resolution <= 96}, checkpoint_interval_s=120.0))
    summary = json.loads((run / "summary.json").read_text())
    row = {"model": model, "resolution": resolution, "params": summary["parameters"],
           "pytorch_acc": summary["test_acc"]}
    fp32 = run / "export" / "tflite-fp32" / "manifest.json"
    if not fp32.exists():
        api.export(run, format="tflite", precision="fp32", verify_images=args.verify_images)
    m = json.loads(fp32.read_text())
    row["tflite_fp32_acc"] = m["verification"]["litert"]["accuracy"]
    row["tflite_fp32_max_err"] = m["verification"]["litert"]["max_abs_logit_error"]
    row["tflite_fp32_bytes"] = m["artifact"]["bytes"]
    int8 = run / "export" / "tflite-int8" / "manifest.json"
    if not int8.exists():
        api.export(run, target="cortex-m7", verify_images=args.verify_images)
    m = json.loads(int8.read_text())
    v = m["verification"]
    row.update(reference_acc=v["litert"]["reference_accuracy"], int8_litert_acc=v["litert"]["accuracy"],
               int8_tflm_acc=v["tflite_micro"]["accuracy"], int8_agreement=v["tflite_micro"]["top1_agreement"],
               int8_bytes=m["artifact"]["bytes"], arena_bytes=m["tflm"]["arena_bytes"],
               images=v["litert"]["images"], int8_total_s=m["timing"]["total_s"],
               int8_convert_s=m["conversion"]["convert_s"])
    return row


def export_table(rows: list[dict]) -> str:
    lines = ["| student | px | params | PyTorch fp32 | TFLite fp32 | TFLite int8 (LiteRT) | TFLM int8 | int8 drop (pt) "
             "| fp32 .tflite | int8 .tflite | TFLM arena | onnx2tf int8 s | int8 export total s |", "|" + "---|" * 13]
    for r in rows:
        drop = 100 * (r["reference_acc"] - r["int8_tflm_acc"])
        lines.append(f"| {r['model']} | {r['resolution']} | {r['params'] / 1e3:.0f}K | {100 * r['reference_acc']:.1f} "
                     f"| {100 * r['tflite_fp32_acc']:.1f} | {100 * r['int8_litert_acc']:.1f} | {100 * r['int8_tflm_acc']:.1f} "
                     f"| {drop:+.1f} | {r['tflite_fp32_bytes'] / 1024:.0f} KiB | {r['int8_bytes'] / 1024:.0f} KiB "
                     f"| {r['arena_bytes'] / 1024:.1f} KiB | {r['int8_convert_s']:.0f} | {r['int8_total_s']:.0f} |")
    return "\n".join(lines)


def _kib(value, digits: int) -> str:
    return "-" if value is None else f"{value / 1024:.{digits}f} KiB"


def profile_table(reports: list[dict], target_name: str) -> str:
    runners = ["pytorch", "onnxruntime", "litert", "tflite-micro"]
    head = ["student", "px", "MACs", "params", "SRAM est.", "TFLM arena", "flash est.", ".tflite", "device ms (est.)",
            *(f"host {r} p50 ms" for r in runners), "host limit ms", "accuracy (TFLM int8)", "fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        e, m, lat = r["estimate"], r["measured"], r["latency"]
        host = {t["runner"]: t["p50_ms"] for t in lat["host"]}
        acc = r["accuracy"].get("exported")
        lines.append(
            f"| {r['source']['model']} | {r['source']['resolution']} | {e['macs'] / 1e6:.2f}M | {e['params'] / 1e3:.0f}K "
            f"| {e['sram_bytes'] / 1024:.1f} KiB | {_kib(m.get('tflm_arena_bytes'), 1)} | {e['flash_bytes'] / 1024:.0f} KiB "
            f"| {_kib(m.get('tflite_bytes'), 0)} | {e['latency_ms']:.3g} | "
            + " | ".join(f"{host[k]:.3g}" if k in host else "-" for k in runners)
            + f" | {lat['host_limit_ms']:.3g} | {100 * acc:.1f} | {'yes' if r['fits']['all'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[32, 48])
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--verify-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per host runner")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_zoo")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python tools/bench_zoo.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads of a 2-core CPU, torch {torch.__version__}, no GPU"
    today = datetime.date.today().isoformat()

    rows = [train_and_export(m, r, args) for r in args.resolutions for m in args.models]
    (args.out / "export-results.json").write_text(json.dumps(rows, indent=1))
    worst = max(100 * (r["reference_acc"] - r["int8_tflm_acc"]) for r in rows)
    body = (f"Command: `{command}`  \nMachine: {machine}.  \nDate: {today}\n\n"
            f"Each student trained from scratch (CE, {args.epochs} epochs, {args.limit} Fashion-MNIST training images, "
            f"seed 0, MCU stem for <= 96 px); accuracies on the first {rows[0]['images']} test images, exported "
            "with `edgekd export` (fp32: `--format tflite --precision fp32`; int8: `--target cortex-m7`, 200 "
            "calibration images, per-channel weights, int8 in/out). TFLM = the tflite-micro interpreter's reference "
            "kernels on this host; its arena is the bisected minimum. int8 drop = PyTorch fp32 minus TFLM int8 "
            f"accuracy, goal <= 1 point: worst {worst:+.1f} points.\n\n" + export_table(rows))
    write_section(args.doc, "export-zoo", "Export: zoo students on Fashion-MNIST, fp32 and int8", body)

    runs = [args.out / f"{m}@{r}" for r in args.resolutions for m in args.models]
    plots = []
    sections = []
    for target_name in PROFILE_TARGETS:
        result = api.profile(runs, [target_name], runners=("pytorch", "onnxruntime", "litert", "tflite-micro"),
                             out_dir=args.out / "profiles", threads=1, runs=args.runs)[target_name]
        plot = ROOT / "docs" / "img" / f"profile-{target_name}.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["plot"], plot)
        plots.append(plot)
        target = load_target(target_name)
        reports = result["reports"]
        peak = reports[0]["latency"]["host_peak_macs_per_s"]
        ratio = [t["p50_ms"] / r["latency"]["host_limit_ms"] for r in reports for t in r["latency"]["host"]
                 if t["runner"] == "onnxruntime"]
        sections.append(
            f"### {target_name} ({target.export.precision}; SRAM {target.memory.ram_bytes // 1024} KiB, flash "
            f"{target.memory.flash_bytes // 1024} KiB, budget {target.latency_budget_ms:g} ms)\n\n"
            + profile_table(reports, target_name)
            + f"\n\nHost limit = MACs / this CPU's measured peak ({peak / 1e9:.1f} GMAC/s fp32, one thread, 1024^3 "
              f"GEMM). ONNX Runtime runs these models at {min(ratio):.0f}-{max(ratio):.0f}x that limit: at batch 1 "
              "these layers are far too small to reach GEMM speed.\n\n"
              f"![{target_name}](img/profile-{target_name}.png)\n")
    body = (f"Command: `{command}`  \nMachine: {machine}; host timings with 1 thread, p50 of >= {args.runs} runs "
            f"after warm-up.  \nDate: {today}\n\nThe runs of the export benchmark above, profiled with "
            "`edgekd profile RUN --target T --runners pytorch,onnxruntime,litert,tflite-micro`. SRAM est. and flash est. "
            "come from the profiler's estimate (on the exported int8 graph for the int8 targets; for jetson-nano's fp16 "
            "the traced graph at 2 bytes per value: there SRAM means activation memory and flash the fp16 weights); "
            "TFLM arena and .tflite are measured (int8 targets only). Device "
            "ms is the target's fitted estimate (docs/profile.md), not a measurement; host columns are this machine. "
            "Accuracy: TFLM int8 on the test images above (all three targets get the same int8 model here; "
            "Jetson would run fp16).\n\n" + "\n".join(sections))
    write_section(args.doc, "profile-zoo", "Profile: zoo students on cortex-m7, cortex-m4 and jetson-nano", body)
    print(f"wrote {args.doc} and {', '.join(str(p) for p in plots)}")


if __name__ == "__main__":
    main()
