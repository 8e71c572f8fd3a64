"""Run directories: where everything a run makes lives, written so that nothing is ever half there.

Owns: creating ``runs/<name>/`` atomically and publishing each stage's output with write-to-temp-then-rename
(which stages are still valid is decided in ``stages`` from the records stage folders hold). A stage's folder
exists only once the stage finished; an interrupted stage leaves a hidden ``.<stage>.tmp-*`` folder that the next
attempt removes.

Layout (DESIGN.md): ``config.resolved.yaml``, ``data/``, ``checkpoints/step-N/``, ``model/``, ``ledger.json``,
``eval/``, ``report.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privtune.atomic import staged_dir
from privtune.launch.config import RunConfig, dump_config

RESOLVED = "config.resolved.yaml"


def create_run_dir(cfg: RunConfig, populate: Callable[[Path], None]) -> Path:
    """Create the run dir in one step: ``populate(tmp)`` fills a temporary dir that is renamed when it returns.

    A run dir therefore exists only with its resolved config and prepared data; bad input found while preparing
    the data leaves nothing behind.
    """
    with staged_dir(cfg.run_dir) as tmp:
        (tmp / RESOLVED).write_text(dump_config(cfg))
        populate(tmp)
    return cfg.run_dir
