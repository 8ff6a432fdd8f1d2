"""Pareto fronts and the choice of a student for a target's budgets.

Before training, accuracy is unknown: candidates that fit the target's SRAM, flash and latency budgets are
ranked by compute (MACs, the usual proxy for capacity), and the Pareto front is over (MACs up, latency down,
SRAM down). With measured accuracy (profiles of trained runs) the front is over (accuracy up, latency down).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from ..errors import EdgekdError
from ..targets import Target, format_bytes
from . import latency as lat
from .estimate import estimate_graph
from .graph import trace_model


@dataclass(frozen=True)
class Candidate:
    model: str
    resolution: int
    width_mult: float | None = None

    @property
    def label(self) -> str:
        width = f"-w{self.width_mult:g}" if self.width_mult is not None else ""
        return f"{self.model}{width}@{self.resolution}"


def pareto_front(points: Sequence[dict], maximise: Sequence[str], minimise: Sequence[str]) -> list[int]:
    """Indices of points no other point dominates (at least as good in every key, better in one)."""
    def dominates(a: dict, b: dict) -> bool:
        ge = all(a[k] >= b[k] for k in maximise) and all(a[k] <= b[k] for k in minimise)
        gt = any(a[k] > b[k] for k in maximise) or any(a[k] < b[k] for k in minimise)
        return ge and gt
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


_SWEEP_KEYS = ("arch", "width", "res")


def parse_sweep(spec: str) -> list[Candidate]:
    """`arch=mobilenetv2_100,mcunet_tiny;width=0.35,0.5;res=32,64` -> the cross product (width optional)."""
    from ..models import MODELS, get_model_info

    parts: dict[str, list[str]] = {}
    for chunk in filter(None, (c.strip() for c in spec.split(";"))):
        key, sep, values = chunk.partition("=")
        key = key.strip()
        if not sep or key not in _SWEEP_KEYS or key in parts or not values.strip():
            raise EdgekdError(f"malformed sweep spec '{spec}': write arch=NAME[,NAME...];width=W[,W...];res=R[,R...] "
                              f"(keys {', '.join(_SWEEP_KEYS)}, each once; width is optional)")
        parts[key] = [v.strip() for v in values.split(",") if v.strip()]
    if "arch" not in parts or "res" not in parts:
        raise EdgekdError(f"malformed sweep spec '{spec}': it needs arch=... and res=...")
    for arch in parts["arch"]:
        if arch not in MODELS:
            raise EdgekdError(f"sweep spec: unknown model '{arch}' (`edgekd models` lists them)")
        if "width" in parts and "width_mult" not in get_model_info(arch).options:
            raise EdgekdError(f"sweep spec: model '{arch}' has no width option; drop width= or pick a scalable arch")
    try:
        res = [int(r) for r in parts["res"]]
        widths = [float(w) for w in parts["width"]] if "width" in parts else [None]
    except ValueError:
        raise EdgekdError(f"malformed sweep spec '{spec}': res takes whole numbers, width takes numbers") from None
    if any(r < 8 for r in res) or any(w is not None and w <= 0 for w in widths):
        raise EdgekdError(f"malformed sweep spec '{spec}': res must be >= 8 and width > 0")
    return [Candidate(a, r, w) for a, w, r in itertools.product(parts["arch"], widths, res)]


def estimate_candidate(candidate: Candidate, target: Target, num_classes: int = 10) -> dict:
    from ..models import create_model

    options = dict(target.model_options)
    options["low_res_stem"] = candidate.resolution <= 96 if "low_res_stem" not in options else options["low_res_stem"]
    if candidate.width_mult is not None:
        options["width_mult"] = candidate.width_mult
    model = create_model(candidate.model, num_classes, in_chans=target.input.channels,
                         input_size=candidate.resolution, **options)
    graph = trace_model(model, candidate.resolution, target.input.channels, name=candidate.label)
    est = estimate_graph(graph, target.export.precision)
    sram = est.get("arena_bytes", est["activation_bytes"])
    latency = lat.estimate_ms(graph, target)
    return {"candidate": candidate.label, "model": candidate.model, "resolution": candidate.resolution,
            "width_mult": candidate.width_mult, "model_options": options, "macs": est["macs"],
            "params": est["params"], "sram_bytes": sram, "flash_bytes": est["flash_bytes"], "latency_ms": latency,
            "misses": _misses(sram, est["flash_bytes"], latency, target)}


def _misses(sram: int, flash: int, latency: float | None, target: Target) -> dict[str, float]:
    """Budget -> how far over it, as a fraction (only the budgets missed)."""
    out = {}
    if sram > target.memory.ram_bytes:
        out["sram"] = sram / target.memory.ram_bytes - 1
    if flash > target.memory.flash_bytes:
        out["flash"] = flash / target.memory.flash_bytes - 1
    if latency is None:
        out["latency"] = float("inf")
    elif latency > target.latency_budget_ms:
        out["latency"] = latency / target.latency_budget_ms - 1
    return out


@dataclass
class Selection:
    target: str
    chosen: dict
    front: list[dict]
    rows: list[dict]  # every candidate with its estimates, misses and whether it is on the front
    reason: str


def select(target: Target, candidates: Sequence[Candidate], num_classes: int = 10) -> Selection:
    if not candidates:
        raise EdgekdError("no candidates to select from: pass models or a --sweep spec")
    rows = [estimate_candidate(c, target, num_classes) for c in candidates]
    fitting = [r for r in rows if not r["misses"]]
    if not fitting:
        closest = min(rows, key=lambda r: max(r["misses"].values()))
        misses = ", ".join(f"{k} by {v:.0%}" for k, v in closest["misses"].items())
        raise EdgekdError(f"no candidate fits {target.name} (SRAM {format_bytes(target.memory.ram_bytes)}, flash "
                          f"{format_bytes(target.memory.flash_bytes)}, {target.latency_budget_ms:g} ms): the closest, "
                          f"{closest['candidate']}, misses {misses}; try smaller widths/resolutions or a larger target")
    on_front = pareto_front(fitting, maximise=["macs"], minimise=["latency_ms", "sram_bytes"])
    front = sorted((fitting[i] for i in on_front), key=lambda r: -r["macs"])
    for r in rows:
        r["pareto"] = any(r is f for f in front)
    chosen = front[0]
    rejected = sorted((r for r in rows if r["misses"]), key=lambda r: -r["macs"])[:3]
    why = (f"chose {chosen['candidate']}: the most compute ({chosen['macs'] / 1e6:.1f}M MACs) among the "
           f"{len(fitting)} of {len(rows)} candidates that fit {target.name}; SRAM {format_bytes(chosen['sram_bytes'])} "
           f"of {format_bytes(target.memory.ram_bytes)}, flash {format_bytes(chosen['flash_bytes'])} of "
           f"{format_bytes(target.memory.flash_bytes)}, estimated {chosen['latency_ms']:.1f} ms of "
           f"{target.latency_budget_ms:g} ms")
    if rejected:
        why += "; larger ones miss: " + "; ".join(
            f"{r['candidate']} ({', '.join(f'{k} +{v:.0%}' for k, v in r['misses'].items())})" for r in rejected)
    return Selection(target.name, chosen, front, rows, why)


def default_candidates(target: Target) -> list[Candidate]:
    """The zoo's students at the target's resolution and the two neighbouring common sizes."""
    from ..models import list_models

    sizes = sorted({target.input.resolution, *(r for r in (32, 48, 64, 96, 128, 160, 224)
                                              if target.input.resolution // 2 <= r <= target.input.resolution)})
    return [Candidate(m, r) for m in list_models(role="student") for r in sizes]


def candidates_from_specs(specs: Sequence[str], resolutions: Sequence[int] | None) -> list[Candidate]:
    from .profiler import parse_model_spec

    out = []
    for spec in specs:
        if "@" in spec:
            name, res = parse_model_spec(spec)
            out.append(Candidate(name, res))
        else:
            if not resolutions:
                raise EdgekdError(f"candidate '{spec}' needs a resolution: write {spec}@64 or pass --resolutions")
            out += [Candidate(parse_model_spec(spec, r)[0], r) for r in resolutions]
    return out

