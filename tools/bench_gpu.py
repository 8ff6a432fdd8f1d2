"""Benchmark: tiny-student training throughput on a CUDA GPU, against what the GPU can compute (issue 19, item 4).

GPU time comes in short loans, so this is one bounded call (--budget-s, default 420 s). For each student and
resolution it measures, with plain CE training (no teacher) and today's loader:

  end-to-end   `edgekd.api.train` as a user runs it; images/s from metrics.jsonl, first epoch left out (warm-up)
  loader-only  the trainer's own training loader: assemble each batch on the host and move it to the GPU
  model-step   the trainer's own step (forward, backward, SGD, its per-step host syncs) on a batch already on
               the GPU, timed with CUDA events
  kernel-only  the GPU kernels of that step (torch.profiler): what the GPU needs for this model, launches aside

The trainer runs loader and step one after the other, so 1/end-to-end ~ 1/loader + 1/step; each part's share of
the end-to-end time per image names the bottleneck: the loader (host batch assembly), host launch/sync overhead
(step minus kernels) or the GPU kernels. The compute limit: training FLOPs per image = 3 x 2 x MACs (edgekd's
profiler; backward ~ 2x forward) against the GPU's dense bf16/fp16 tensor peak and a measured large matmul.

    python tools/bench_gpu.py                      # on a GPU machine; writes docs/benchmarks.md "gpu-throughput"
    bash tools/gpu_session.sh                      # the CUDA tests and this benchmark in one lent-GPU session
    python tools/bench_gpu.py --device cpu --students mobilenetv3_small_050 --resolutions 32 --limit 512 \
        --budget-s 60                              # smoke run of the same code on CPU (never writes docs/)

Raw results: $OUT/bench_gpu.json when OUT is set (the device tool returns files written there), else
runs/bench_gpu/results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout without an installed edgekd (the GPU machine's own Python)

NO_GPU = "tools/bench_gpu.py needs a CUDA GPU; none is visible"
DOC = ROOT / "docs" / "benchmarks.md"
# dense bf16/fp16 tensor-core peaks (datasheets, TFLOP/s); the first name contained in the device's name wins
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
MAX_EPOCHS = 40  # tiny sets (digits) need many epochs; each one also pays an evaluation and a checkpoint
MIN_SLICE_S = {"cuda": 8.0, "cpu": 4.0}  # a config given less time than this is skipped, not measured badly


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", nargs="+", default=["mobilenetv3_small_050", "mcunet_tiny", "efficientnet_lite0"])
    p.add_argument("--resolutions", nargs="+", type=int, default=[32, 64, 96])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default="auto", help="a data spec; auto: fashion-mnist if installed, else digits")
    p.add_argument("--limit", type=int, default=None, help="cap on training images per epoch")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole call, matmul and every config")
    p.add_argument("--measure-s", type=float, default=3.0, help="the loader-only and model-step timings, each")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the same code")
    p.add_argument("--doc", type=Path, default=None,
                   help="where the section goes (default docs/benchmarks.md; --device cpu: a temporary file)")
    return p.parse_args(argv)


# ---- timing -------------------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def seconds_per_call(fn, seconds: float, device, events: bool) -> float:
    """Mean seconds of fn() over about `seconds`, after two warm-up calls (cudnn's algorithm choice, the
    allocator). `events`: CUDA events time the GPU's stream (the device work) instead of the host's clock."""
    import torch

    fn(), fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    n = max(3, int(seconds / max(time.perf_counter() - t, 1e-6)))
    if events and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def kernel_seconds(fn, device, calls: int = 5) -> float | None:
    """GPU time of one fn() call: the summed durations of its kernels, copies and memsets (torch.profiler's CUDA
    activity; one stream, so they do not overlap). None off CUDA or if profiling fails."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync(device)
        # the device-side events themselves, not the CPU ops they are also attached to (that would count twice)
        total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001 - the other numbers stand without it
        print(f"  kernel time not measured: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
        return None
    return total_us / 1e6 / calls if total_us > 0 else None


def matmul_tflops(device, dtype, seconds: float) -> float:
    """Achieved TFLOP/s of a large square matmul in the training dtype: the practical roofline."""
    import torch

    n = matmul_size(device)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, seconds, device, events=True) / 1e12


def matmul_size(device) -> int:
    return 8192 if device.type == "cuda" else 512


def gpu_peak(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_TFLOPS if key in name), None)


# ---- one config ---------------------------------------------------------------------------------------------
def parts(config, data, runtime):
    """The trainer, the CE phase and its student exactly as `api.train` builds them (without writing a run)."""
    from edgekd import api
    from edgekd.distill import METHODS
    from edgekd.train.trainer import TrainViews

    method = METHODS.get(config.method)
    student = api.build_student(config, api.resolve(config), data.info.num_classes)
    phase = method(student, None, method.Options.from_strings({}, config.method)).phases(config.epochs, config.optim)[0]
    trainer = api._trainer(Path(config.run_dir), data, runtime, config, None, None,
                           views=TrainViews(randaug=config.randaug, mix=config.mix))
    return trainer, phase, student


def loader_rate(trainer, phase, runtime, seconds: float) -> float:
    """Images/s of the trainer's training loader, batches moved to the device as the trainer's step moves them."""
    import torch

    loader = trainer._train_loader(phase)  # the trainer's own construction, so nothing here can drift from it

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader.iterate_batches()
            epoch += 1

    stream = batches()

    def one():
        batch = next(stream)
        x = batch.x.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch.y.to(runtime.device, non_blocking=True)

    return loader.batch_size / seconds_per_call(one, seconds, runtime.device, events=False)


def step_rates(trainer, phase, runtime, batch: int, px: int, classes: int, seconds: float):
    """(images/s of the trainer's step on a resident synthetic batch, images/s of its GPU kernels alone)."""
    import torch

    from edgekd.distill.step import Step
    from edgekd.train.phases import build_optimizer

    distiller = phase.distiller.to(runtime.device)  # as Trainer._run_phase prepares a phase
    if runtime.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    distiller.train()
    optimizer = build_optimizer(phase.trainable, phase.optim, phase.head)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.use_scaler)
    x = torch.randn(batch, 3, px, px, device=runtime.device)
    x = x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x
    step = Step(x, torch.randint(0, classes, (batch,), device=runtime.device), torch.arange(batch))
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the same kernels, but weights that stay put cannot diverge on random data

    def one():
        trainer._step(distiller, phase, optimizer, scaler, step)

    step_s = seconds_per_call(one, seconds, runtime.device, events=True)
    kernel_s = kernel_seconds(one, runtime.device)
    return batch / step_s, (batch / kernel_s if kernel_s else None)


def plan(rate: float, seconds: float, n_train: int, batch: int, cap: int | None) -> tuple[int, int | None]:
    """(epochs, limit) that step through about rate x seconds images in >= 3 epochs (the first is warm-up)."""
    n = min(n_train, cap or n_train)
    want = rate * seconds
    if want / 3 <= n:
        per_epoch = max(2 * batch, int(want / 3) // batch * batch)
        return 3, (min(per_epoch, n) if min(per_epoch, n) < n_train else None)
    return min(MAX_EPOCHS, math.ceil(want / n)), (n if n < n_train else None)


def end_to_end(config, deadline: float) -> tuple[float | None, list[float]]:
    """Images/s of `api.train` over its epochs after the first; training stops (saved) at `deadline`."""
    from edgekd import api
    from edgekd.train.trainer import TrainingInterrupted
    from tools.benchdoc import epoch_records

    def stop_at_deadline(trainer, _step):
        if time.monotonic() > deadline:
            trainer.request_stop()

    try:
        api.train(config, on_step=stop_at_deadline)
    except TrainingInterrupted:
        pass  # the epochs finished before the deadline are in metrics.jsonl
    epochs = [r for r in epoch_records(Path(config.run_dir))[1:] if r.get("images_per_s")]
    seconds = sum(r["train_seconds"] for r in epochs)
    images = sum(r["images_per_s"] * r["train_seconds"] for r in epochs)
    return (images / seconds if seconds > 0 else None), [r["images_per_s"] for r in epochs]


def shares(e2e: float | None, loader: float, step: float, kernel: float | None) -> dict[str, float]:
    """Each part's time per image as a share of the end-to-end time per image (they run one after the other)."""
    if not e2e:
        return {}
    t = 1 / e2e
    if kernel is None:
        return {"loader": (1 / loader) / t, "model step": (1 / step) / t}
    return {"loader": (1 / loader) / t, "host launch/sync": max(1 / step - 1 / kernel, 0.0) / t,
            "GPU kernels": (1 / kernel) / t}


def measure(name: str, px: int, args, data, runtime, slice_s: float, tmp: Path) -> dict:
    from edgekd.config import TrainConfig
    from edgekd.profile.graph import trace_model

    started = time.monotonic()
    config = TrainConfig(run_dir=str(tmp / f"{name}-{px}"), data=args.data, resolution=px, student=name,
                         teacher=None, method="ce", epochs=3, batch_size=args.batch_size,
                         device=runtime.device.type, checkpoint_interval_s=1e9)
    trainer, phase, student = parts(config, data, runtime)
    macs = trace_model(student, px, 3).model_macs  # before the step moves the student to the device
    measure_s = min(args.measure_s, 0.1 * slice_s)
    loader = loader_rate(trainer, phase, runtime, measure_s)
    step, kernel = step_rates(trainer, phase, runtime, args.batch_size, px, data.info.num_classes, measure_s)
    # size the end-to-end run from the parts: serial loader + step, ~35% of the slice spent stepping
    predicted = 1 / (1 / loader + 1 / step)
    epochs, limit = plan(predicted, 0.35 * slice_s, len(data.train), args.batch_size, args.limit)
    e2e, per_epoch = end_to_end(config.replace(epochs=epochs, limit=limit), started + 0.9 * slice_s)
    flops = 3 * 2 * macs
    split = shares(e2e, loader, step, kernel)
    bottleneck = max(split, key=split.get) if split else None
    return {
        "student": name, "px": px, "batch": args.batch_size, "macs_per_image": macs, "train_flops_per_image": flops,
        "epochs": epochs, "limit": limit, "end_to_end_images_per_s": e2e, "end_to_end_epochs_images_per_s": per_epoch,
        "loader_images_per_s": loader, "step_images_per_s": step, "kernel_images_per_s": kernel,
        "predicted_images_per_s": predicted, "shares": split,
        "unexplained_share": 1 - sum(split.values()) if split else None,
        "bottleneck": bottleneck, "bottleneck_share": split.get(bottleneck),
        "train_tflops": e2e * flops / 1e12 if e2e else None, "seconds": time.monotonic() - started,
    }


# ---- report -------------------------------------------------------------------------------------------------
def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}%" if v < 10 else f"{v:.0f}%")


def table(rows: list[dict], peak: float, matmul: float) -> list[str]:
    lines = ["| student | px | batch | end-to-end img/s | loader-only img/s | model-step-only img/s "
             "| kernel-only img/s (end-to-end %) | bottleneck (share) | train TFLOP/s | % of peak | % of matmul |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        cells = [r["student"], str(r["px"]), str(r["batch"])]
        if "skipped" in r:
            lines.append("| " + " | ".join(cells + [f"skipped: {r['skipped']}"] + ["-"] * 7) + " |")
            continue
        e2e, kernel, tflops = r["end_to_end_images_per_s"], r["kernel_images_per_s"], r["train_tflops"]
        cells += [_n(e2e), _n(r["loader_images_per_s"]), _n(r["step_images_per_s"]),
                  _n(kernel) + (f" ({_pct(100 * e2e / kernel)})" if kernel and e2e else ""),
                  f"{r['bottleneck']} ({100 * r['bottleneck_share']:.0f}%)" if r["bottleneck"] else "-",
                  "-" if tflops is None else f"{tflops:.3f}",
                  _pct(None if tflops is None else 100 * tflops / peak),
                  _pct(None if tflops is None else 100 * tflops / matmul)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    doc = args.doc or (DOC if args.device == "cuda" else Path(tempfile.mkdtemp(prefix="bench_gpu-")) / "benchmarks.md")
    if args.device == "cpu" and doc.resolve() == DOC.resolve():
        print("tools/bench_gpu.py --device cpu is a smoke run: it never writes docs/benchmarks.md", file=sys.stderr)
        return 2

    from edgekd import api
    from edgekd.data.sources import _debian_fashion_dir
    from edgekd.distributed import DistEnv
    from edgekd.train.trainer import make_runtime
    from tools.benchdoc import run_header, write_section

    if args.data == "auto":
        args.data = "fashion-mnist" if _debian_fashion_dir() is not None else "digits"
    runtime = make_runtime(args.device, True, True, DistEnv())  # TrainConfig's defaults: amp and channels_last
    device = runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    dtype = runtime.amp_dtype or torch.float32
    matmul = matmul_tflops(device, dtype, min(2.0, 0.02 * args.budget_s))
    peak = gpu_peak(name)
    peak_source = "datasheet" if peak else "not in the table: the measured matmul"
    peak = peak or matmul
    precision = f"autocast {str(dtype).removeprefix('torch.')}" if runtime.amp_dtype else "fp32 (no autocast)"
    print(f"{name}: {args.data}, {precision}, matmul {matmul:.4g} TFLOP/s, peak {peak:.4g} ({peak_source})",
          flush=True)

    deadline = started + args.budget_s
    configs = [(s, px) for s in args.students for px in args.resolutions]
    rows, datasets = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu-runs-") as tmp:
        for i, (student, px) in enumerate(configs):
            slice_s = (deadline - time.monotonic()) / (len(configs) - i)
            if slice_s < MIN_SLICE_S[device.type]:
                rows.append({"student": student, "px": px, "batch": args.batch_size, "skipped": "budget spent"})
                continue
            print(f"{student} at {px} px: {slice_s:.0f} s", flush=True)
            if px not in datasets:  # the loader-only data; api.train loads its own copy
                from edgekd.config import TrainConfig

                datasets[px] = api._load(TrainConfig(data=args.data), px, 3)
            try:
                row = measure(student, px, args, datasets[px], runtime, slice_s, Path(tmp))
            except Exception as e:  # noqa: BLE001 - one failing config must not cost the GPU session the others
                row = {"student": student, "px": px, "batch": args.batch_size,
                       "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
            rows.append(row)
            print("\n".join(table([row], peak, matmul)[2:]), flush=True)

    matmul_n = matmul_size(device)
    cuda = f"CUDA {torch.version.cuda}, " if device.type == "cuda" else ""
    machine = (f"{name}, {cuda}torch {torch.__version__}, {os.cpu_count()} CPU cores, "
               f"{torch.get_num_threads()} torch threads, {precision}")
    header = run_header(torch.get_num_threads())
    header[1] = f"Machine: {machine}.  "  # run_header's machine line says "no GPU"
    done = [r for r in rows if r.get("train_tflops") is not None and r["kernel_images_per_s"]]
    met = [r for r in done if r["end_to_end_images_per_s"] >= 0.5 * r["kernel_images_per_s"]]
    goal = (f"met in {len(met)} of {len(done)} configs" if done else "not judged: no kernel-only rate was measured")
    body = "\n".join(header + table(rows, peak, matmul) + [
        "",
        f"Plain CE training (no teacher) on `{args.data}` as `edgekd.api.train` runs it (augmentation on; "
        "channels_last and autocast on CUDA); end-to-end = the epochs after the first. Compute limit: training "
        f"FLOPs per image = 6 x MACs (edgekd's profiler), peak {peak:.4g} TFLOP/s ({peak_source}); a "
        f"{matmul_n}-square matmul measured {matmul:.4g} TFLOP/s. Bottleneck: the largest share of the "
        "end-to-end time per image among the loader (host batch assembly and copy), host launch/sync overhead "
        "(model step minus its kernels) and the GPU kernels, which run one after the other.",
        f"Goal (end-to-end >= 50% of the kernel-only rate, what the GPU computes for the model): {goal}.",
    ])
    write_section(doc, "gpu-throughput", "GPU training throughput", body)
    out = Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT") else ROOT / "runs/bench_gpu/results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": name, "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
        "dtype": str(dtype), "data": args.data, "peak_tflops": peak, "peak_source": peak_source,
        "matmul_tflops": matmul, "budget_s": args.budget_s, "elapsed_s": time.monotonic() - started,
        "doc": str(Path(os.environ.get("EDGEKD_BENCH_DOC", doc))), "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {out} and the gpu-throughput section of {os.environ.get('EDGEKD_BENCH_DOC', doc)} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
