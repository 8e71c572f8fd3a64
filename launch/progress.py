"""Progress bars and console output shared by every stage.

Bars go to stderr and switch themselves off when stderr is not a terminal or when ``--json`` asked for quiet, so
machine-readable stdout stays clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def info(message: str) -> None:
    if not _quiet:
        console.print(message)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def progress(*, total: int, desc: str, unit: str = "it") -> Iterator[_Bar]:
    enabled = not _quiet and (sys.stderr.isatty() or os.environ.get("PRIVTUNE_PROGRESS") == "1")
    if not enabled:
        yield _Bar(None, None)
        return
    columns = [TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(desc, total=total)
        yield _Bar(bar, task)
