"""tools/bench_gpu.py off the GPU: its CPU smoke run produces sane results, and without a GPU the real run stops
with one line (the GPU session it is written for is rare; its first try there must not die on a typo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "bench_gpu.py"


def _run(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path), **env})


@pytest.mark.slow
def test_cpu_smoke_run_writes_sane_results(tmp_path):
    doc = tmp_path / "benchmarks.md"
    done = _run(["--device", "cpu", "--data", "digits", "--students", "mobilenetv3_small_050", "--resolutions",
                 "32", "--batch-size", "64", "--limit", "256", "--budget-s", "20", "--measure-s", "0.3",
                 "--doc", str(doc)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["device_type"] == "cpu" and result["data"] == "digits" and result["matmul_tflops"] > 0
    (row,) = result["rows"]
    assert (row["student"], row["px"], row["batch"]) == ("mobilenetv3_small_050", 32, 64)
    for key in ("end_to_end_images_per_s", "loader_images_per_s", "step_images_per_s", "train_tflops",
                "macs_per_image"):
        assert row[key] > 0, (key, row)
    assert row["kernel_images_per_s"] is None  # the GPU-kernel time is measured on CUDA only
    assert row["train_flops_per_image"] == 6 * row["macs_per_image"]
    assert set(row["shares"]) == {"loader", "model step"} and row["bottleneck"] in row["shares"]
    # the loader and the step run one after the other: their rates bound the end-to-end rate from above
    assert row["end_to_end_images_per_s"] <= 1.5 * min(row["loader_images_per_s"], row["step_images_per_s"])
    text = doc.read_text()
    assert "<!-- bench:gpu-throughput start -->" in text and "| mobilenetv3_small_050 | 32 | 64 |" in text


def test_without_a_gpu_the_default_run_stops_with_one_line(tmp_path):
    done = _run([], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert done.returncode != 0
    assert done.stderr.strip() == "tools/bench_gpu.py needs a CUDA GPU; none is visible"
    assert not (tmp_path / "bench_gpu.json").exists()


def test_a_cpu_smoke_run_never_writes_the_docs(tmp_path):
    done = _run(["--device", "cpu", "--doc", str(ROOT / "docs" / "benchmarks.md")], tmp_path)
    assert done.returncode != 0 and "never writes docs/benchmarks.md" in done.stderr
