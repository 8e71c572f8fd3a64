"""User-facing errors.

A ``UserError`` is anything a user can cause and fix (bad YAML, unknown model, an unreachable privacy target).
The CLI prints its one-line message and exits with code 2; no traceback, nothing half written.
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
