"""Progress bars and console output shared by every stage.

Bars go to stderr and switch themselves off when stderr is not a terminal or when ``--json`` asked for quiet, so
machine-readable stdout stays clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False, soft_wrap=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _main_rank() -> bool:
    """Under torchrun / srun every rank runs the same stages: only rank 0 narrates them."""
    return os.environ.get("RANK", "0") == "0"


def info(message: str) -> None:
    if not _quiet and _main_rank():
        console.print(message)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


class _LogLines(_Bar):
    """Where stderr is a log file (Slurm, nohup): a plain line every ``every`` seconds and at the end."""

    def __init__(self, desc: str, total: int, unit: str, every: float = 30.0):
        super().__init__(None, None)
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            console.print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {elapsed:.0f} s elapsed, ~{eta:.0f} s left")


@contextlib.contextmanager
def progress(*, total: int, desc: str, unit: str = "it") -> Iterator[_Bar]:
    if _quiet or os.environ.get("PRIVTUNE_PROGRESS") == "0" or not _main_rank():
        yield _Bar(None, None)
        return
    if not sys.stderr.isatty():
        yield _LogLines(desc, total, unit)
        return
    columns = [TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(desc, total=total)
        yield _Bar(bar, task)
