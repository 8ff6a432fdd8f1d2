"""Writes one benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEach section is written by the tool named in its command; re-run the command to refresh it.\n"


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """EDGEKD_BENCH_DOC=FILE redirects the write (smoke runs of a tool leave docs/benchmarks.md alone)."""
    path = Path(os.environ.get("EDGEKD_BENCH_DOC", path))
    start, end = f"<!-- bench:{key} start -->", f"<!-- bench:{key} end -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # benchmarks running side by side write the same file
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else HEADER
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        path.write_text(text)


def run_header(threads: int) -> list[str]:
    """The Command / Machine / Date lines every benchmark section starts with (the command from sys.argv)."""
    import datetime
    import platform
    import sys

    import torch

    command = f"python tools/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads, no GPU"
    return [f"Command: `{command.strip()}`  ", f"Machine: {machine}.  ", f"Date: {datetime.date.today().isoformat()}", ""]


# Finished benchmark runs are kept in git as their records (bench-runs/<benchmark>/<run>/), so a later session on a
# fresh checkout continues a long benchmark instead of restarting it; runs/ itself is not versioned.
ARCHIVE = Path(__file__).resolve().parent.parent / "bench-runs"
# the strong teacher of "Distillation pays" (EfficientNet-Lite0 at 64 px, 93.0%), reused by other benchmarks
DISTILL_PAYS_TEACHER = ARCHIVE / "bench_distill_pays" / "teacher-full" / "teacher"
# process.json: the weights DistPro searched, which its readings cite
RECORDS = ("config.yaml", "summary.json", "metrics.jsonl", "process.json")


def archive_path(run_dir: Path) -> Path | None:
    """bench-runs/<path below runs/> for a run under a runs/ folder, else None."""
    parts = Path(run_dir).resolve().parts
    if "runs" not in parts:
        return None
    below = parts[len(parts) - parts[::-1].index("runs"):]
    return ARCHIVE.joinpath(*below) if below else None


def archive(run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """Keep a finished run's records (and `extra` files, e.g. a teacher's best.pt that later runs need)."""
    import shutil

    target = archive_path(run_dir)
    if target is None or not (Path(run_dir) / "summary.json").exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORDS + extra:
        if (Path(run_dir) / name).exists():
            shutil.copy2(Path(run_dir) / name, target / name)


def restore(run_dir: Path) -> bool:
    """Bring back an archived finished run (whatever files were kept); True when it is finished now."""
    import shutil

    source = archive_path(run_dir)
    if (Path(run_dir) / "summary.json").exists() or source is None or not (source / "summary.json").exists():
        return (Path(run_dir) / "summary.json").exists()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        shutil.copy2(f, Path(run_dir) / f.name)
    return True


def ensure_run(run_dir: Path, *, wait: bool = True, **config) -> dict | None:
    """A benchmark run: reused when finished, resumed when interrupted, else trained. Returns its summary, or
    {"failed": message} for a run that stopped with an edgekd error (a diverged bad initialisation, say); the
    failure is kept in failed.txt so a rerun reports it again instead of retraining. With wait=False a run that
    another process is training is skipped (None), so processes started side by side share one plan."""
    import json
    import shutil

    from edgekd import api
    from edgekd.config import TrainConfig
    from edgekd.errors import EdgekdError

    summary, failed = run_dir / "summary.json", run_dir / "failed.txt"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as lock:
        try:  # a benchmark process beside this one may be training this run
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        if failed.exists():
            return {"failed": failed.read_text().strip()}
        if not summary.exists() and not restore(run_dir):
            try:
                if (run_dir / "last.pt").exists():
                    api.train(TrainConfig(run_dir=str(run_dir)), resume=True)
                else:
                    shutil.rmtree(run_dir, ignore_errors=True)  # a start that died before its first checkpoint
                    api.train(TrainConfig(run_dir=str(run_dir), **config))
            except EdgekdError as e:
                failed.write_text(str(e) + "\n")
                return {"failed": str(e)}
            archive(run_dir)
        return json.loads(summary.read_text())


def epoch_records(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def mean_std(values: list[float], scale: float = 100.0) -> str:
    import statistics

    values = [scale * v for v in values]
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"
