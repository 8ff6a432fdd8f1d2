"""Profile reports: one JSON per (source, target) under profiles/<target>/, a Markdown table and a PNG plot."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

from ..targets import Target, format_bytes
from .select import pareto_front


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("_") or "model"


def write_json(report: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_slug(report['source']['label'])}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".profile-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _accuracy(report: dict) -> float | None:
    acc = report.get("accuracy") or {}
    return acc.get("exported") if acc.get("exported") is not None else acc.get("float")


def _host(report: dict, runner: str) -> str:
    for t in report["latency"]["host"]:
        if t["runner"] == runner:
            return f"{t['p50_ms']:.3g}"
    return "-"


# the estimate's "params" is not the PyTorch parameter count that training prints, hence its own name
DEPLOYED_WEIGHTS_NOTE = ("Deployed weights: the weight and bias elements of the deployed graph (BatchNorm folded into "
                         "the convolutions, and a fully-connected layer counted twice where the TFLite converter "
                         "duplicates it for a hard-swish), not the PyTorch parameter count training reports.")


def _device(report: dict) -> dict | None:
    return report["latency"].get("device")


def _measured_lines(reports: Sequence[dict]) -> list[str]:
    """One line per source measured on the device: where, with what, the numbers, and whether outputs agreed."""
    lines = []
    for r in reports:
        m = _device(r)
        if m is None:
            continue
        where = f"agent {m['url']}" if m["via"] == "agent" else f"serial {m.get('port')}"
        runtime = f"{m['runtime']} {m.get('runtime_version') or ''}".strip()
        extra = [f"throughput {m['throughput_per_s']:.4g}/s at batch {m['batch']}"]
        if m.get("peak_rss_bytes"):
            extra.append(f"peak RSS {format_bytes(m['peak_rss_bytes'])}")
        if m.get("arena_used_bytes"):
            extra.append(f"arena used {format_bytes(m['arena_used_bytes'])}")
        if m.get("clock_hz"):
            extra.append(f"clock {m['clock_hz'] / 1e6:.0f} MHz")
        a = m["agreement"]
        verdict = ("outputs agree" if a["agrees"] else "OUTPUTS DO NOT AGREE") + f" with this host ({a['criterion']})"
        lines.append(f"- {r['source']['label']}: {m.get('device', {}).get('model') or 'device'} via {where}, {runtime}, "
                     f"{m['runs']} runs: p50 {m['p50_ms']:.4g} / p90 {m['p90_ms']:.4g} / p99 {m['p99_ms']:.4g} ms; "
                     f"{', '.join(extra)}; {verdict}")
    return lines


def markdown_table(reports: Sequence[dict], target: Target) -> str:
    runners = sorted({t["runner"] for r in reports for t in r["latency"]["host"]})
    measured = any(_device(r) for r in reports)
    head = ["model", "MACs", "deployed weights", "SRAM est.", "SRAM TFLM", "flash est.", ".tflite", "device ms (est.)",
            *(["device p50 ms (measured)"] if measured else []), *(f"host {r} p50 ms" for r in runners), "accuracy", "fits"]
    lines = [f"Target **{target.name}** ({target.export.precision}): SRAM {format_bytes(target.memory.ram_bytes)}, "
             f"flash {format_bytes(target.memory.flash_bytes)}, latency budget {target.latency_budget_ms:g} ms. "
             "Device latency is the target's fitted estimate; host columns are measured on the build machine, "
             f"not on the device. {DEPLOYED_WEIGHTS_NOTE}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        e, m = r["estimate"], r["measured"]
        acc = _accuracy(r)
        fits = "yes" if r["fits"]["all"] else "no (" + ", ".join(k for k, v in r["fits"].items() if k != "all" and not v) + ")"
        cells = [r["source"]["label"], f"{e['macs'] / 1e6:.2f}M", f"{e['params'] / 1e3:.0f}K",
                 format_bytes(e["sram_bytes"]), format_bytes(m["tflm_arena_bytes"]) if "tflm_arena_bytes" in m else "-",
                 format_bytes(e["flash_bytes"]), format_bytes(m["tflite_bytes"]) if "tflite_bytes" in m else "-",
                 f"{e['latency_ms']:.3g}" if e["latency_ms"] is not None else "-",
                 *([f"{_device(r)['p50_ms']:.3g}" if _device(r) else "-"] if measured else []),
                 *(_host(r, runner) for runner in runners), f"{acc:.1%}" if acc is not None else "-", fits]
        lines.append("| " + " | ".join(cells) + " |")
    if measured:
        lines += ["", "Measured on the device (the fits column judges latency by this p50):", "", *_measured_lines(reports)]
    change = reports[0]["latency"].get("calibrated") if reports else None
    if change:
        old, new = change["old"], change["new"]
        lines += ["", f"Calibrated with `--calibrate`: {change['file']} now has cycles_per_mac {new['cycles_per_mac']:g}, "
                  f"cycles_per_op {new['cycles_per_op']:g} (was {old['cycles_per_mac']:g}, {old['cycles_per_op']:g}; the old "
                  "values are in its latency_model.history). The estimates above use the new coefficients."]
    calibration = reports[0]["latency"].get("calibration") if reports else None
    if calibration:
        lines += ["", "Device latency model vs published measurements (error of the estimate; `fit`: fitted to it, "
                  "`check`: held out):", ""]
        lines += [f"- {c['role']}: {c['model']}@{c['resolution']} {c['error']:+.1%} ({c['source']})" for c in calibration]
    return "\n".join(lines) + "\n"


def plot(reports: Sequence[dict], target: Target, path: Path) -> Path:
    """Accuracy (or MACs when no source has accuracy) against MACs, estimated latency and SRAM; the Pareto
    front is marked and the target's budgets are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    with_acc = [r for r in reports if _accuracy(r) is not None]
    use_acc = bool(with_acc)
    rows = with_acc if use_acc else list(reports)
    ys = [(_accuracy(r) * 100 if use_acc else r["estimate"]["macs"] / 1e6) for r in rows]
    ylabel = "accuracy (%)" if use_acc else "MACs (M), no accuracy yet"
    measured = [(_device(r)["p50_ms"], y, (r["estimate"]["latency_ms"] or 0.0)) for r, y in zip(rows, ys) if _device(r)]
    panels = [("MACs (M)", [r["estimate"]["macs"] / 1e6 for r in rows], None),
              ("estimated device latency (ms)" + (", * measured" if measured else ""),
               [r["estimate"]["latency_ms"] or 0.0 for r in rows], target.latency_budget_ms),
              ("SRAM (KiB)", [r["measured"].get("tflm_arena_bytes", r["estimate"]["sram_bytes"]) / 1024 for r in rows],
               target.memory.ram_bytes / 1024)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (xlabel, xs, budget) in zip(axes, panels):
        points = [{"y": y, "x": x} for x, y in zip(xs, ys)]
        front = set(pareto_front(points, maximise=["y"], minimise=["x"])) if use_acc or xlabel != "MACs (M)" else set()
        ax.scatter(xs, ys, c=["tab:red" if i in front else "tab:blue" for i in range(len(xs))], s=28)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["source"]["label"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        if front:
            ordered = sorted((xs[i], ys[i]) for i in front)
            ax.step([p[0] for p in ordered], [p[1] for p in ordered], where="post", color="tab:red", lw=1,
                    label="Pareto front")
        if budget is not None:
            ax.axvline(budget, color="black", ls="--", lw=1, label=f"{target.name} budget")
        if measured and xlabel.startswith("estimated device latency"):  # measured points: a star, tied to the estimate
            for x_meas, y, x_est in measured:
                ax.plot([x_est, x_meas], [y, y], color="tab:green", lw=0.8, ls=":")
            ax.scatter([m[0] for m in measured], [m[1] for m in measured], marker="*", s=110, c="tab:green",
                       edgecolors="black", linewidths=0.5, zorder=3, label="measured on the device (p50)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels overlap on short log ranges
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{target.name} ({target.export.precision}): latency is the target's estimate, not a host timing"
                 + ("; stars: measured on the device" if measured else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
