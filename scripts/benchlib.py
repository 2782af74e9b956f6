"""Helpers shared by the benchmark scripts: keep one section per benchmark in docs/benchmarks.md."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def update_section(path: Path, key: str, title: str, body: str, command: str) -> None:
    """Replace (or append) the section between ``<!-- bench:key -->`` markers."""
    text = path.read_text() if path.exists() else HEADER
    block = (f"<!-- bench:{key} -->\n## {title}\n\n`{command}`, {date.today().isoformat()}\n\n{body}\n"
             f"<!-- /bench:{key} -->")
    pattern = re.compile(rf"<!-- bench:{key} -->.*?<!-- /bench:{key} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
