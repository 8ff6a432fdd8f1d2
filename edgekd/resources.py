"""Data files edgekd reads at run time, found in the installed package or, in a source checkout, beside it.

The top-level folders of the repository are the one source of truth: `targets/` (device targets, the folder
users read and edit) and `profiles/calibration/` (the TFLite Micro measurements the profiler's coefficients
were fitted to). Building a wheel (`pip install .`) copies them into `edgekd/_data/<name>/` (setup.py), so an
installed edgekd finds them without the checkout; an editable install reads the checkout's folders directly.
"""
from __future__ import annotations

import os
from pathlib import Path

# downloads (data/sources.py) and disk caches of teacher outputs (distill/teacher_outputs.py)
DEFAULT_CACHE_DIR = Path(os.environ.get("EDGEKD_CACHE_DIR", "~/.cache/edgekd")).expanduser()
PACKAGE_DIR = Path(__file__).resolve().parent
# name -> (folder in the source tree, files shipped); setup.py copies exactly these into edgekd/_data/<name>/
DATA_FOLDERS = {"targets": ("targets", "*.yaml"), "calibration": ("profiles/calibration", "*.jsonl")}


def data_dir(name: str) -> Path:
    """The folder holding the data files `name` (a key of DATA_FOLDERS): the installed copy, else the checkout's."""
    installed = PACKAGE_DIR / "_data" / name
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / DATA_FOLDERS[name][0]
