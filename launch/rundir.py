"""Run directories: where everything a run makes lives, written so that nothing is ever half there.

Owns: creating ``runs/<name>/`` atomically and publishing each stage's output with write-to-temp-then-rename
(which stages are still valid is decided in ``stages`` from the records stage folders hold). A stage's folder
exists only once the stage finished; an interrupted stage leaves a hidden ``.<stage>.tmp-*`` folder that the next
attempt removes.

Layout (DESIGN.md): ``config.resolved.yaml``, ``data/``, ``checkpoints/step-N/``, ``model/``, ``ledger.json``,
``eval/``, ``report.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from privtune.launch.config import RunConfig, dump_config

RESOLVED = "config.resolved.yaml"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it to ``final`` only if the block finishes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def create_run_dir(cfg: RunConfig, populate: Callable[[Path], None]) -> Path:
    """Create the run dir in one step: ``populate(tmp)`` fills a temporary dir that is renamed when it returns.

    A run dir therefore exists only with its resolved config and prepared data; bad input found while preparing
    the data leaves nothing behind.
    """
    with staged_dir(cfg.run_dir) as tmp:
        (tmp / RESOLVED).write_text(dump_config(cfg))
        populate(tmp)
    return cfg.run_dir
