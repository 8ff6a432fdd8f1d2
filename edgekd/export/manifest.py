"""The JSON manifest written next to every artifact: where it came from, what it is, how it was verified."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .formats import FORMATS, NNCF_MODULES

MANIFEST_NAME = "manifest.json"
VERSION = 1

# distributions whose versions decide what an artifact contains, per format: torch and the modules its converter
# needs (the formats table; a module's distribution is its import name with '-' for '_')
TOOLS = {name: ("torch", *(m.replace("_", "-") for m in f.modules)) for name, f in FORMATS.items()}


def tool_versions(format: str, with_gcc: bool = False, with_nncf: bool = False) -> dict[str, str]:
    versions = {"python": platform.python_version(), "edgekd": _version("edgekd")}
    versions.update({name: _version(name) for name in TOOLS[format]})
    if with_nncf:
        versions.update({name: _version(name) for name in NNCF_MODULES})
    if with_gcc and shutil.which("gcc"):
        versions["gcc"] = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    return versions


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(path: Path, manifest: dict) -> None:
    Path(path).write_text(json.dumps(_plain(manifest), indent=2) + "\n")


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _plain(value):
    """Paths become file names relative to the bundle; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return value.name
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
