"""Helpers shared by the benchmark scripts: keep one section per benchmark in docs/benchmarks.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

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


def run_child(code: str, *args: object) -> dict[str, Any]:
    """Run ``python -c code args...`` in a fresh process from the repository; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def publish(key: str, title: str, lines: list[str], command: str) -> None:
    """Print a benchmark's write-up and store it as its section of docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    update_section(REPO / "docs/benchmarks.md", key, title, text, command)
