"""Benchmark: the seed papers' claims (MLD, SSKD, DistPro, MetaDistiller, NetAug) with the 93%
teacher of "Distillation pays", 10,000 Fashion-MNIST images at 64 px, 20-epoch schedules, then again at 80 epochs
(DistPro at 10: its paper's gain is largest at short schedules); scratch and KD at 20 to 160 epochs show where scratch
plateaus. 3 seeds; each claim read as "does its sign reproduce beyond the seed spread".

    python tools/bench_seed_claims.py --threads 1                     # trains what is missing, then reports
    python tools/bench_seed_claims.py --threads 1 &   # one process per core: each trains the next run that
    python tools/bench_seed_claims.py --threads 1     # no other process holds
    python tools/bench_seed_claims.py --report                        # tables from the finished runs only

Runs live under --out; finished ones are archived in bench-runs/ and reused (tools/benchdoc.ensure_run), so an
interrupted benchmark continues where it stopped. Writes the section "seed-claims" of docs/benchmarks.md and
docs/img/seed-claims-{curves,schedules,80}.png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.benchdoc import (DISTILL_PAYS_TEACHER, ensure_run, epoch_records, mean_std, restore,  # noqa: E402
                            run_header, write_section)


@dataclass(frozen=True)
class Arm:
    label: str
    method: str
    epochs: int
    options: dict = field(default_factory=dict)
    uses_teacher: bool = True
    settings: dict = field(default_factory=dict)  # run settings of this arm only


DISTPRO_SEARCH = 2  # DistPro's search epochs, on top of the retrain budget (the paper searches, then retrains)
MLD = {"mask_epochs": "1", "local_epochs": "2"}  # 3 epochs of the budget before its KD phase
FRESH_BANK = {"teacher_cache_variants": 0}  # the library's default bank: one view per image and epoch, as scratch
NO_CACHE = {"teacher_cache": "off"}  # fresh views too, for a method whose rows a 40-80-view bank would never reuse


def distpro_arms(retrain: int, suffix: str = "") -> list[Arm]:
    """The searched process and its equal-weights baseline over the same retrain budget."""
    common = {"retrain_epochs": str(retrain), "transform_at": "smaller"}
    searched = {"search_epochs": str(DISTPRO_SEARCH), **common}
    return [Arm(f"distpro{suffix}", "distpro", retrain + DISTPRO_SEARCH, searched),
            Arm(f"distpro-equal{suffix}", "distpro", retrain, {"schedule": "equal", **common})]


def teacher_free_arms(epochs: int, suffix: str = "") -> list[Arm]:
    """MetaDistiller, its two baselines and NetAug: no teacher, as in their papers."""
    modes = {"metadistiller": "meta", "deep-supervision": "deep", "self-distillation": "self"}
    return [*(Arm(f"{label}{suffix}", "metadistiller", epochs, {"mode": mode}, uses_teacher=False)
              for label, mode in modes.items()),
            Arm(f"netaug{suffix}", "netaug", epochs, uses_teacher=False)]


ARMS = {arm.label: arm for arm in [
    Arm("scratch", "ce", 20, uses_teacher=False),
    Arm("kd", "kd", 20),
    Arm("kd-10", "kd", 10),
    Arm("mld", "mld", 20, MLD),
    Arm("mld-10", "mld", 10, MLD),
    Arm("mld-fp16", "mld", 20, MLD, settings={"teacher_cache_dtype": "float16"}),
    Arm("sskd", "sskd", 20),
    Arm("sskd-multiloss", "sskd_multiloss", 20),
    *teacher_free_arms(20),
    *distpro_arms(20),
    Arm("scratch-40", "ce", 40, uses_teacher=False),  # the plateau check, and KD's gain at twice the budget
    Arm("kd-40", "kd", 40),
    Arm("kd-40-fresh", "kd", 40, settings=FRESH_BANK),  # as many distinct views as scratch
    Arm("scratch-80", "ce", 80, uses_teacher=False),  # is 40 epochs scratch's plateau?
    Arm("kd-80-fresh", "kd", 80, settings=FRESH_BANK),
    Arm("dkd-80-fresh", "dkd", 80, settings=FRESH_BANK),  # edgekd's default method, at the plateau
    Arm("scratch-160", "ce", 160, uses_teacher=False),  # scratch still gained 0.62 from 40 to 80 epochs
    # the claims again at 80 epochs, scratch's plateau (160 epochs gained nothing)
    Arm("mld-40-fresh", "mld", 40, MLD, settings=NO_CACHE),  # half of kd-80-fresh's epochs
    Arm("mld-80-fresh", "mld", 80, MLD, settings=NO_CACHE),
    Arm("sskd-80", "sskd", 80),
    Arm("sskd-multiloss-80", "sskd_multiloss", 80),
    *teacher_free_arms(80, "-80"),
    *distpro_arms(10, "-10"),  # DistPro's paper finds its largest gain at short schedules (+3.22 points at 10 epochs)
]}

# (claim, paper's arm, the arm it claims to beat); "kd" for MLD's 10-epoch run: reach KD's final in half its epochs
CLAIMS = [
    ("MLD beats KD at the same epochs", "mld", "kd"),
    ("MLD reaches KD's final accuracy in <= 1/2 its epochs", "mld-10", "kd"),
    ("SSKD beats one multi-loss phase", "sskd", "sskd-multiloss"),
    ("DistPro's searched process beats equal weights", "distpro", "distpro-equal"),
    ("MetaDistiller beats deep supervision", "metadistiller", "deep-supervision"),
    ("MetaDistiller beats self-distillation", "metadistiller", "self-distillation"),
    ("NetAug helps a tiny model", "netaug", "scratch"),
    ("(ours, not a paper claim) MLD from a float16 teacher cache vs float32", "mld-fp16", "mld"),
    ("(ours) scratch gains from 40 epochs over 20 (20 is not its plateau)", "scratch-40", "scratch"),
    ("(ours) KD beats scratch at 40 epochs", "kd-40", "scratch-40"),
    ("(ours) KD beats scratch at 40 epochs, one teacher view per epoch (as many views as scratch)", "kd-40-fresh",
     "scratch-40"),
    ("(ours) KD with one view per epoch beats KD with the 4-view bank at 40 epochs", "kd-40-fresh", "kd-40"),
    ("(ours) scratch gains from 80 epochs over 40 (40 is not its plateau)", "scratch-80", "scratch-40"),
    ("(ours) KD beats scratch at 80 epochs, one teacher view per epoch", "kd-80-fresh", "scratch-80"),
    ("(ours) scratch gains from 160 epochs over 80 (if not: 80 is its plateau)", "scratch-160", "scratch-80"),
    ("(ours) DKD, edgekd train's default, beats scratch at 80 epochs (scratch's plateau)", "dkd-80-fresh",
     "scratch-80"),
    ("80 epochs: MLD reaches KD's final accuracy in <= 1/2 its epochs", "mld-40-fresh", "kd-80-fresh"),
    ("80 epochs: MLD beats KD at the same epochs", "mld-80-fresh", "kd-80-fresh"),
    ("80 epochs: SSKD beats one multi-loss phase", "sskd-80", "sskd-multiloss-80"),
    ("80 epochs: MetaDistiller beats deep supervision", "metadistiller-80", "deep-supervision-80"),
    ("80 epochs: MetaDistiller beats self-distillation", "metadistiller-80", "self-distillation-80"),
    ("80 epochs: NetAug helps a tiny model", "netaug-80", "scratch-80"),
    ("10 epochs: DistPro's searched process beats equal weights", "distpro-10", "distpro-equal-10"),
]
# the plateau check's plot
SCHEDULE_ARMS = ["scratch", "kd", "scratch-40", "kd-40", "kd-40-fresh", "scratch-80", "kd-80-fresh", "scratch-160"]
# the 80-epoch claims' plot
LONG_ARMS = ["scratch-80", "kd-80-fresh", "dkd-80-fresh", "mld-40-fresh", "mld-80-fresh", "sskd-80",
             "sskd-multiloss-80", "metadistiller-80", "deep-supervision-80", "self-distillation-80", "netaug-80"]
# the order runs are trained in: one claim's arms for every seed before the next claim, baselines first
TABLES = [["scratch", "kd"], ["mld", "mld-10", "kd-10"], ["sskd", "sskd-multiloss"], ["mld-fp16"],
          ["metadistiller", "deep-supervision", "self-distillation"], ["distpro", "distpro-equal"], ["netaug"],
          ["scratch-40", "kd-40"], ["scratch-80", "kd-40-fresh"], ["kd-80-fresh"], ["scratch-160"],
          # the 80-epoch claims, cheapest first: every claim's seeds finish before the next claim starts
          ["mld-40-fresh"], ["dkd-80-fresh"], ["sskd-80", "sskd-multiloss-80"], ["distpro-10", "distpro-equal-10"],
          ["mld-80-fresh"], ["metadistiller-80", "deep-supervision-80", "self-distillation-80"], ["netaug-80"]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="mobilenetv3_small_050")
    p.add_argument("--limit", type=int, default=10000,
                   help="training images, drawn after 10%% of the full training split is set aside for validation")
    p.add_argument("--resolution", type=int, default=64,
                   help="the teacher's resolution: feature methods need both alike")
    p.add_argument("--variants", type=int, default=4, help="augmented views per image whose teacher outputs are cached")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="train only these arms (default: all, in table order)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="train nothing: write the tables from the finished runs")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_seed_claims")
    return p.parse_args()


def config(arm: Arm, seed: int, args) -> dict:
    from edgekd.config import OptimConfig

    base = dict(data="fashion-mnist", resolution=args.resolution, limit=args.limit, student=args.student,
                student_options={"low_res_stem": False}, method=arm.method, method_options=arm.options,
                epochs=arm.epochs, batch_size=128, optim=OptimConfig(lr=0.05, warmup_epochs=0.5), seed=seed,
                teacher=str(DISTILL_PAYS_TEACHER / "best.pt") if arm.uses_teacher else None,
                teacher_cache_variants=args.variants, teacher_cache_budget_mb=6144, checkpoint_interval_s=300.0)
    return {**base, **arm.settings}


def plan(args) -> list[tuple[Arm, int]]:
    chosen = set(args.arms or ARMS)
    return [(ARMS[label], seed) for table in TABLES for seed in args.seeds for label in table
            if label in chosen]


def finished(run_dir: Path) -> dict | None:
    import json

    if not restore(run_dir):
        return None
    return json.loads((run_dir / "summary.json").read_text())


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    if not values:
        return "pending"
    return f"{mean_std(values)} (n={len(values)})"


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    tab20 = plt.get_cmap("tab20").colors  # more arms than the default cycle's 10 colours: dark ones, then light
    colours = tab20[0::2] + tab20[1::2]
    for number, (label, curve) in enumerate(curves.items()):
        xs = [i + 1 for i, v in enumerate(curve) if v is not None]
        ax.plot(xs, [100 * v for v in curve if v is not None], marker=".", label=label,
                color=colours[number % len(colours)], linestyle=("-", "--")[number // len(colours) % 2])
    ax.set_xlabel("epoch (every phase counted)")
    ax.set_ylabel("validation accuracy % (mean of seeds)")
    ax.set_ylim(bottom=60)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(args) -> None:
    import json

    results: dict[str, list[dict]] = {}
    curves: dict[str, list[list[float | None]]] = {}
    for arm, seed in plan(argparse.Namespace(**{**vars(args), "arms": None})):
        run_dir = args.out / f"{arm.label}-s{seed}"
        summary = finished(run_dir)
        if summary is None:
            continue
        records = epoch_records(run_dir)
        summary["train_s"] = sum(r["train_seconds"] for r in records)
        results.setdefault(arm.label, []).append(summary)
        curves.setdefault(arm.label, []).append([r.get("val_acc") for r in records])
    acc = {label: [s["test_acc"] for s in runs] for label, runs in results.items()}
    teacher = json.loads((DISTILL_PAYS_TEACHER / "summary.json").read_text())
    arm_rows = []
    for label, arm in ARMS.items():
        runs = results.get(label, [])
        minutes = f"{statistics.mean(s['train_s'] for s in runs) / 60:.1f}" if runs else "-"
        options = ", ".join(f"{k} {v}" for k, v in {**arm.options, **arm.settings}.items()) or "defaults"
        arm_rows.append(f"| {label} | `{arm.method}` ({options}) | {arm.epochs} | {cell(acc.get(label, []))} | "
                        f"{minutes} |")

    claim_rows = []
    for claim, paper, other in CLAIMS:
        a, b = acc.get(paper, []), acc.get(other, [])
        if not a or not b:
            claim_rows.append(f"| {claim} | {cell(a)} | {cell(b)} | - | pending |")
            continue
        if len(a) < len(args.seeds) or len(b) < len(args.seeds):  # a spread of fewer seeds is no verdict
            difference = 100 * (statistics.mean(a) - statistics.mean(b))
            claim_rows.append(f"| {claim} | {cell(a)} | {cell(b)} | {difference:+.2f} | seeds pending: not judged |")
            continue
        (ma, sa), (mb, sb) = spread(a), spread(b)
        gap = (ma - sa) - (mb + sb) if ma >= mb else (mb - sb) - (ma + sa)
        verdict = ("reproduces" if ma > mb and gap > 0 else "reverses" if ma < mb and gap > 0
                   else "within the seed spread")
        claim_rows.append(f"| {claim} | {cell(a)} | {cell(b)} | {100 * (ma - mb):+.2f} | {verdict} |")

    mean_curves = {}
    for label, runs in curves.items():
        length = min(len(c) for c in runs)
        mean_curves[label] = [None if any(c[i] is None for c in runs) else statistics.mean(c[i] for c in runs)
                              for i in range(length)]
    plot({label: curve for label, curve in mean_curves.items() if ARMS[label].epochs <= 20 + DISTPRO_SEARCH},
         ROOT / "docs" / "img" / "seed-claims-curves.png")
    plot({label: curve for label, curve in mean_curves.items() if label in SCHEDULE_ARMS},
         ROOT / "docs" / "img" / "seed-claims-schedules.png")
    plot({label: curve for label, curve in mean_curves.items() if label in LONG_ARMS},
         ROOT / "docs" / "img" / "seed-claims-80.png")
    curve_rows = [f"| {label} | " + " / ".join("-" if v is None else f"{100 * v:.1f}" for v in curve) + " |"
                  for label, curve in mean_curves.items()]
    teacher_acc = f"{100 * teacher['test_acc']:.2f}%"
    rerun = ("Written from the finished runs by `--report`; `python tools/bench_seed_claims.py --threads 1` trains "
             "the pending ones and writes the same tables.\n\n" if args.report else "")
    body = "\n".join([
        *run_header(args.threads),
        rerun + f"`fashion-mnist`, {args.limit} training images (validation: 10% of the full training split, set "
        f"aside first), the full test split, "
        f"{args.resolution} px. Student `{args.student}` (standard stride-2 stem: at 64 px it costs what the MCU stem "
        f"costs at 32 px), SGD lr 0.05 cosine (warm-up 0.5 epoch), batch 128, seeds {args.seeds}, crop/flip "
        f"augmentation. Teacher: the Distillation-pays `efficientnet_lite0` at {args.resolution} px "
        f"(test accuracy {teacher_acc}), reused, not retrained; its outputs are cached for a bank of {args.variants} "
        f"views per image (so the teacher-using arms see {args.variants} augmentations per image where scratch sees a "
        "fresh one each epoch; the `-fresh` arms get a fresh view per image and epoch instead: KD through the "
        "library's default bank, MLD with the cache off). "
        "MetaDistiller, its baselines and NetAug use no teacher, as in their papers. Test accuracy of the weights "
        "with the best validation accuracy, mean ± std over seeds; time: training minutes per run on one thread.", "",
        "| arm | method (options) | epochs | test acc % | min per run |", "|---|---|---|---|---|", *arm_rows, "",
        "Claims (\"reproduces\": the paper's arm is ahead and mean - std of the better arm is above mean + std of the "
        "other; \"reverses\": the same, the other way round):", "",
        "| claim | paper's arm | compared with | difference (pt) | reading |", "|---|---|---|---|---|", *claim_rows, "",
        "Validation accuracy per epoch (mean of the finished seeds; `-`: phases that train no classifier):", "",
        "| arm | val acc % per epoch |", "|---|---|", *curve_rows, "",
        "![validation accuracy per epoch, the 10- and 20-epoch budgets](img/seed-claims-curves.png)", "",
        "Scratch and KD by schedule length, 20 to 160 epochs (the plateau check):", "",
        "![validation accuracy per epoch, scratch and KD by schedule length](img/seed-claims-schedules.png)", "",
        "The claims at 80 epochs (MLD also at 40, half KD's epochs):", "",
        "![validation accuracy per epoch, the 80-epoch claims](img/seed-claims-80.png)",
    ])
    write_section(ROOT / "docs" / "benchmarks.md", "seed-claims",
                  "Seed claims with the strong teacher, 20- and 80-epoch budgets (Fashion-MNIST 64 px)", body)
    print(body)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        for arm, seed in plan(args):
            run_dir = args.out / f"{arm.label}-s{seed}"
            print(f"[bench_seed_claims] {run_dir.name}", flush=True)
            if ensure_run(run_dir, wait=False, **config(arm, seed, args)) is None:
                print(f"[bench_seed_claims] {run_dir.name}: another process is training it; next", flush=True)
    report(args)


if __name__ == "__main__":
    main()
