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


TAIL_FEATURES = ("tensors", "ops", "quant_channels")
FLASH_FEATURES = ("tensors", "quant_channels")


def fit_memory(path: Path) -> None:
    """Least squares of TFLM's persistent bytes and the .tflite bytes beyond the raw constants on the graph
    features of the exported files; prints the coefficients for edgekd/profile/estimate.py and the error of the
    estimate from the traced PyTorch model (what `edgekd profile` uses before export) on every measurement."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def design(key: str, names) -> np.ndarray:
        return np.array([[1.0, *(r[key]["features"].get(n, 0.0) for n in names)] for r in rows])

    predicted_tail = None
    for what, names, measured, offset in (
            ("tail", TAIL_FEATURES, [r["tflm"]["tail"] for r in rows], None),
            ("flash", FLASH_FEATURES, [r["tflite_bytes"] for r in rows], "constant_bytes")):
        measured = np.array(measured, float)

        def base(key: str) -> np.ndarray:
            return np.array([r[key]["features"][offset] if offset else 0.0 for r in rows])

        exact, traced = design("estimate_from_tflite", names), design("estimate_traced", names)
        target = measured - base("estimate_from_tflite")
        coef, *_ = np.linalg.lstsq(exact, target, rcond=None)
        print(f"{what}: " + ", ".join(f"{n} {c:.2f}" for n, c in zip(("constant", *names), coef)))
        # leave-one-out: each model's estimate from coefficients fitted without it
        loo = np.array([traced[i] @ np.linalg.lstsq(np.delete(exact, i, 0), np.delete(target, i), rcond=None)[0]
                        for i in range(len(rows))]) + base("estimate_traced")
        print(f"  traced-model estimate vs measured, leave-one-out over {len(rows)} models: "
              f"max |error| {np.abs(loo / measured - 1).max():.2%}")
        if what == "tail":
            predicted_tail = loo
    head = np.array([r["tflm"]["head"] for r in rows], float)
    total = np.array([r["tflm"]["total"] for r in rows], float)
    planned = np.array([r["estimate_traced"]["activation_bytes"] for r in rows], float)
    arena = planned + predicted_tail
    print(f"activations (planner on the traced model) vs TFLM head: max |error| {np.abs(planned / head - 1).max():.2%}")
    print(f"arena (activations + leave-one-out persistent) vs TFLM total: max |error| {np.abs(arena / total - 1).max():.2%}")
    for r, a, e in zip(rows, arena, arena / total - 1):
        print(f"  {r['model']}@{r['resolution']}: TFLM total {r['tflm']['total']:,} B, estimate {a:,.0f} B ({e:+.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--memory", type=Path, help="fit the memory/flash coefficients to these measurements")
    args = parser.parse_args()
    if args.memory:
        fit_memory(args.memory)
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
