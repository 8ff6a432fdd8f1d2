"""Writes one benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""
from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEach section is written by the tool named in its command; re-run the command to refresh it.\n"


def write_section(path: Path, key: str, title: str, body: str) -> None:
    start, end = f"<!-- bench:{key} start -->", f"<!-- bench:{key} end -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
