"""Errors raised by the DP engine.

Owns: the two ways the engine says "no" instead of training without a guarantee.

- ``DPRefusal``: a setting or model the engine cannot make private (an uncovered trainable parameter, an
  unsupported layer, a unit with more rows than a micro-batch). A ``UserError``: one line naming the problem and
  the fix; the CLI exits with code 2.
- ``DPInvariantError``: a check that failed *during* a step (a trainable parameter received no per-sample
  contribution, a unit seen in two micro-batches of one step). Also one line; raised before any gradient of the
  step is released, so nothing non-private leaves the engine.

Nothing sensitive is put in these messages: they name modules, parameters and shapes, never data.
"""

from __future__ import annotations

from privtune.errors import UserError


class DPRefusal(UserError):
    """The engine refuses to run: privatising this model / setting is not supported or not verified."""


class DPInvariantError(UserError):
    """A privacy invariant failed during a step; the step's gradients must not be used."""
