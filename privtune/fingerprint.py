"""Content fingerprints and stage records: what each stage of a run read and wrote.

Owns: ``digest`` (SHA-256 of a canonical JSON form), ``file_digest`` / ``tree_digest`` (files and folders), and the
``StageRecord`` that a finished stage leaves in its folder (the ``COMPLETED`` file holds it as JSON). A stage's
result is reused only when the record's key — a digest of the settings it read and of the digests of its inputs —
equals the key the current command would compute; downstream stages key on the ``output`` digest of what an
upstream stage wrote, so a retrained model (whose weights differ even with the same settings when its noise is
secret) invalidates every score computed from the old one.

Files are hashed by content up to ``CONTENT_LIMIT`` bytes; larger files (model weights) by (size, mtime), the
check ``make`` uses, so that a 26 GB checkpoint is not read on every command. Files in a Hugging Face cache
snapshot are links to blobs named by their content hash: the blob's name is used.

Sensitive: nothing here reads private data into a record; digests of private files are one-way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RECORD = "COMPLETED"
CONTENT_LIMIT = 64 * 2**20
_CHUNK = 4 * 2**20


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def digest(obj: Any) -> str:
    """SHA-256 (hex) of ``obj``'s canonical JSON form."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def file_digest(path: Path) -> str:
    path = Path(path)
    if path.is_symlink() and path.resolve().parent.name == "blobs":  # HF cache: blobs are named by content hash
        return f"blob:{path.resolve().name}"
    stat = path.stat()
    if stat.st_size > CONTENT_LIMIT:
        return f"stat:{stat.st_size}:{stat.st_mtime_ns}"
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def tree_digest(root: Path, *, exclude: tuple[str, ...] = (RECORD,), only: tuple[str, ...] | None = None) -> str:
    """Digest of every file below ``root`` (relative path -> file digest); hidden files and ``exclude`` skipped.

    ``only``: glob patterns of the files that count (e.g. the tokenizer files of a model folder).
    """
    root = Path(root)
    files = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name in exclude:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if only is not None and not any(Path(rel).match(pattern) for pattern in only):
                continue
            files[rel] = file_digest(path)
    return digest(files)


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage read (``config`` values and ``inputs`` digests) and what it wrote (``output``)."""

    stage: str
    config: dict[str, Any]  # dotted config keys the result depends on -> value
    inputs: dict[str, str | None]  # upstream outputs and files read -> digest
    free: dict[str, Any] = field(default_factory=dict)  # settings it ran with that change only speed
    output: str | None = None  # digest of what the stage wrote
    summary: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""

    @property
    def key(self) -> str:
        return digest({"stage": self.stage, "config": self.config, "inputs": self.inputs})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"

    def differences(self, other: StageRecord) -> list[str]:
        """Human-readable reasons why ``other`` (what the command wants) does not match this record."""
        if "legacy" in self.inputs:
            return [f"its {self.stage}/ was written by an older privtune that did not record what it read"]
        reasons = []
        for key in sorted(set(self.config) | set(other.config)):
            old, new = self.config.get(key, "(unset)"), other.config.get(key, "(unset)")
            if old != new:
                reasons.append(f"{key}: {old!r} → {new!r}")
        for name in sorted(set(self.inputs) | set(other.inputs)):
            if self.inputs.get(name) != other.inputs.get(name):
                reasons.append(INPUT_CHANGES.get(name, f"{name} changed"))
        return reasons


INPUT_CHANGES = {
    "data": "the prepared data changed",
    "model": "the trained model changed",
    "base_model": "the base model's files changed",
    "tokenizer": "the tokenizer's files changed",
    "source": "the data source file changed",
    "generator": "the corpus generator's version changed",
}


def stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(stage_dir: Path, record: StageRecord) -> None:
    """Write the record into a stage folder that is still temporary (the folder is renamed when complete)."""
    (Path(stage_dir) / RECORD).write_text(record.to_json())


def read_record(stage_dir: Path) -> StageRecord | None:
    """The stage's record; None when the stage never finished. A marker without a record (written by an older
    privtune) reads as a record that matches nothing, so the stage counts as stale."""
    path = Path(stage_dir) / RECORD
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return StageRecord(**data)
    except (json.JSONDecodeError, TypeError, ValueError):
        return StageRecord(stage=Path(stage_dir).name, config={}, inputs={"legacy": "no record"})


def stale_reasons(run_dir: Path, stage: str) -> list[str]:
    """Why ``stage``'s result in ``run_dir`` no longer describes the stages it read ([] when it still does).

    Its record names the output digest of each upstream stage it read (``data``, ``model``); each must equal the
    digest that upstream stage's own record holds now.
    """
    record = read_record(Path(run_dir) / stage)
    if record is None:
        return [f"{stage}/ has no record of what it read"]
    if "legacy" in record.inputs:
        return [f"{stage}/ was written by an older privtune that did not record what it read"]
    reasons = []
    for upstream in ("data", "model"):
        if upstream in record.inputs:
            current = read_record(Path(run_dir) / upstream)
            if record.inputs[upstream] != (current.output if current else None):
                reasons.append(INPUT_CHANGES[upstream])
    return reasons
