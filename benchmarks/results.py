"""benchmarks/RESULTS.md: one section per benchmark, each rewritten only by its own script."""

from __future__ import annotations

import datetime
from pathlib import Path

HEADER = ("# Benchmark results\n\nEach section is written by the script it names, in one run on the machine it "
          "states. Ratios are measured in the same run; absolute times depend on the machine.\n")


def replace_section(path: Path, key: str, title: str, body: str, *, measured: str | None = None) -> None:
    """Rewrite the section ``key`` of ``path``; ``measured`` is the run's date (now, unless re-rendering old data)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    stamp = measured or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"{start}\n## {title}\n\n_Measured {stamp}._\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
