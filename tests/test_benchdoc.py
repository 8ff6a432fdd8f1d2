"""tools/benchdoc: finished benchmark runs survive a fresh checkout through their archived records."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import benchdoc  # noqa: E402


def test_a_finished_run_is_archived_and_restored_instead_of_retrained(tmp_path, monkeypatch):
    monkeypatch.setattr(benchdoc, "ARCHIVE", tmp_path / "bench-runs")
    run = tmp_path / "runs" / "bench_x" / "kd-seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"test_acc": 0.9}))
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (run / "last.pt").write_bytes(b"big")
    benchdoc.archive(run)
    kept = tmp_path / "bench-runs" / "bench_x" / "kd-seed0"
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.jsonl", "summary.json"]  # records only
    for f in run.iterdir():
        f.unlink()
    # a fresh checkout: ensure_run finds the archived run and trains nothing (no config would be needed)
    assert benchdoc.ensure_run(run) == {"test_acc": 0.9}
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 0}\n'
    assert benchdoc.archive_path(tmp_path / "elsewhere") is None


def test_a_run_another_process_holds_is_skipped_without_waiting(tmp_path, monkeypatch):
    import fcntl
    import signal

    import pytest

    monkeypatch.setattr(benchdoc, "ARCHIVE", tmp_path / "bench-runs")
    run = tmp_path / "runs" / "bench_x" / "kd-seed0"
    run.parent.mkdir(parents=True)
    with open(run.parent / f".{run.name}.lock", "w") as held:  # as a second benchmark process would hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        # flock locks belong to an open file description: this second open conflicts even within one process
        signal.signal(signal.SIGALRM, lambda *_: pytest.fail("ensure_run(wait=False) waited for the lock"))
        signal.alarm(30)  # a regression would block here for ever
        try:
            assert benchdoc.ensure_run(run, wait=False) is None
        finally:
            signal.alarm(0)
    assert not run.exists()  # nothing trained, nothing half-written
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"test_acc": 0.5}))
    assert benchdoc.ensure_run(run, wait=False) == {"test_acc": 0.5}  # free again: the finished run is reused
