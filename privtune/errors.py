"""The errors every stage raises and the CLI turns into exit codes.

- ``UserError``: anything a user can cause and fix (bad YAML, unknown model, an unreachable privacy target). The
  CLI prints its one-line message and exits with code 2; no traceback, nothing half written.
- ``Preempted``: a stop signal (SIGTERM, SIGUSR1, Ctrl-C) was honoured after a checkpoint: exit 128 + signal.
- ``TrainingInterrupted``: a second Ctrl-C stopped training at once; its message says what the next run resumes.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. ``str(err)`` is one line naming the problem and the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem.rstrip(".")
        if fix:
            message = f"{message}: {fix.rstrip('.')}."
        else:
            message += "."
        super().__init__(message)


class Preempted(Exception):
    """SIGTERM, SIGUSR1 or Ctrl-C arrived: a checkpoint was written, the run resumes when started again."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainingInterrupted(KeyboardInterrupt):
    """A second Ctrl-C: stopped at once; the message says what the next run resumes from."""
