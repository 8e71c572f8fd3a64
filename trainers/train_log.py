"""Training curves: one line per optimizer step in ``RUN/logs/train.jsonl`` and, where ``tensorboard`` is installed,
TensorBoard event files in ``RUN/logs/tensorboard/`` (what HF Trainer users open).

Owns: the log file's format and its consistency with checkpoints — a resumed run drops the lines after the step it
resumes from, so the log never shows a step twice.

Line format: ``step`` (optimizer steps done), ``loss`` (mean per-unit loss of the step's batch), ``learning_rate``,
``tokens``, ``seconds`` (wall time of the step), ``tokens_per_second``; DP runs add ``clipped_fraction``,
``unit_norm_quantiles`` ({p10, p50, p90, max} of the per-unit gradient norms before clipping), ``epsilon`` (spent
so far at ``delta``; null without a formal guarantee) and ``delta``.

Sensitive: the loss and the norm quantiles are statistics of the private batch, not differentially private. They
are aggregates kept in the run dir, like checkpoints, and are not part of the released ``model/``; reports that
draw them say they are non-private diagnostics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LOG = Path("logs") / "train.jsonl"
TENSORBOARD = Path("logs") / "tensorboard"


class TrainLog:
    def __init__(self, run_dir: Path, *, resume_step: int):
        self.path = run_dir / LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():  # keep steps up to the checkpoint resumed from; a torn last line is dropped
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", math.inf) <= resume_step:
                    kept.append(line + "\n")
        self.path.write_text("".join(kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self._board = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self._board = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=resume_step + 1)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        if self._board is not None:
            step = row["step"]
            for key, value in row.items():
                if key == "step" or value is None:
                    continue
                if isinstance(value, dict):
                    for sub, v in value.items():
                        self._board.add_scalar(f"train/{key}/{sub}", v, step)
                elif isinstance(value, (int, float)):
                    self._board.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()
