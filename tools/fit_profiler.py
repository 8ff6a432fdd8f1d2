"""Fit each target's latency model to its published references and report the estimate's error.

usage: python tools/fit_profiler.py [--targets NAME ...] [--write]
With --write the fitted cycles_per_mac / cycles_per_op replace the values in targets/<name>.yaml (the references
and cycles_per_element, an assumption, stay as written). GPU targets with two or more "fit" references also fit
cycles_per_op (a kernel-launch cost per layer); MCUs and CPUs keep theirs fixed (an assumption in the YAML).
"""
from __future__ import annotations

import argparse
import re

from edgekd.profile.latency import fit_latency_model, reference_errors
from edgekd.targets import list_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
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
