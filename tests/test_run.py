"""`edgekd run`: selection, report, one-line errors, and real sweeps on digits (tiny students, 1 epoch, 32 px).

The sweeps are real: a teacher trained on digits, its outputs cached, each candidate distilled, exported to
full-int8 TFLite (verified in TFLite Micro) and profiled. They are marked slow (the int8 conversions take most of
the time). The error tests write nothing: each checks that the run directory was never created.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgekd import api
from edgekd.cli import main
from edgekd.errors import EdgekdError
from edgekd.profile import run_report
from edgekd.run import _spread
from edgekd.targets import load_target

ROOT = Path(__file__).resolve().parent.parent
SMALL, BIG = "mobilenetv3_small_035@32", "mobilenetv2_050@32"  # int8 .tflite about 330 KiB and 950 KiB


def _tiny_target(tmp_path: Path, flash_kib: int = 600, ram_kib: int | None = None) -> str:
    """cortex-m7 with less flash (and SRAM): BIG's export cannot fit it, SMALL's can."""
    spec = yaml.safe_load((ROOT / "targets" / "cortex-m7.yaml").read_text())
    spec.update(name="tiny-m7", description="cortex-m7 with less memory, for tests")
    spec["memory"]["flash_bytes"] = flash_kib * 1024
    if ram_kib is not None:
        spec["memory"]["ram_bytes"] = ram_kib * 1024
    path = tmp_path / "tiny-m7.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _row(label, acc, latency, sram, flash, state="done"):
    return {"label": label, "state": state, "macs": 1e6, "latency_ms": latency, "sram_bytes": sram,
            "flash_bytes": flash, "accuracy": {"float": acc, "test_images": 100, "deployed": acc,
                                               "deployed_runtime": "tflite_micro", "deployed_images": 100},
            "artifact": {"bundle": f"/x/{label}", "files": ["m.tflite", "m.h", "m.cc"]}}


# ---- selection and report (pure functions over rows) --------------------------------------------------------

def test_spread_keeps_the_largest_and_the_smallest():
    front = [{"c": i} for i in range(8)]
    assert _spread(front, 3) == [front[0], front[4], front[7]]
    assert _spread(front, 1) == [front[0]]
    assert _spread(front, 10) == front


def test_recommend_the_most_accurate_that_fits_and_say_why():
    target = load_target("cortex-m7")
    rows = [_row("a@32", 0.90, 150.0, 100_000, 500_000),  # most accurate, but over the 100 ms budget
            _row("b@32", 0.85, 50.0, 100_000, 500_000), _row("c@32", 0.80, 10.0, 50_000, 300_000),
            _row("d@32", None, None, None, None, state="failed")]
    rec = run_report.recommend(rows, target)
    assert rec["label"] == "b@32"
    assert rec["reason"].startswith("the most accurate") and "fit every budget of cortex-m7" in rec["reason"]
    assert "next: c@32" in rec["reason"]
    assert "a@32 (90.00%, misses latency by 50%)" in rec["reason"]
    assert run_report.fronts(rows)["latency"] == ["a@32", "b@32", "c@32"]


def test_no_fitting_candidate_names_the_binding_budget_and_by_how_much():
    target = load_target("cortex-m7")
    rows = [_row("a@32", 0.9, 120.0, 100_000, 500_000), _row("b@32", 0.8, 90.0, 600_000, 3 * 2**20)]
    with pytest.raises(EdgekdError, match=r"the closest, a@32, misses latency by 20% \(120 ms of 100 ms\)"):
        run_report.recommend(rows, target)


class _Resources(HTMLParser):
    """Every URL a page would load: src/href/srcset/data attributes, CSS url() and @import."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action", "xlink:href") and value:
                self.urls.append(value)

    def handle_data(self, data):
        self.urls += re.findall(r"url\(\s*['\"]?([^'\")]+)", data) + re.findall(r"@import\s+['\"]([^'\"]+)", data)


def _external(urls):
    return [u for u in urls if not u.startswith(("#", "data:"))]


def test_html_report_is_self_contained():
    target = load_target("cortex-m7")
    rows = [_row("b@32", 0.85, 50.0, 100_000, 500_000), _row("c@32", 0.80, 10.0, 50_000, 300_000)]
    report = {"data": "digits", "candidates": rows, "recommended": run_report.recommend(rows, target),
              "stages": {"teacher": {"state": "done", "seconds": 3.0}}, "fronts": run_report.fronts(rows)}
    page = run_report.html(report, target)
    parser = _Resources()
    parser.feed(page)
    assert parser.tags.count("svg") == 2 and "script" not in parser.tags and "link" not in parser.tags
    assert _external(parser.urls) == []
    assert "Recommended: b@32" in page and "<!DOCTYPE svg" not in page


# ---- one-line errors, nothing written -----------------------------------------------------------------------

def _run_cli(args, out: Path):
    result = CliRunner().invoke(main, ["run", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists()
    return lines[0]


def test_error_when_no_candidate_fits_the_target(tmp_path):
    target = _tiny_target(tmp_path, flash_kib=64, ram_kib=16)
    line = _run_cli(["--target", target, "--data", "digits", "--resolution", "32"], tmp_path / "out")
    assert re.search(r"no candidate fits tiny-m7 .*misses sram by \d+%", line)


def test_error_when_the_ray_address_is_unreachable(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _run_cli(["--data", "digits", "--resolution", "32", "--ray-address", f"127.0.0.1:{port}"],
                    tmp_path / "out")
    assert f"127.0.0.1:{port}" in line and ("cannot reach the Ray cluster" in line or "needs Ray" in line)


def test_error_when_the_budget_is_too_small_to_train_anything(tmp_path):
    line = _run_cli(["--data", "digits", "--resolution", "32", "--budget-minutes", "0.0001"], tmp_path / "out")
    assert "--budget-minutes was spent" in line and "nothing was trained" in line


def test_error_when_the_teachers_classes_differ_from_the_data(tmp_path):
    from edgekd.config import TrainConfig

    teacher = tmp_path / "digits-teacher"
    api.train(TrainConfig(run_dir=str(teacher), data="digits", resolution=16, student="mobilenetv3_small_035",
                          student_options={"low_res_stem": True},
                          teacher=None, method="ce", epochs=1, checkpoint_interval_s=1e9))
    line = _run_cli(["--data", "fashion-mnist", "--limit", "500", "--resolution", "32", "--teacher", str(teacher)],
                    tmp_path / "out")
    assert "was trained on other classes" in line and "0, 1, 2, 3" in line


# ---- real sweeps --------------------------------------------------------------------------------------------

def _sweep_args(target: str, out: Path, **extra) -> dict:
    return dict(target=target, data="digits", teacher="mobilenetv3_small_035", candidates=[BIG, SMALL],
                resolution=32, epochs=1, teacher_epochs=1, threads=1, out_dir=out, **extra)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """One sequential sweep on digits for a target BIG's export cannot fit (flash)."""
    tmp = tmp_path_factory.mktemp("run")
    target = _tiny_target(tmp)
    out = tmp / "seq"
    report = api.run(**_sweep_args(target, out))
    return target, out, report


@pytest.mark.slow
def test_a_sweep_writes_the_report_and_recommends_a_student_that_fits(sequential):
    target_path, out, report = sequential
    target = load_target(target_path)
    rows = {r["label"]: r for r in report["candidates"]}
    assert report["recommended"]["label"] == SMALL
    small = rows[SMALL]
    assert small["state"] == "done" and not small["misses"]
    assert small["flash_bytes"] <= target.memory.flash_bytes and small["sram_bytes"] <= target.memory.ram_bytes
    assert small["latency_ms"] <= target.latency_budget_ms and small["sram_measured"]
    bundle = Path(report["recommended"]["artifact"]["bundle"])
    assert {p.suffix for p in bundle.iterdir()} >= {".tflite", ".h", ".cc", ".json"}
    # the teacher ran once, in the outputs stage: every candidate took every teacher output from the cache
    assert small["teacher_cache"]["total_misses"] == 0 and small["teacher_cache"]["total_hits"] > 0
    for name in ("report.md", "report.html", "report.json", "run.json"):
        assert (out / name).is_file()
    assert "Recommended: " + SMALL in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["recommended"]["label"] == SMALL


@pytest.mark.slow
def test_a_failing_candidate_is_reported_and_the_sweep_goes_on(sequential):
    _, out, report = sequential
    big = next(r for r in report["candidates"] if r["label"] == BIG)
    assert big["state"] == "failed" and "flash" in big["error"]
    assert (out / "candidates" / BIG / "summary.json").exists()  # trained, then refused at export
    assert not (out / "candidates" / BIG / "export" / "tflite-int8").exists()  # nothing half-written
    assert BIG in (out / "report.md").read_text() and "failed" in (out / "report.md").read_text()


@pytest.mark.slow
def test_re_running_the_same_command_retrains_nothing(sequential):
    target, out, report = sequential
    files = [out / "teacher" / "best.pt", out / "candidates" / SMALL / "best.pt",
             out / "candidates" / SMALL / "export" / "tflite-int8" / "manifest.json"]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = api.run(**_sweep_args(target, out))
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert [r.get("accuracy") for r in again["candidates"]] == [r.get("accuracy") for r in report["candidates"]]
    with pytest.raises(EdgekdError, match="epochs differ"):
        api.run(**{**_sweep_args(target, out), "epochs": 2})


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_sequential_report_even_after_a_worker_dies(sequential, tmp_path):
    pytest.importorskip("ray")
    target, out, report = sequential
    ray_out = tmp_path / "ray"
    shutil.copytree(out / "teacher", ray_out / "teacher")  # the same teacher: compare the sweeps, not two teachers
    spec = json.loads((out / "run.json").read_text())
    (ray_out / "run.json").write_text(json.dumps({**spec, "stages": {"teacher": {
        **spec["stages"]["teacher"], "path": str(ray_out / "teacher")}}}))
    killed = []

    def kill_small_once():  # its Ray worker dies mid-run: the task is retried once and must give the same result
        state_path = ray_out / "candidates" / f"{SMALL}.json"
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and not killed:
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
            if state.get("state") == "running" and state.get("pid") not in (None, os.getpid()):
                os.kill(state["pid"], signal.SIGKILL)
                killed.append(state["pid"])
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_small_once, daemon=True)
    watcher.start()
    result = api.run(**_sweep_args(target, ray_out, workers=2))
    watcher.join(timeout=1)
    assert killed and json.loads((ray_out / "candidates" / f"{SMALL}.json").read_text())["attempts"] == 2
    assert [(r["label"], r["state"], r.get("accuracy")) for r in result["candidates"]] == \
        [(r["label"], r["state"], r.get("accuracy")) for r in report["candidates"]]
    assert result["recommended"]["label"] == report["recommended"]["label"]


def _cli(out: Path, target: str, extra=()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgekd.cli", "run", "--target", target, "--data", "digits",
                             "--teacher", "mobilenetv3_small_035", "--candidates", "mobilenetv3_small_050@32,"
                             + SMALL, "--epochs", "2", "--threads", "1", "--out", str(out), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "the run ended before the point where the test kills it"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_killed_run_resumes_between_stages_and_mid_candidate(tmp_path):
    target = _tiny_target(tmp_path)
    out = tmp_path / "killed"
    first, second = out / "candidates" / "mobilenetv3_small_050@32", out / "candidates" / SMALL

    def stage_done(name):
        state = out / "run.json"
        return state.exists() and json.loads(state.read_text())["stages"].get(name, {}).get("state") == "done"

    # 1. killed between stages: the teacher finished, its outputs not yet
    _kill_when(_cli(out, target), lambda: stage_done("teacher"))
    teacher = (out / "teacher" / "best.pt").stat().st_mtime_ns
    # 2. killed in the middle of the second candidate: after its first epoch's checkpoint
    def second_mid():  # epoch 1 logged and its end-of-epoch checkpoint saved after it
        metrics, last = second / "metrics.jsonl", second / "last.pt"
        return (last.exists() and metrics.exists() and len(metrics.read_text().splitlines()) == 1
                and last.stat().st_mtime_ns >= metrics.stat().st_mtime_ns)
    _kill_when(_cli(out, target), second_mid)
    assert (out / "teacher" / "best.pt").stat().st_mtime_ns == teacher  # not retrained
    done_first = {f: f.stat().st_mtime_ns for f in (first / "best.pt", first / "summary.json")}
    epoch_one = (second / "metrics.jsonl").read_text().splitlines()[0]
    # 3. the same command finishes the run
    report = api.run(target=target, data="digits", teacher="mobilenetv3_small_035",
                     candidates=["mobilenetv3_small_050@32", SMALL], epochs=2, threads=1, out_dir=out)
    assert (out / "teacher" / "best.pt").stat().st_mtime_ns == teacher
    assert {f: f.stat().st_mtime_ns for f in done_first} == done_first  # the finished candidate never retrained
    lines = (second / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == epoch_one  # resumed after epoch 1, not restarted
    state = json.loads((out / "candidates" / f"{SMALL}.json").read_text())
    assert state["state"] == "done" and state["attempts"] == 2
    assert all(r["state"] == "done" for r in report["candidates"])


@pytest.mark.slow
def test_the_html_report_in_a_headless_browser(sequential):
    """Loads in Chromium with both plots drawn and not one request beyond the file itself."""
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser_path is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell")
    _, out, _ = sequential
    page_url = (out / "report.html").resolve().as_uri()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_url, wait_until="load")
        plots = page.locator("figure.plot svg")
        assert plots.count() == 2
        for i in range(2):
            box = plots.nth(i).bounding_box()
            assert box["width"] > 200 and box["height"] > 150
        assert page.locator("figure.plot svg path").count() > 10
        assert SMALL in page.inner_text("#recommended")
        browser.close()
    assert requests == [page_url]


def test_run_help_shows_the_recipe_defaults_and_examples():
    from edgekd.run import RECIPE

    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert f"Epochs per candidate [default: {RECIPE.epochs}]" in text and f"[default: {RECIPE.method}]" in text
    assert "Examples: edgekd run --target cortex-m7" in text and "[default: cortex-m7]" in text
