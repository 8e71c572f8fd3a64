"""Run directories: where everything a run makes lives, written so that nothing is ever half there.

Owns: creating ``runs/<name>/`` atomically, checking that a re-run uses the same config, and publishing each
stage's output with write-to-temp-then-rename. A stage's folder exists only once the stage finished; an
interrupted stage leaves a hidden ``.<stage>.tmp-*`` folder that the next attempt removes.

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

import yaml

from privtune.launch.config import RunConfig, dump_config
from privtune.launch.errors import UserError

RESOLVED = "config.resolved.yaml"

# Sections that may differ when a finished run is run again (they change speed or what is reported, not what was
# trained). Everything else must match, or the run dir would mix artifacts of two experiments.
_FREE_SECTIONS = ("performance", "eval", "output_dir")


def _comparable(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k not in _FREE_SECTIONS}


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


def check_existing_run(cfg: RunConfig) -> bool:
    """True if the run dir exists and holds the same experiment (config equal up to performance/eval settings)."""
    run_dir = cfg.run_dir
    if not run_dir.exists():
        return False
    saved_path = run_dir / RESOLVED
    if not saved_path.exists():
        raise UserError(f"{run_dir} exists but is not a privtune run dir", "choose another name or output_dir")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = yaml.safe_load(dump_config(cfg))
    if _comparable(saved) != _comparable(now):
        changed = sorted(k for k in set(saved) | set(now) if k not in _FREE_SECTIONS and saved.get(k) != now.get(k))
        raise UserError(
            f"run dir {run_dir} holds a run with a different config (sections differ: {', '.join(changed)})",
            "give this run another name (name=...) or delete the old run dir",
        )
    atomic_write_text(saved_path, dump_config(cfg))  # performance/eval settings may have changed
    return True


def create_run_dir(cfg: RunConfig, populate: Callable[[Path], None]) -> Path:
    """Create the run dir in one step: ``populate(tmp)`` fills a temporary dir that is renamed when it returns.

    A run dir therefore exists only with its resolved config and prepared data; bad input found while preparing
    the data leaves nothing behind.
    """
    with staged_dir(cfg.run_dir) as tmp:
        (tmp / RESOLVED).write_text(dump_config(cfg))
        populate(tmp)
    return cfg.run_dir


def stage_done(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "COMPLETED").exists()


def mark_done(stage_tmp: Path, summary: dict | None = None) -> None:
    (stage_tmp / "COMPLETED").write_text(json.dumps(summary or {}, sort_keys=True) + "\n")
