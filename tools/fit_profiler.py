"""Fit each target's latency model to its published references and report the estimate's error.

usage: python tools/fit_profiler.py [--targets NAME ...] [--write]
       python tools/fit_profiler.py --memory profiles/calibration/tflm-measurements.jsonl
With --write the fitted cycles_per_mac / cycles_per_op replace the values in targets/<name>.yaml (the references
and cycles_per_element, an assumption, stay as written). GPU targets with two or more "fit" references also fit
cycles_per_op (a kernel-launch cost per layer); MCUs and CPUs keep theirs fixed (an assumption in the YAML).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from edgekd.profile.latency import fit_latency_model, reference_errors
from edgekd.targets import list_targets


FLASH_FEATURES = ("tensors", "quant_channels")


def fit_memory(path: Path) -> list[str]:
    """Fit the persistent-arena op data (non-negative, per op kind) and the .tflite overhead to the graph features
    of the exported files; print the coefficients for edgekd/profile/estimate.py and the leave-one-out error of the
    estimate from the traced PyTorch model (what `edgekd profile` uses before export) on every measurement."""
    from scipy.optimize import nnls

    from edgekd.profile.estimate import TAIL_FIXED

    lines: list[str] = []
    print_ = lines.append
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kinds = sorted({k for r in rows for k in r["estimate_from_tflite"]["features"] if k.startswith("op:")})

    def feats(key: str, names) -> np.ndarray:
        return np.array([[1.0, *(r[key]["features"].get(n, 0.0) for n in names)] for r in rows])

    def fixed(key: str) -> np.ndarray:
        return np.array([sum(c * r[key]["features"][n] for n, c in TAIL_FIXED.items()) for r in rows])

    tail = np.array([r["tflm"]["tail"] for r in rows], float)
    exact, traced = feats("estimate_from_tflite", kinds), feats("estimate_traced", kinds)
    target = tail - fixed("estimate_from_tflite")
    coef, _ = nnls(exact, target)
    print_("TAIL_OP_DATA = {" + ", ".join(f'"{n}": {c:.1f}' for n, c in zip(("constant", *(k[3:] for k in kinds)), coef)
                                         if c > 0 or n == "constant") + "}")
    loo_tail = np.array([traced[i] @ nnls(np.delete(exact, i, 0), np.delete(target, i))[0] for i in range(len(rows))])
    loo_tail += fixed("estimate_traced")
    print_(f"  persistent bytes, traced model, leave-one-out over {len(rows)}: max |error| {np.abs(loo_tail / tail - 1).max():.2%}")

    size = np.array([r["tflite_bytes"] for r in rows], float)
    exact, traced = feats("estimate_from_tflite", FLASH_FEATURES), feats("estimate_traced", FLASH_FEATURES)
    base = lambda key: np.array([r[key]["features"]["constant_bytes"] for r in rows])  # noqa: E731
    target = size - base("estimate_from_tflite")
    coef, *_ = np.linalg.lstsq(exact, target, rcond=None)
    print_("FLASH_COEFFICIENTS = {" + ", ".join(f'"{n}": {c:.2f}' for n, c in zip(("constant", *FLASH_FEATURES), coef)) + "}")
    loo = np.array([traced[i] @ np.linalg.lstsq(np.delete(exact, i, 0), np.delete(target, i), rcond=None)[0]
                    for i in range(len(rows))]) + base("estimate_traced")
    print_(f"  flash, traced model, leave-one-out over {len(rows)}: max |error| {np.abs(loo / size - 1).max():.2%}")

    head = np.array([r["tflm"]["head"] for r in rows], float)
    total = np.array([r["tflm"]["total"] for r in rows], float)
    planned = np.array([r["estimate_traced"]["activation_bytes"] for r in rows], float)
    arena = planned + loo_tail
    print_(f"activations (planner on the traced model) vs TFLM head: max |error| {np.abs(planned / head - 1).max():.2%}")
    print_(f"arena (activations + leave-one-out persistent) vs TFLM total: max |error| {np.abs(arena / total - 1).max():.2%}")
    for r, a, e in zip(rows, arena, arena / total - 1):
        print_(f"  {r['model']}@{r['resolution']}: TFLM total {r['tflm']['total']:,} B, estimate {a:,.0f} B ({e:+.2%})")
    print("\n".join(lines))
    return lines


def write_doc(path: Path, lines: list[str]) -> None:
    import datetime
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tools.benchdoc import write_section

    body = (f"Command: `python tools/measure_tflm.py --out {path}` (the measurements: every zoo student at 32 and 64 px, "
            f"converted with onnx2tf to full int8 and run in TFLite Micro's recording allocator), then "
            f"`python tools/fit_profiler.py --memory {path} --doc`.  \nMachine: x86_64, 2 CPU cores (TFLM reference "
            f"kernels, 64-bit host).  \nDate: {datetime.date.today().isoformat()}\n\n"
            "Errors of the profiler's estimate made from the traced PyTorch model (before any export) against the "
            "measured numbers; leave-one-out: each model's coefficients were fitted without it. Activations are "
            "the planner's peak vs TFLM's planned head; the arena is activations + persistent bytes vs TFLM's "
            "total.\n\n```\n" + "\n".join(lines) + "\n```")
    write_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "profiler-accuracy",
                  "Profiler accuracy: SRAM and flash estimates vs TFLite Micro", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--memory", type=Path, help="fit the memory/flash coefficients to these measurements")
    parser.add_argument("--doc", action="store_true", help="with --memory: also write docs/benchmarks.md#profiler-accuracy")
    args = parser.parse_args()
    if args.memory:
        lines = fit_memory(args.memory)
        if args.doc:
            write_doc(args.memory, lines)
        return
    for target in list_targets():
        if args.targets and target.name not in args.targets or target.latency_model is None:
            continue
        lm = target.latency_model
        n_fit = sum(r.role == "fit" for r in lm.references)
        free = n_fit >= 2 and target.device_class == "gpu"
        model = fit_latency_model(target, lm.references, lm.cycles_per_element, free, lm.cycles_per_op)
        print(f"{target.name}: cycles_per_mac {model.cycles_per_mac:g}, cycles_per_op {model.cycles_per_op:g}"
              f" (cycles_per_element {model.cycles_per_element:g} assumed)")
        for row in reference_errors(target, model):
            print(f"  {row['role']:5s} {row['model']}@{row['resolution']}: published {row['published_ms_at_target_clock']:.2f} ms"
                  f" at this clock, estimate {row['estimate_ms']:.2f} ms, error {row['error']:+.1%}")
        if args.write:
            text = target.source_path.read_text()
            text = re.sub(r"(\n  cycles_per_mac: )[0-9.e+-]+", rf"\g<1>{model.cycles_per_mac:g}", text)
            text = re.sub(r"(\n  cycles_per_op: )[0-9.e+-]+", rf"\g<1>{model.cycles_per_op:g}", text)
            target.source_path.write_text(text)


if __name__ == "__main__":
    main()
