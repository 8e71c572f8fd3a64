"""Append-only JSONL part files for the win-rate command: one file per (kind, key, rank), flushed as rows come.

Owns: where part files live (``<out>/.parts/``), appending rows durably, reading the rows of every rank back
(a torn last line of a killed writer is skipped, so that row is simply redone), and dropping part files whose key
the current command does not use. The key is a digest of everything the rows depend on, so a row is reused only
by a command that would compute the same row.

Sensitive: answer rows hold model output text (see the package docstring); judgment rows hold verdicts only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

PARTS = ".parts"


def part_path(out_dir: Path, kind: str, key: str, rank: int) -> Path:
    return out_dir / PARTS / f"{kind}.{key[:20]}.rank{rank}.jsonl"


def read_parts(out_dir: Path, kind: str, key: str) -> list[dict]:
    """Every row written for (kind, key) by any rank, file by file in rank order."""
    rows = []
    for path in sorted((out_dir / PARTS).glob(f"{kind}.{key[:20]}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the torn last line of a killed writer: that row is made again
    return rows


def drop_stale(out_dir: Path, keep: Iterable[str]) -> None:
    """Remove part files of other models, instructions, judges or settings (rank 0, before any rank writes)."""
    wanted = {k[:20] for k in keep}
    for path in (out_dir / PARTS).glob("*.rank*.jsonl"):
        if path.name.split(".")[1] not in wanted:
            path.unlink()


class PartWriter:
    """Appends rows to one part file; every ``write`` is flushed and fsynced before it returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close() / __exit__

    def write(self, rows: Iterable[dict]) -> None:
        self._file.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
