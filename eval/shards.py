"""Per-example score files: written as scoring goes, merged by example index, so an eval resumes and shards.

Owns: the part files under ``<run>/.eval_parts/`` (one per model × split × rank, appended batch by batch and
flushed) and merging them into one ``TokenScores`` per model × split. A part line is
``{"i": example index, "nll": base64 float32 bytes, "hit": "0101..."}``: exact, compact, and readable by any
world size, so an eval interrupted with 2 processes may resume with 1 or 4.

Sensitive: per-token scores of private training text (kept inside the run dir).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privtune.eval.scoring import TokenScores

PARTS = ".eval_parts"


def part_path(run_dir: Path, label: str, split: str, rank: int) -> Path:
    return run_dir / PARTS / f"{label}.{split}.rank{rank}.jsonl"


def encode_row(index: int, nll: np.ndarray, hit: np.ndarray) -> str:
    return json.dumps({"i": index, "nll": base64.b64encode(nll.astype("<f4").tobytes()).decode(),
                       "hit": "".join("1" if h else "0" for h in hit)}) + "\n"


def read_done(run_dir: Path, label: str, split: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every example already scored for (label, split), from the part files of any rank; torn lines ignored."""
    return read_rows(sorted((run_dir / PARTS).glob(f"{label}.{split}.rank*.jsonl")))


def read_rows(paths) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed writer may be torn; that example is scored again
            nll = np.frombuffer(base64.b64decode(row["nll"]), dtype="<f4").astype(np.float32)
            hit = np.frombuffer(row["hit"].encode(), dtype=np.uint8) == ord("1")
            done[int(row["i"])] = (nll, hit)
    return done


class PartWriter:
    """Appends scored examples to this rank's part file, flushed and fsynced after every batch."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, rows: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
        self._file.write("".join(encode_row(i, nll, hit) for i, nll, hit in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def write_rows(path: Path, scores: TokenScores) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(encode_row(i, nll, hit) for i, (nll, hit) in enumerate(zip(scores.nll, scores.hit,
                                                                                       strict=True))))
    os.replace(tmp, path)


def merge(done: dict[int, tuple[np.ndarray, np.ndarray]], sensitive: Sequence[Sequence[bool]]) -> TokenScores:
    """TokenScores in example order; every example must be present."""
    missing = [i for i in range(len(sensitive)) if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} examples were never scored (first: {missing[:5]})")
    return TokenScores(nll=[done[i][0] for i in range(len(sensitive))],
                       hit=[done[i][1] for i in range(len(sensitive))],
                       sensitive=[np.asarray(s[1:], dtype=bool) for s in sensitive])
