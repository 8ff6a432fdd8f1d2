"""The report of `edgekd run`: which candidate to deploy and why, from the measured runs.

Pure functions over the candidate rows that edgekd/run.py collects (one per candidate: state, accuracy, the
target's fitted latency estimate, measured SRAM and flash of the exported artifact, fits). Writes nothing itself:
`markdown()` and `html()` return text; the HTML page is self-contained (plots inlined as SVG, styles inline, no
scripts, fonts or links to anything outside the file).
"""
from __future__ import annotations

import html as _html
import io
import re
from typing import Sequence

from ..errors import EdgekdError
from ..targets import Target, format_bytes
from .select import pareto_front

BUDGETS = (("sram", "SRAM", "sram_bytes"), ("flash", "flash", "flash_bytes"), ("latency", "latency", "latency_ms"))


def accuracy(row: dict) -> float | None:
    """What the recommendation ranks by: the deployed artifact's accuracy, else the float model's."""
    acc = row.get("accuracy") or {}
    return acc.get("deployed") if acc.get("deployed") is not None else acc.get("float")


def budget_of(target: Target, key: str) -> float:
    return {"sram": target.memory.ram_bytes, "flash": target.memory.flash_bytes,
            "latency": target.latency_budget_ms}[key]


def misses(row: dict, target: Target) -> dict[str, float]:
    """Budget -> how far over it (a fraction), for the budgets a finished candidate misses."""
    out = {}
    for key, _, field in BUDGETS:
        value, budget = row.get(field), budget_of(target, key)
        if value is None or value > budget:
            out[key] = float("inf") if value is None else value / budget - 1
    return out


def _amount(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} ms" if key == "latency" else format_bytes(int(value))


def _use(row: dict, target: Target) -> str:
    return ", ".join(f"{label} {_amount(key, row.get(field))} of {_amount(key, budget_of(target, key))}"
                     for key, label, field in BUDGETS)


def _acc_text(row: dict) -> str:
    acc = row.get("accuracy") or {}
    parts = []
    if acc.get("deployed") is not None:
        parts.append(f"{100 * acc['deployed']:.2f}% deployed ({acc.get('deployed_runtime', 'artifact')}, "
                     f"{acc.get('deployed_images')} test images)")
    if acc.get("float") is not None:
        parts.append(f"{100 * acc['float']:.2f}% float ({acc.get('test_images')} test images)")
    return ", ".join(parts) or "no accuracy"


def recommend(rows: Sequence[dict], target: Target) -> dict:
    """The most accurate finished candidate that fits every budget, with the reason.

    Raises EdgekdError naming the binding budget and by how much when candidates finished but none fits."""
    done = [r for r in rows if r.get("state") == "done" and accuracy(r) is not None]
    if not done:
        raise EdgekdError("no candidate finished: nothing to recommend (see the failed and not-run candidates)")
    # equal accuracy: the cheaper one (lower latency, then SRAM)
    fitting = sorted((r for r in done if not misses(r, target)),
                     key=lambda r: (-accuracy(r), r.get("latency_ms") or 0.0, r.get("sram_bytes") or 0))
    if not fitting:
        closest = min(done, key=lambda r: max(misses(r, target).values()))
        what = ", ".join(f"{label} by {misses(closest, target)[key]:.0%} ({_amount(key, closest.get(field))} of "
                         f"{_amount(key, budget_of(target, key))})" for key, label, field in BUDGETS
                         if key in misses(closest, target))
        raise EdgekdError(f"no finished candidate fits {target.name}: the closest, {closest['label']}, misses {what}; "
                          "try smaller --candidates or a larger target")
    best = fitting[0]
    reason = (f"the most accurate ({_acc_text(best)}) of the {len(fitting)} finished candidate(s) "
              f"that fit every budget of {target.name} ({_use(best, target)})")
    if len(fitting) > 1:
        runner_up = fitting[1]
        reason += f"; next: {runner_up['label']} at {100 * accuracy(runner_up):.2f}%"
    better = [r for r in done if misses(r, target) and accuracy(r) > accuracy(best)]
    if better:
        reason += "; more accurate but over budget: " + "; ".join(
            f"{r['label']} ({100 * accuracy(r):.2f}%, misses "
            + ", ".join(f"{k} by {v:.0%}" for k, v in misses(r, target).items()) + ")" for r in better)
    return {"label": best["label"], "reason": reason, "artifact": best.get("artifact"),
            "accuracy": best.get("accuracy")}


def fronts(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Labels on the accuracy-vs-latency and accuracy-vs-SRAM Pareto fronts of the finished candidates."""
    done = [r for r in rows if r.get("state") == "done" and accuracy(r) is not None]
    out = {}
    for key, field in (("latency", "latency_ms"), ("sram", "sram_bytes")):
        points = [{"acc": accuracy(r), "cost": r[field]} for r in done if r.get(field) is not None]
        labelled = [r for r in done if r.get(field) is not None]
        out[key] = [labelled[i]["label"] for i in pareto_front(points, maximise=["acc"], minimise=["cost"])]
    return out


# ---- Markdown ------------------------------------------------------------------------------------------------

def _table(rows: Sequence[dict], report: dict) -> list[str]:
    chosen = (report.get("recommended") or {}).get("label")
    head = ["candidate", "state", "MACs", "accuracy (deployed)", "accuracy (float)", "device ms (est.)",
            "SRAM", "flash", "fits", "train s", "export s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r.get("accuracy") or {}
        fits = "-" if r.get("state") != "done" else (
            "yes" if not r.get("misses") else "no (" + ", ".join(f"{k} +{v:.0%}" for k, v in r["misses"].items()) + ")")
        state = r.get("state", "?") + (f": {r['error']}" if r.get("error") else "")
        seconds = r.get("seconds") or {}
        cells = [f"**{r['label']}** (recommended)" if r["label"] == chosen else r["label"], state.replace("|", "/"),
                 f"{r['macs'] / 1e6:.2f}M" if r.get("macs") else "-",
                 f"{100 * acc['deployed']:.2f}%" if acc.get("deployed") is not None else "-",
                 f"{100 * acc['float']:.2f}%" if acc.get("float") is not None else "-",
                 f"{r['latency_ms']:.3g}" if r.get("latency_ms") is not None else "-",
                 format_bytes(r["sram_bytes"]) if r.get("sram_bytes") else "-",
                 format_bytes(r["flash_bytes"]) if r.get("flash_bytes") else "-", fits,
                 f"{seconds['train']:.0f}" if seconds.get("train") is not None else "-",
                 f"{seconds['export']:.0f}" if seconds.get("export") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _stage_lines(report: dict) -> list[str]:
    lines = ["| stage | state | seconds (this and earlier invocations) |", "|---|---|---|"]
    for name, stage in report.get("stages", {}).items():
        seconds = stage.get("seconds")
        lines.append(f"| {name} | {stage.get('state', '-')} | {f'{seconds:.0f}' if seconds is not None else '-'} |")
    return lines


def markdown(report: dict, target: Target) -> str:
    rec = report.get("recommended")
    teacher = report.get("teacher") or {}
    lines = [f"# edgekd run: {report['data']} on {target.name}", "",
             f"Target **{target.name}** ({target.export.format} {target.export.precision}): SRAM "
             f"{format_bytes(target.memory.ram_bytes)}, flash {format_bytes(target.memory.flash_bytes)}, latency "
             f"budget {target.latency_budget_ms:g} ms. Device latency is the target's fitted estimate "
             "(docs/profile.md); SRAM and flash are measured on the exported artifact when the format gives them "
             "(TFLite Micro arena, file size), else estimated.", ""]
    if rec:
        lines += [f"**Recommended: {rec['label']}.** {rec['reason']}.", ""]
        art = rec.get("artifact") or {}
        if art:
            lines += [f"Firmware-ready artifact: `{art.get('bundle')}` (" + ", ".join(f"`{f}`" for f in art.get("files", []))
                      + ")", ""]
    else:
        lines += [f"**No recommendation:** {report.get('no_recommendation', 'no candidate finished')}", ""]
    if teacher:
        acc = teacher.get("test_acc")
        lines += [f"Teacher: {teacher.get('name')} ({teacher.get('source')}), "
                  + (f"test accuracy {100 * acc:.2f}%" if acc is not None else "test accuracy unknown")
                  + (f", at {teacher['resolution']} px" if teacher.get("resolution") else "") + ".", ""]
    lines += [f"Recipe: {report.get('recipe_text', '')}", "", "## Candidates", ""] + _table(report["candidates"], report)
    f = report.get("fronts") or {}
    lines += ["", f"Pareto front, accuracy vs device latency: {', '.join(f.get('latency', [])) or '-'}; "
              f"accuracy vs SRAM: {', '.join(f.get('sram', [])) or '-'}.", "", "## Stages", ""] + _stage_lines(report)
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# ---- HTML ----------------------------------------------------------------------------------------------------

def plot_svg(rows: Sequence[dict], target: Target, field: str, recommended: str | None) -> str:
    """Accuracy against one cost (field: latency_ms or sram_bytes) as inline SVG: candidates, their Pareto front,
    the target's budget and the recommended student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("state") == "done" and accuracy(r) is not None and r.get(field) is not None]
    scale, xlabel, budget = ((1.0, "estimated device latency (ms)", target.latency_budget_ms) if field == "latency_ms"
                             else (1 / 1024, "SRAM (KiB)", target.memory.ram_bytes / 1024))
    xs = [r[field] * scale for r in done]
    ys = [100 * accuracy(r) for r in done]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = set(pareto_front([{"y": y, "x": x} for x, y in zip(xs, ys)], maximise=["y"], minimise=["x"]))
    ax.scatter(xs, ys, c=["tab:red" if i in front else "tab:blue" for i in range(len(xs))], s=30, zorder=3)
    for x, y, r in zip(xs, ys, done):
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if r["label"] == recommended:
            ax.scatter([x], [y], s=220, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4,
                       label="recommended")
    if front:
        ordered = sorted((xs[i], ys[i]) for i in front)
        ax.step([p[0] for p in ordered], [p[1] for p in ordered], where="post", color="tab:red", lw=1,
                label="Pareto front")
    ax.axvline(budget, color="black", ls="--", lw=1, label=f"{target.name} budget")
    ax.set_xlim(left=0, right=max([budget, *xs]) * 1.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # inline: no XML declaration or DOCTYPE (the DOCTYPE names an external DTD)
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f2f2f2}.rec{background:#e8f6e8}.failed{color:#a00}.plots{display:flex;flex-wrap:wrap;gap:1em}
.plots figure{margin:0}code{background:#f4f4f4;padding:1px 3px}.box{border:1px solid #8c8;padding:.6em 1em;background:#f6fff6}"""


def html(report: dict, target: Target) -> str:
    """One self-contained page: the recommendation, both fronts as inline SVG, the candidates and the stages."""
    esc = _html.escape
    rec = report.get("recommended")
    chosen = rec["label"] if rec else None
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>edgekd run: {esc(report['data'])} on {esc(target.name)}</title>", f"<style>{_STYLE}</style>",
             "</head><body>", f"<h1>edgekd run: {esc(report['data'])} on {esc(target.name)}</h1>",
             f"<p>Target <b>{esc(target.name)}</b> ({esc(target.export.format)} {esc(target.export.precision)}): SRAM "
             f"{esc(format_bytes(target.memory.ram_bytes))}, flash {esc(format_bytes(target.memory.flash_bytes))}, "
             f"latency budget {target.latency_budget_ms:g} ms. Device latency is the target's fitted estimate; SRAM "
             "and flash are measured on the exported artifact where the format gives them.</p>"]
    if rec:
        art = rec.get("artifact") or {}
        parts.append(f'<div class="box" id="recommended"><p><b>Recommended: {esc(rec["label"])}</b>. '
                     f"{esc(rec['reason'])}.</p>"
                     + (f"<p>Firmware-ready artifact: <code>{esc(str(art.get('bundle')))}</code> ("
                        + ", ".join(f"<code>{esc(f)}</code>" for f in art.get("files", [])) + ")</p>" if art else "")
                     + "</div>")
    else:
        parts.append(f'<div class="box failed" id="recommended"><p><b>No recommendation:</b> '
                     f"{esc(report.get('no_recommendation', 'no candidate finished'))}</p></div>")
    teacher = report.get("teacher") or {}
    if teacher:
        acc = teacher.get("test_acc")
        parts.append(f"<p>Teacher: {esc(str(teacher.get('name')))} ({esc(str(teacher.get('source')))}), "
                     + (f"test accuracy {100 * acc:.2f}%" if acc is not None else "test accuracy unknown") + ".</p>")
    parts.append(f"<p>Recipe: {esc(report.get('recipe_text', ''))}</p>")
    parts.append('<div class="plots">')
    for field, title in (("latency_ms", "Accuracy vs estimated device latency"), ("sram_bytes", "Accuracy vs SRAM")):
        parts.append(f'<figure class="plot" id="plot-{field.split("_")[0]}"><figcaption>{title}</figcaption>'
                     f"{plot_svg(report['candidates'], target, field, chosen)}</figure>")
    parts.append("</div><h2>Candidates</h2><table><tr>")
    head = ["candidate", "state", "MACs", "deployed accuracy", "float accuracy", "device ms (est.)", "SRAM", "flash",
            "fits", "train s", "export s"]
    parts.append("".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for r in report["candidates"]:
        acc = r.get("accuracy") or {}
        seconds = r.get("seconds") or {}
        fits = "-" if r.get("state") != "done" else ("yes" if not r.get("misses") else "no (" + ", ".join(
            f"{k} +{v:.0%}" for k, v in r["misses"].items()) + ")")
        cls = ' class="rec"' if r["label"] == chosen else (' class="failed"' if r.get("state") == "failed" else "")
        cells = [r["label"], r.get("state", "?") + (f": {r['error']}" if r.get("error") else ""),
                 f"{r['macs'] / 1e6:.2f}M" if r.get("macs") else "-",
                 f"{100 * acc['deployed']:.2f}%" if acc.get("deployed") is not None else "-",
                 f"{100 * acc['float']:.2f}%" if acc.get("float") is not None else "-",
                 f"{r['latency_ms']:.3g}" if r.get("latency_ms") is not None else "-",
                 format_bytes(r["sram_bytes"]) if r.get("sram_bytes") else "-",
                 format_bytes(r["flash_bytes"]) if r.get("flash_bytes") else "-", fits,
                 f"{seconds['train']:.0f}" if seconds.get("train") is not None else "-",
                 f"{seconds['export']:.0f}" if seconds.get("export") is not None else "-"]
        parts.append(f"<tr{cls}>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    parts.append("</table><h2>Stages</h2><table><tr><th>stage</th><th>state</th><th>seconds</th></tr>")
    for name, stage in report.get("stages", {}).items():
        seconds = stage.get("seconds")
        parts.append(f"<tr><td>{esc(name)}</td><td>{esc(str(stage.get('state', '-')))}</td>"
                     f"<td>{f'{seconds:.0f}' if seconds is not None else '-'}</td></tr>")
    parts.append("</table>")
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
