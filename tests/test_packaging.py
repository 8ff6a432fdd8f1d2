"""A non-editable install works on its own: the wheel carries the targets and the profiler's calibration data."""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _copy_source(dest: Path) -> Path:
    """What a source distribution holds, so the build never writes into the checkout (build/, *.egg-info)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_data")
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "edgekd", dest / "edgekd", ignore=ignore)
    shutil.copytree(ROOT / "targets", dest / "targets")
    shutil.copytree(ROOT / "profiles" / "calibration", dest / "profiles" / "calibration")
    return dest


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_finds_its_targets(tmp_path):
    """Offline: the wheel is built with this environment's setuptools and installed without dependencies into a
    fresh venv that sees this environment's packages (torch, click, ...) but not its editable edgekd."""
    source = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(dist), str(source)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("edgekd-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # a plain path line: the dependencies become importable, the .pth files there (the editable edgekd) are not run
    deps = {*site.getsitepackages(), sysconfig.get_path("purelib")}
    (purelib / "deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEKD_", "PYTHON"))}
    where = subprocess.run(
        [str(python), "-c", "import edgekd.targets as t, edgekd.profile.estimate as e; "
                            "print(t.__file__); print(t.TARGETS_DIR); print(e.MEASUREMENTS.is_file())"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout.split()
    installed = purelib / "edgekd"
    assert where == [str(installed / "targets.py"), str(installed / "_data" / "targets"), "True"]
    assert sorted(p.name for p in (installed / "_data" / "targets").iterdir()) == \
        sorted(p.name for p in (ROOT / "targets").glob("*.yaml"))

    out = subprocess.run([str(venv / "bin" / "edgekd"), "targets", "list"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    for name in ("cortex-m7", "jetson-nano", "esp32-s3"):
        assert name in out.stdout


def test_license_is_an_spdx_string_not_the_deprecated_table():
    """setuptools deprecates `project.license = {text/file = ...}` (builds break after 2027-02); an SPDX string
    needs setuptools >= 77 at build time."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in meta["build-system"]["requires"]
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))  # SPDX replaces them
