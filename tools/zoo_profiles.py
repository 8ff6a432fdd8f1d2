"""Reference profiles of every zoo student on every target, at the target's input resolution (estimates only).

    python tools/zoo_profiles.py            # writes profiles/zoo/<target>/ (JSON per student, report.md, report.png)

Host timings are left out (they describe the machine that ran this, not the device); profile a model yourself
with --runners to time it on your machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekd import api  # noqa: E402
from edgekd.models import list_models  # noqa: E402
from edgekd.targets import list_targets  # noqa: E402


def main() -> None:
    out = ROOT / "profiles" / "zoo"
    for target in list_targets():
        sources = [f"{name}@{target.input.resolution}" for name in list_models(role="student")]
        result = api.profile(sources, [target], runners=(), out_dir=out)[target.name]
        print(f"{target.name}: {len(result['json'])} profiles -> {result['markdown'].parent}")


if __name__ == "__main__":
    main()
